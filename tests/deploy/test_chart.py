"""deploy/helm/tandem rendered for a matrix of values: lint, strict validation (the KubeRay CRD included), and the
properties a platform engineer relies on. No cluster and no network: Helm's Go SDK renders in-process."""
from __future__ import annotations

import base64
import json

import helm_python as helm
import pytest
import yaml

from tests.deploy.manifests import (
    CHART, NAMESPACE, REPO, by_kind, lint, notes, one, pod_specs, render, render_objects, strict_crd_schema,
    validation_errors,
)

RAYCLUSTER = "demo-tandem"
ROUTER = "demo-tandem-router"
AUTOSCALER = "demo-tandem-autoscaler"
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart")

GPU_TP2 = {"accelerator": {"type": "nvidia"}, "prefill": {"parallelism": {"tensor": 2}, "replicas": 2},
           "decode": {"parallelism": {"tensor": 2}, "replicas": 3, "maxReplicas": 6},
           "engine": {"maxModelLen": 8192, "maxNumSeqs": 128, "enableChunkedPrefill": False,
                      "attentionBackend": "triton", "enforceEager": False, "cudagraphCaptureSizes": [1, 2, 4, 8, 128]}}
EXTERNAL_REDIS = {"redis": {"enabled": False, "url": "rediss://redis.prod.svc:6380/0",
                            "auth": {"existingSecret": "redis-auth", "secretKey": "password"}}}
AUTOSCALER_ON = {"autoscaler": {"enabled": True, "gpuBudget": 8, "slo": {"ttftSeconds": 1.5, "tpotSeconds": 0.05},
                                "apiKeySecret": {"name": "autoscaler-key", "key": "api-key"}},
                 "auth": {"apiKeysSecret": "tandem-api-keys"}}
TLS_ON = {"tls": {"enabled": True, "secretName": "router-tls"},
          "internalTls": {"enabled": True, "secretName": "tandem-internal-tls", "serverName": "tandem.internal"},
          "auth": {"apiKeysSecret": "tandem-api-keys"}}
MONITORING_ON = {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                                "podMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
                 "networkPolicy": {"enabled": True,
                                   "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}}
EVERYTHING = {**GPU_TP2, **EXTERNAL_REDIS, **AUTOSCALER_ON, **MONITORING_ON, **TLS_ON,
              "tls": {"enabled": True, "secretName": "router-tls", "clientAuth": True},
              "semanticCache": {"enabled": True, "threshold": 0.92},
              "router": {"replicas": 3, "service": {"type": "LoadBalancer"}, "kvLoadFailurePolicy": "fail"},
              "model": {"path": "/models/llama-3-8b", "name": "llama-3-8b",
                        "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}}}
MATRIX = {
    "cpu-defaults": {},
    "nvidia-tp2": GPU_TP2,
    "nvidia-p4-d2": {"accelerator": {"type": "nvidia"}, "prefill": {"parallelism": {"tensor": 4}},
                     "decode": {"parallelism": {"tensor": 2}}},
    "external-redis": EXTERNAL_REDIS,
    "autoscaler-on": AUTOSCALER_ON,
    "tls-on": TLS_ON,
    "monitoring-on": MONITORING_ON,
    "everything": EVERYTHING,
}


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def case(request):
    values = MATRIX[request.param]
    return values, render_objects(values)


def containers(objects):
    for where, pod in pod_specs(objects):
        for c in pod["spec"]["containers"]:
            yield where, pod, c


# --- every values set: lint, strict validation, conventions ------------------------------------------------

def test_lint_passes(case):
    values, _ = case
    assert lint(values) == []


def test_every_manifest_passes_strict_validation(case):
    _, objects = case
    assert {o["kind"] for o in objects} >= {"RayCluster", "Deployment", "Service", "PodDisruptionBudget"}
    errors = [e for o in objects for e in validation_errors(o)]
    assert errors == []


def test_standard_labels_everywhere(case):
    _, objects = case
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert all(k in labels for k in STANDARD_LABELS), (o["kind"], o["metadata"]["name"], labels)
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for where, pod in pod_specs(objects):
        assert all(k in pod["metadata"]["labels"] for k in STANDARD_LABELS), where


def test_pods_run_as_non_root_with_resources_and_read_only_root(case):
    _, objects = case
    for where, pod in pod_specs(objects):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, where
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in pod["spec"]["containers"]:
            assert c["resources"].get("requests") and c["resources"].get("limits", {}).get("memory"), (where, c["name"])
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            # A read-only root needs a writable scratch space.
            writable = {m["mountPath"] for m in c["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
            assert writable & {"/tmp", "/run/redis"}, (where, c["name"])


def test_no_secret_value_in_plain_env(case):
    """Passwords and keys reach containers through secretKeyRef or mounted files, never as literal values."""
    _, objects = case
    secret_values = {base64.b64decode(v).decode() for s in by_kind(objects, "Secret") for v in s.get("data", {}).values()}
    for where, _, c in containers(objects):
        for env in c.get("env", []):
            if "value" not in env:
                continue
            assert not any(s in env["value"] for s in secret_values), (where, env["name"])
            assert not any(w in env["name"] for w in ("PASSWORD", "API_KEY", "TOKEN")), (where, env["name"])
            if env["value"].startswith(("redis://", "rediss://")) and "@" in env["value"]:
                assert "$(REDIS_PASSWORD)@" in env["value"], (where, env["value"])
        for arg in c.get("args", []) + c.get("command", []):
            assert not any(s in arg for s in secret_values), where


# --- the RayCluster -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cpu-defaults", "nvidia-tp2"])
def test_raycluster_worker_groups(name):
    values = MATRIX[name]
    rc = one(render_objects(values), "RayCluster")
    assert rc["metadata"]["name"] == RAYCLUSTER
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert rc["spec"]["enableInTreeAutoscaling"] is False
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert list(groups) == ["prefill", "decode"]
    gpu = name == "nvidia-tp2"
    for role, g in groups.items():
        want = {"replicas": 1, "minReplicas": 1, "maxReplicas": 4, **{k: v for k, v in values.get(role, {}).items()
                                                                       if k in ("replicas", "maxReplicas")}}
        assert {k: g[k] for k in want} == want, role
        # KubeRay passes this to `ray start --resources`: a JSON object in a string.
        assert g["rayStartParams"]["resources"] == f'"{{\\"tandem_{role}\\": 1}}"'
        assert json.loads(json.loads(g["rayStartParams"]["resources"])) == {f"tandem_{role}": 1}
        (c,) = g["template"]["spec"]["containers"]
        assert c["args"] == ["ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD"]
        limits = c["resources"]["limits"]
        if gpu:
            assert g["rayStartParams"]["num-gpus"] == "2" and limits["nvidia.com/gpu"] == 2
        else:
            assert g["rayStartParams"]["num-gpus"] == "0" and "nvidia.com/gpu" not in limits
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    script = head_c["args"][0]
    assert script.startswith("ulimit -n 65536; ${KUBERAY_GEN_RAY_START_CMD//--block/} && exec tandem controller ")
    assert "--tensor-parallel-size " + ("2" if gpu else "1") in script
    assert ("--num-gpus-per-worker 1" in script) == gpu
    if gpu:
        assert "--max-model-len 8192" in script and "--no-enable-chunked-prefill" in script
    assert "--decode-tensor-parallel-size" not in script  # the pools' sizes are equal here


def test_prefill_and_decode_at_different_tp_sizes():
    """Each worker group asks for its own pool's GPUs; the controller gets both sizes; the autoscaler's GPUs per
    worker and budget floor count each pool's own size."""
    values = {**MATRIX["nvidia-p4-d2"], "decode": {"parallelism": {"tensor": 2}, "minReplicas": 2, "replicas": 2}}
    rc = one(render_objects(values), "RayCluster")
    gpus = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in rc["spec"]["workerGroupSpecs"]}
    assert gpus == {"prefill": 4, "decode": 2}
    script = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--tensor-parallel-size 4 --decode-tensor-parallel-size 2" in script
    with pytest.raises(helm.HelmRenderError) as e:  # 1 x 4 + 2 x 2 GPUs at the pools' minimum
        render({**values, "autoscaler": {"enabled": True, "gpuBudget": 7}})
    assert "autoscaler.gpuBudget: the pools' minReplicas need 8 GPUs, got 7" in str(e.value)


def test_raycluster_stays_out_of_ray_autoscaling_with_tandems_autoscaler():
    rc = one(render_objects(AUTOSCALER_ON), "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is False


def test_strict_validation_refuses_a_misspelt_field():
    """The vendored schema, made strict, catches what the API server would refuse (the validator is not vacuous)."""
    rc = one(render_objects(), "RayCluster")
    rc["spec"]["workerGroupSpecs"][0]["groupNmae"] = "prefill"
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    errors = validation_errors(rc)
    assert any("groupNmae" in e for e in errors) and any("imagePullPolicy" in e for e in errors)
    rc["metadata"]["labelz"] = {}
    assert any("labelz" in e for e in validation_errors(rc))
    dep = one(render_objects(), "Deployment", ROUTER)
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["sevice"] = "x"
    assert any("sevice" in e for e in validation_errors(dep))
    assert strict_crd_schema({"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                              "properties": {"a": {}}}).get("additionalProperties") is None


def test_registry_service_selects_the_head_and_routers_dial_it():
    objects = render_objects()
    svc = one(objects, "Service", "demo-tandem-registry")
    head_labels = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= head_labels.items()
    assert svc["spec"]["ports"][0]["port"] == 50100
    args = one(objects, "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--registry") + 1] == "demo-tandem-registry:50100"


# --- the routers ----------------------------------------------------------------------------------------

def test_router_probes_pdb_and_service():
    objects = render_objects()
    dep = one(objects, "Deployment", ROUTER)
    assert dep["spec"]["replicas"] >= 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["grpc"]["port"] == 50051
    assert c["readinessProbe"]["grpc"] == {"port": 50051}  # the overall health: NOT_SERVING without a ready pool
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "http": 8000}
    pdb = one(objects, "PodDisruptionBudget", ROUTER)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    svc = one(objects, "Service", ROUTER)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8000}
    assert "--disable-auth" in c["args"] and "WARNING: no API keys" in notes()


def test_router_with_tls_uses_probes_the_kubelet_can_run():
    """The kubelet's gRPC probes speak plaintext: with TLS on the fronts they would always fail."""
    c = one(render_objects(TLS_ON), "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in c[probe], probe
    assert c["startupProbe"]["httpGet"]["scheme"] == "HTTPS"
    args = " ".join(c["args"])
    assert "--ssl-certfile /etc/tandem/tls/tls.crt --ssl-keyfile /etc/tandem/tls/tls.key" in args
    assert "--internal-tls-server-name tandem.internal" in args
    assert "--api-key-file /etc/tandem/auth/api-keys.yaml" in args and "--disable-auth" not in args


def test_router_redis_url_from_the_secret():
    for values, url in (({}, "redis://:$(REDIS_PASSWORD)@demo-tandem-redis:6379/0"),
                        (EXTERNAL_REDIS, "rediss://:$(REDIS_PASSWORD)@redis.prod.svc:6380/0")):
        objects = render_objects(values)
        c = one(objects, "Deployment", ROUTER)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in c["env"]}
        assert env["TANDEM_REDIS_URL"]["value"] == url
        ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (("redis-auth", "password") if values else ("demo-tandem-redis", "redis-password"))
        assert bool(by_kind(objects, "StatefulSet")) == (not values)


# --- the autoscaler -------------------------------------------------------------------------------------

def test_autoscaler_off_renders_no_rbac():
    objects = render_objects()
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    assert not [o for o in objects if o["metadata"]["name"] == AUTOSCALER]


def test_autoscaler_rbac_is_least_privilege():
    objects = render_objects(AUTOSCALER_ON)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    role = one(objects, "Role", AUTOSCALER)
    rules = sorted(role["rules"], key=lambda r: r["apiGroups"])
    assert rules == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["ray.io"], "resources": ["rayclusters"], "resourceNames": [RAYCLUSTER],
         "verbs": ["get", "patch"]},
    ]
    binding = one(objects, "RoleBinding", AUTOSCALER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AUTOSCALER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AUTOSCALER, "namespace": NAMESPACE}]
    dep = one(objects, "Deployment", AUTOSCALER)
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == AUTOSCALER
    # Nothing else gets an API token.
    for where, pod in pod_specs(objects):
        if where != f"Deployment/{AUTOSCALER}":
            assert pod["spec"]["automountServiceAccountToken"] is False, where


def test_autoscaler_finds_the_routers_and_sizes_within_the_groups():
    objects = render_objects({**GPU_TP2, **AUTOSCALER_ON})
    dep = one(objects, "Deployment", AUTOSCALER)
    assert dep["spec"]["replicas"] == 1
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["command"] + c["args"]
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert args[:2] == ["tandem", "autoscaler"] and opt["--actuator"] == "kubernetes"
    assert opt["--raycluster"] == RAYCLUSTER and opt["--namespace"] == "$(POD_NAMESPACE)"
    selector = dict(kv.split("=") for kv in opt["--router-selector"].split(","))
    router_pod_labels = one(objects, "Deployment", ROUTER)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= router_pod_labels.items()
    assert selector["app.kubernetes.io/component"] == "router"
    assert {k: opt[k] for k in ("--prefill-min", "--prefill-max", "--decode-min", "--decode-max", "--gpu-budget",
                                "--gpus-per-worker", "--ttft-slo-s", "--tpot-slo-s")} == {
        "--prefill-min": "1", "--prefill-max": "4", "--decode-min": "1", "--decode-max": "6", "--gpu-budget": "8",
        "--gpus-per-worker": "2", "--ttft-slo-s": "1.5", "--tpot-slo-s": "0.05"}
    env = {e["name"]: e for e in c["env"]}
    assert env["TANDEM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "autoscaler-key", "key": "api-key"}


# --- monitoring and network ----------------------------------------------------------------------------

def test_monitoring_objects_opt_in():
    assert not [o for o in render_objects() if o["kind"] in ("ServiceMonitor", "PodMonitor", "ConfigMap")]
    objects = render_objects(MONITORING_ON)
    sm = one(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http"]
    assert one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    cm = one(objects, "ConfigMap", "demo-tandem-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (REPO / "deploy" / "grafana" / "tandem-dashboard.json").read_text()
    assert json.loads(cm["data"]["tandem-dashboard.json"]) == json.loads(source)


def test_chart_dashboard_copy_is_current():
    """Helm reads only files inside the chart: it carries a copy of deploy/grafana's dashboard."""
    assert (CHART / "dashboards" / "tandem-dashboard.json").read_text() == \
        (REPO / "deploy" / "grafana" / "tandem-dashboard.json").read_text()


def test_network_policies():
    assert not by_kind(render_objects(), "NetworkPolicy")
    objects = render_objects(MONITORING_ON)
    ray = one(objects, "NetworkPolicy", "demo-tandem-ray")
    selected = {e["key"]: e["values"] for e in ray["spec"]["podSelector"]["matchExpressions"]}
    assert sorted(selected["app.kubernetes.io/component"]) == ["decode", "head", "prefill"]
    (peers, metrics) = ray["spec"]["ingress"]
    allowed = {e["key"]: e["values"] for e in peers["from"][0]["podSelector"]["matchExpressions"]}
    # Only the Ray cluster itself and the routers reach the workers: not the autoscaler, not Redis.
    assert sorted(allowed["app.kubernetes.io/component"]) == ["decode", "head", "prefill", "router"]
    assert allowed["app.kubernetes.io/instance"] == ["demo"]
    assert metrics["ports"] == [{"port": 8080, "protocol": "TCP"}]
    redis = one(objects, "NetworkPolicy", "demo-tandem-redis")
    assert redis["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (rule,) = redis["spec"]["ingress"]
    allowed = {e["key"]: e["values"] for e in rule["from"][0]["podSelector"]["matchExpressions"]}
    assert sorted(allowed["app.kubernetes.io/component"]) == ["decode", "head", "prefill", "router"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


# --- values the chart refuses --------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"prefill": {"replicas": "two"}}, "at '/prefill/replicas': got string, want integer"),
    ({"decode": {"parallelism": {"tensor": 0}}}, "/decode/parallelism/tensor"),
    ({"prefill": {"replica": 2}}, "at '/prefill': additional properties 'replica' not allowed"),
    ({"routerr": {}}, "additional properties 'routerr' not allowed"),
    ({"router": {"service": {"grpcPort": "50051"}}}, "/router/service/grpcPort"),
    ({"accelerator": {"type": "amd"}}, "/accelerator/type"),
    ({"mode": "colocated"}, "at '/mode'"),
    ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    # From the new-user trial: values that rendered and only failed once deployed.
    ({"semanticCache": {"enabled": True, "threshold": -1}}, "/semanticCache/threshold"),
    ({"decode": {"maxReplicas": 0, "minReplicas": 0, "replicas": 0}}, "/decode/maxReplicas"),
    ({"prefill": {"shmSize": "lots"}}, "/prefill/shmSize"),
    ({"autoscaler": {"enabled": True, "apiKeySecret": {"name": "k", "key": ""}}}, "/autoscaler/apiKeySecret/key"),
    ({"model": {"path": "/models/$(reboot).gguf"}}, "/model/path"),  # a shell word on the head
    ({"engine": {"attentionBackend": "flash"}}, "/engine/attentionBackend"),
    ({"router": {"kvLoadFailurePolicy": "abort"}}, "/router/kvLoadFailurePolicy"),
    ({"engine": {"cudagraphCaptureSizes": [0, 8]}}, "/engine/cudagraphCaptureSizes"),
])
def test_schema_refuses_wrong_types_and_unknown_keys(values, message):
    with pytest.raises(helm.HelmValuesError) as e:
        render(values)
    assert message in str(e.value)
    assert any(message in m["error"] for m in lint(values))


@pytest.mark.parametrize("values, message", [
    ({"redis": {"enabled": False}}, "redis: tandem needs a Redis"),
    ({"redis": {"url": "redis://r:6379"}}, "not both"),
    ({"prefill": {"replicas": 5}}, "prefill: need minReplicas <= replicas <= maxReplicas, got 1, 5, 4"),
    ({"router": {"service": {"type": "LoadBalancer"}}}, "auth.apiKeysSecret: required"),
    ({"tls": {"enabled": True}}, "tls.secretName: required"),
    ({"internalTls": {"enabled": True, "secretName": "s"}}, "internalTls.secretName and internalTls.serverName"),
    ({"router": {"service": {"grpcPort": 8000}}}, "router.service.grpcPort and router.service.httpPort: must differ"),
    ({"router": {"replicas": 2, "podDisruptionBudget": {"minAvailable": 2}}},
     "router.podDisruptionBudget.minAvailable: must be below router.replicas (2), got 2"),
    ({"accelerator": {"type": "nvidia"}, "autoscaler": {"enabled": True, "gpuBudget": 1}},
     "autoscaler.gpuBudget: the pools' minReplicas need 2 GPUs, got 1"),
    ({"engine": {"attentionBackend": "triton"}}, "engine.attentionBackend: triton needs accelerator.type=nvidia"),
    ({"engine": {"cudagraphCaptureSizes": [1, 128]}},
     "engine.cudagraphCaptureSizes: each must be at most engine.maxNumSeqs (64; 64 when null), got 128"),
    ({"accelerator": {"type": "nvidia"}, "engine": {"maxNumSeqs": 4, "cudagraphCaptureSizes": [8]}},
     "engine.cudagraphCaptureSizes: each must be at most engine.maxNumSeqs (4; 64 when null), got 8"),
])
def test_inconsistent_values_fail_with_a_message(values, message):
    with pytest.raises(helm.HelmRenderError) as e:
        render(values)
    assert message in str(e.value)


def test_values_yaml_is_the_schema_default():
    """Every key in values.yaml is in the schema (the defaults pass it) and documented values carry no secrets."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        assert chart.values == values
