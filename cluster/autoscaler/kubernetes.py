"""The Kubernetes actuator: sizes the pools of a tandem RayCluster (KubeRay, ray.io/v1) by patching the replicas
of its `prefill` and `decode` worker groups, and nothing else.

The chart (deploy/helm/tandem) gives each worker group's pods the Ray resource `tandem_<role>`; the controller on
the head follows the nodes that offer it (`tandem controller --follow-nodes`), so a worker group's replicas are
its pool's size. A scale-down names the pods that go in `scaleStrategy.workersToDelete` (KubeRay deletes exactly
those): pods not ready yet first (a pending pod waiting for a GPU costs nothing to drop), then the newest ready ones
(the least prefix cache lost). A worker pod drains in its preStop hook before it stops.

Every patch is one JSON patch whose first operation tests the group's name at the index it replaces, so a
RayCluster edited in between (groups reordered) makes the patch fail (422) instead of resizing another group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from cluster.pools import PoolReplicas

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayclusters"
# Labels KubeRay puts on every pod of a RayCluster.
CLUSTER_LABEL, GROUP_LABEL = "ray.io/cluster", "ray.io/group"
DEFAULT_GROUPS = {"prefill": "prefill", "decode": "decode"}


class ActuatorError(RuntimeError):
    """The RayCluster or one of its worker groups is missing, or the API refused a call."""


@dataclass(frozen=True)
class GroupLimits:
    min_replicas: int
    max_replicas: int


class KubeRayActuator:
    """observe() -> PoolReplicas per pool; scale(role, replicas) patches that pool's worker group.

    api_client: a kubernetes.client.ApiClient (in-cluster config in a pod, a kubeconfig elsewhere). groups: pool
    role -> worker group name (the chart's: prefill, decode)."""

    def __init__(self, api_client, namespace: str, name: str, groups: dict[str, str] | None = None,
                 timeout_s: float = 10.0):
        """timeout_s: bound on every API call (an API server that accepts and never answers must not hang the
        autoscaler)."""
        from kubernetes import client

        self.namespace, self.name = namespace, name
        self.timeout_s = timeout_s
        self.groups = dict(groups or DEFAULT_GROUPS)
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    # --- reading --------------------------------------------------------------------------------------

    def _raycluster(self) -> dict:
        try:
            return self._custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL,
                                                             self.name, _request_timeout=self.timeout_s)
        except ApiException as e:
            raise ActuatorError(f"RayCluster {self.namespace}/{self.name}: {e.status} {e.reason}") from e
        except HTTPError as e:  # unreachable, or no answer within timeout_s
            raise ActuatorError(f"RayCluster {self.namespace}/{self.name}: the API server: {e}") from e

    def _group_index(self, rc: dict, role: str) -> tuple[int, dict]:
        if role not in self.groups:
            raise ValueError(f"role: must be one of {', '.join(self.groups)}, got {role!r}")
        group = self.groups[role]
        for i, spec in enumerate(rc.get("spec", {}).get("workerGroupSpecs", [])):
            if spec.get("groupName") == group:
                return i, spec
        raise ActuatorError(f"RayCluster {self.namespace}/{self.name} has no worker group {group!r} (pool {role})")

    def _pods(self, group: str) -> list:
        selector = f"{CLUSTER_LABEL}={self.name},{GROUP_LABEL}={group}"
        try:
            pods = self._core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                  _request_timeout=self.timeout_s).items
        except HTTPError as e:
            raise ActuatorError(f"pods of RayCluster {self.namespace}/{self.name}: the API server: {e}") from e
        # Checked here too: the selector is the whole contract between this actuator and KubeRay's labels.
        return [p for p in pods if (p.metadata.labels or {}).get(CLUSTER_LABEL) == self.name
                and (p.metadata.labels or {}).get(GROUP_LABEL) == group]

    def limits(self) -> dict[str, GroupLimits]:
        """Each pool's minReplicas/maxReplicas as the RayCluster sets them."""
        rc = self._raycluster()
        out = {}
        for role in self.groups:
            _, spec = self._group_index(rc, role)
            out[role] = GroupLimits(int(spec.get("minReplicas", 0)), int(spec.get("maxReplicas", 2 ** 31 - 1)))
        return out

    def observe(self) -> dict[str, PoolReplicas]:
        rc = self._raycluster()
        out = {}
        for role, group in self.groups.items():
            _, spec = self._group_index(rc, role)
            desired = int(spec.get("replicas", 0))
            pods = self._pods(group)
            draining = sum(_is_terminating(p) for p in pods)
            ready = sum(_is_ready(p) for p in pods)
            out[role] = PoolReplicas(desired=desired, ready=ready, starting=max(desired - ready, 0),
                                     draining=draining)
        return out

    # --- writing --------------------------------------------------------------------------------------

    def scale(self, role: str, replicas: int) -> None:
        """Set the pool's worker group to `replicas`; a scale-down names the pods that go (pending, then newest)."""
        if replicas < 0:
            raise ValueError(f"replicas: must be >= 0, got {replicas}")
        rc = self._raycluster()
        index, spec = self._group_index(rc, role)
        group = self.groups[role]
        path = f"/spec/workerGroupSpecs/{index}"
        patch = [{"op": "test", "path": f"{path}/groupName", "value": group},
                 {"op": "replace" if "replicas" in spec else "add", "path": f"{path}/replicas", "value": replicas}]
        pods = [p for p in self._pods(group) if not _is_terminating(p)]
        if replicas < len(pods):
            # Not ready first; among the same readiness the newest first.
            victims = sorted(pods, key=lambda p: (_is_ready(p), -_created(p)))[:len(pods) - replicas]
            strategy = dict(spec.get("scaleStrategy") or {})
            strategy["workersToDelete"] = [p.metadata.name for p in victims]
            patch.append({"op": "add", "path": f"{path}/scaleStrategy", "value": strategy})
        try:
            self._custom.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL,
                                                        self.name, patch, _request_timeout=self.timeout_s)
        except ApiException as e:
            raise ActuatorError(f"patching RayCluster {self.namespace}/{self.name} group {group!r}: "
                                f"{e.status} {e.reason}") from e
        except HTTPError as e:
            raise ActuatorError(f"patching RayCluster {self.namespace}/{self.name} group {group!r}: the API "
                                f"server: {e}") from e
        log.info("RayCluster %s/%s: worker group %s -> %d replicas", self.namespace, self.name, group, replicas)


def _is_terminating(pod) -> bool:
    return pod.metadata.deletion_timestamp is not None


def _is_ready(pod) -> bool:
    if _is_terminating(pod) or pod.status is None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def _created(pod) -> float:
    ts = pod.metadata.creation_timestamp
    return ts.timestamp() if ts is not None else 0.0
