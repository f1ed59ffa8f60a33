"""Rendering the chart offline and checking what it renders: helm-python-sdk (Helm's Go SDK, no helm binary) renders
and lints; kubernetes-validate checks built-in kinds against the Kubernetes schemas (strict); the vendored CRD
schemas (schemas/) check the RayCluster, ServiceMonitor and PodMonitor."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tandem"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
RELEASE = "demo"
NAMESPACE = "llm"
# The oldest version the chart supports (Chart.yaml kubeVersion), so that nothing newer sneaks in.
KUBE_VERSION = "1.27"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray.io-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
}


@functools.cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template demo deploy/helm/tandem -n llm` (HelmValuesError or
    HelmRenderError as `helm install` would refuse)."""
    return _chart().render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_objects(values: dict | None = None) -> list[dict]:
    """Every Kubernetes object the chart renders (NOTES.txt left out)."""
    objects = []
    for path, text in sorted(render(values).items()):
        if path.endswith(".txt"):
            continue
        objects += [o for o in yaml.safe_load_all(text) if o]
    return objects


def notes(values: dict | None = None) -> str:
    return render(values)["tandem/templates/NOTES.txt"]


def lint(values: dict | None = None) -> list[dict]:
    """`helm lint --strict` findings worse than info ({"severity", "path", "error"})."""
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


def strict_crd_schema(schema: dict) -> dict:
    """A CRD's structural schema made strict as the API server's strict field validation is: an object with
    `properties` refuses unknown fields unless it preserves them (x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Validator:
    schema = strict_crd_schema(json.loads((SCHEMAS / CRD_SCHEMAS[api_version, kind]).read_text()))
    # OpenAPI v3's schema dialect is close to draft 4; its x-kubernetes-* keywords are ignored.
    return jsonschema.Draft4Validator(schema)


def validation_errors(obj: dict) -> list[str]:
    """Why the API server (strict field validation) would refuse obj; [] when it would take it. A kind with no
    schema here is an error too: nothing goes unchecked."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        errors = [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _crd_validator(*key).iter_errors(obj)]
        # The CRD schema leaves metadata open; the API server checks it as ObjectMeta.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        return errors + validation_errors(meta)
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{name}: {e.message}"]
    return []


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the objects make: Deployments, StatefulSets, RayCluster groups."""
    pods = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            pods.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]))
        elif o["kind"] == "RayCluster":
            pods.append((f"RayCluster/{o['metadata']['name']}/head", o["spec"]["headGroupSpec"]["template"]))
            for g in o["spec"]["workerGroupSpecs"]:
                pods.append((f"RayCluster/{o['metadata']['name']}/{g['groupName']}", g["template"]))
    return pods
