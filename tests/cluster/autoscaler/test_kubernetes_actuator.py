"""The Kubernetes actuator against kmock's Kubernetes API emulator (a real HTTP server on a free port, the real
`kubernetes` client): it patches the right RayCluster worker group, and nothing else."""
from __future__ import annotations

import asyncio
import datetime as dt
import threading

import kmock
import pytest
from kubernetes import client

from cluster.autoscaler.kubernetes import ActuatorError, KubeRayActuator
from cluster.pools import PoolReplicas

NS = "serving"


class Emulator:
    """kmock's KubernetesEmulator served on its own event loop thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _serve(self):
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            self.k8s, self.url = k8s, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self):
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def requests(self, method: str | None = None) -> list:
        return [r for r in list(iter(self.k8s)) if method is None or r.method == method]

    def objects(self, plural: str) -> dict[str, dict]:
        return {name: obj.raw for (res, _, name), obj in self.k8s.objects.items()
                if res.plural == plural and not obj.deleted}


def raycluster(name: str, groups: list[tuple[str, int]]) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": NS},
            "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}},
                     "workerGroupSpecs": [{"groupName": g, "replicas": n, "minReplicas": 1, "maxReplicas": 6,
                                           "rayStartParams": {}, "template": {"spec": {"containers": []}}}
                                          for g, n in groups]}}


def pod(name: str, cluster: str, group: str, ready: bool, age_s: int, terminating: bool = False) -> dict:
    created = (dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc) - dt.timedelta(seconds=age_s)).isoformat()
    meta = {"name": name, "namespace": NS, "creationTimestamp": created,
            "labels": {"ray.io/cluster": cluster, "ray.io/group": group, "ray.io/node-type": "worker"}}
    if terminating:  # still there while it drains (kmock drops a deleted object that has no finalizer)
        meta["deletionTimestamp"] = created
        meta["finalizers"] = ["tandem.test/draining"]
    status = ({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]} if ready
              else {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "ray-worker"}]},
            "status": status}


@pytest.fixture
def k8s():
    emu = Emulator()
    api = client.ApiClient(client.Configuration(host=emu.url))
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    # Ours, with decode listed first; another tandem in the same namespace whose groups have the same names.
    custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayclusters",
                                           raycluster("tandem", [("decode", 2), ("prefill", 1)]))
    custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayclusters",
                                           raycluster("other", [("prefill", 1), ("decode", 1)]))
    for body in (pod("tandem-prefill-a", "tandem", "prefill", True, 600),
                 pod("tandem-decode-old", "tandem", "decode", True, 900),
                 pod("tandem-decode-new", "tandem", "decode", True, 60),
                 pod("tandem-decode-pending", "tandem", "decode", False, 30),
                 pod("other-decode-a", "other", "decode", True, 10)):
        core.create_namespaced_pod(NS, body)
    # decode says 2 replicas but has 3 pods: an earlier scale-down not carried out yet (KubeRay's pace).
    yield emu, api
    api.close()
    emu.close()


def test_observe_counts_ready_starting_and_draining_per_pool(k8s):
    emu, api = k8s
    pools = KubeRayActuator(api, NS, "tandem").observe()
    assert pools == {"prefill": PoolReplicas(desired=1, ready=1, starting=0, draining=0),
                     "decode": PoolReplicas(desired=2, ready=2, starting=0, draining=0)}


def test_scale_up_patches_only_our_raycluster_and_only_that_group(k8s):
    emu, api = k8s
    before = emu.objects("rayclusters")
    n_before = len(emu.requests())
    KubeRayActuator(api, NS, "tandem").scale("prefill", 3)

    patches = [r for r in emu.requests()[n_before:] if r.method not in ("GET",)]
    assert len(patches) == 1
    req = patches[0]
    assert req.method == "PATCH" and req.resource.plural == "rayclusters" and req.name == "tandem"
    # A JSON patch that tests the group's name at the index it replaces (prefill is second in our RayCluster).
    assert req.data == [{"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "prefill"},
                        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3}]
    after = emu.objects("rayclusters")
    assert after["other"] == before["other"]
    groups = {g["groupName"]: g for g in after["tandem"]["spec"]["workerGroupSpecs"]}
    assert groups["prefill"]["replicas"] == 3
    assert groups["decode"] == {g["groupName"]: g for g in before["tandem"]["spec"]["workerGroupSpecs"]}["decode"]
    assert after["tandem"]["spec"]["headGroupSpec"] == before["tandem"]["spec"]["headGroupSpec"]
    assert set(emu.objects("pods")) == {"tandem-prefill-a", "tandem-decode-old", "tandem-decode-new",
                                        "tandem-decode-pending", "other-decode-a"}  # no pod touched


def test_scale_down_names_the_pending_pod_then_the_newest(k8s):
    emu, api = k8s
    actuator = KubeRayActuator(api, NS, "tandem")
    actuator.scale("decode", 1)
    decode = next(g for g in emu.objects("rayclusters")["tandem"]["spec"]["workerGroupSpecs"]
                  if g["groupName"] == "decode")
    assert decode["replicas"] == 1
    # Three live decode pods, one stays: the pending one goes first, then the newest ready one; never the other
    # RayCluster's pod.
    assert decode["scaleStrategy"]["workersToDelete"] == ["tandem-decode-pending", "tandem-decode-new"]
    prefill = next(g for g in emu.objects("rayclusters")["tandem"]["spec"]["workerGroupSpecs"]
                   if g["groupName"] == "prefill")
    assert "scaleStrategy" not in prefill and prefill["replicas"] == 1


def test_terminating_pods_count_as_draining(k8s):
    emu, api = k8s
    client.CoreV1Api(api).create_namespaced_pod(NS, pod("tandem-prefill-b", "tandem", "prefill", True, 300,
                                                        terminating=True))
    assert KubeRayActuator(api, NS, "tandem").observe()["prefill"] == PoolReplicas(1, ready=1, draining=1)


def test_a_reordered_group_fails_the_patch_instead_of_resizing_another(k8s):
    """The RayCluster changes between the actuator's read and its patch: the JSON patch's test operation fails and
    nothing is resized."""
    emu, api = k8s
    actuator = KubeRayActuator(api, NS, "tandem")
    real = actuator._raycluster

    def stale():
        rc = real()
        rc["spec"]["workerGroupSpecs"].reverse()  # what the actuator saw: prefill at index 0
        return rc

    actuator._raycluster = stale
    before = emu.objects("rayclusters")["tandem"]
    with pytest.raises(ActuatorError, match="prefill"):
        actuator.scale("prefill", 4)
    assert emu.objects("rayclusters")["tandem"] == before


def test_missing_raycluster_or_group_and_bad_arguments_are_named(k8s):
    emu, api = k8s
    with pytest.raises(ActuatorError, match="serving/nope"):
        KubeRayActuator(api, NS, "nope").observe()
    with pytest.raises(ActuatorError, match="'decode-gpu'"):
        KubeRayActuator(api, NS, "tandem", groups={"prefill": "prefill", "decode": "decode-gpu"}).observe()
    actuator = KubeRayActuator(api, NS, "tandem")
    with pytest.raises(ValueError, match="role"):
        actuator.scale("both", 2)
    with pytest.raises(ValueError, match="replicas"):
        actuator.scale("decode", -1)
    assert not emu.requests("PATCH")


def test_limits_come_from_the_raycluster(k8s):
    emu, api = k8s
    limits = KubeRayActuator(api, NS, "tandem").limits()
    assert (limits["decode"].min_replicas, limits["decode"].max_replicas) == (1, 6)


def test_an_api_server_that_never_answers_fails_within_the_timeout():
    """A listener that accepts and never replies (found by a new-user trial: the autoscaler hung silently)."""
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.getsockname()[1]}"))
        start = time.monotonic()
        with pytest.raises(ActuatorError, match="the API server"):
            KubeRayActuator(api, NS, "tandem", timeout_s=0.5).observe()
        assert time.monotonic() - start < 5
        api.close()
