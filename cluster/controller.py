"""The cluster controller: starts or joins Ray, creates the worker pools, keeps the registry current and
replaces dead workers.

Each worker is a Ray actor in its own STRICT_PACK placement group (one bundle per TP rank). The actor runs a
WorkerServer (engine loop + gRPC Worker service + KV transport) and reports where it listens; routers find it
through the registry and talk to it over gRPC, never through Ray.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util import get_node_ip_address, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from cluster.registry import WorkerRegistry
from tandem import tls
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.server import WorkerConfig, WorkerServer

log = logging.getLogger(__name__)


class WorkerActor:
    """Rank 0 of one worker, inside a Ray actor process."""

    def __init__(self, config: WorkerConfig):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.server: WorkerServer | None = None

    def start(self) -> bytes:
        host = self.config.host or get_node_ip_address()
        self.server = WorkerServer(dataclasses.replace(self.config, host=host))
        return self.server.start().SerializeToString()

    def ping(self) -> bool:
        if self.server is None:
            return False
        if self.server.loop.error is not None:
            raise RuntimeError(f"engine loop failed: {self.server.loop.error}")
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


_RemoteWorker = ray.remote(max_restarts=0, max_concurrency=4)(WorkerActor)


@dataclass
class _Worker:
    worker_id: str
    role: str
    tp_size: int
    pg: object
    actor: object
    start_ref: object = None  # ObjectRef of actor.start(): the serialized WorkerInfo
    info: wpb.WorkerInfo | None = None
    started: float = field(default_factory=time.monotonic)


class Controller:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.registry = WorkerRegistry()
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._started_ray = False
        self.num_replaced = 0
        self.replace_backoff_s = 10.0
        self._backoff_until: dict[str, float] = {}

    @property
    def registry_address(self) -> str | None:
        return self.registry.address

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> str:
        """Start or join Ray, serve the registry, and bring every pool up; returns the registry address."""
        cfg = self.config
        if not ray.is_initialized():
            if cfg.ray_address is None:
                need = sum(n * tp * cfg.num_cpus_per_rank for _, n, tp in cfg.pools())
                ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
                         object_store_memory=128 << 20, log_to_driver=True)
            else:
                ray.init(address=cfg.ray_address, log_to_driver=True)
            self._started_ray = True
        self.host = cfg.host or ("127.0.0.1" if cfg.ray_address is None else get_node_ip_address())
        self.registry.serve(self.host, cfg.registry_port, cfg.internal_tls)
        launched = [self._launch(role, tp) for role, n, tp in cfg.pools() for _ in range(n)]
        for w in launched:
            self._await_ready(w)
        self._monitor = threading.Thread(target=self._watch, name="tandem-health", daemon=True)
        self._monitor.start()
        log.info("cluster up: %s", ", ".join(f"{w.role} {w.worker_id} at {w.info.address}" for w in launched))
        return self.registry.address

    def stop(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10)
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            self.registry.remove(w.worker_id)
        stops = [w.actor.stop.remote() for w in workers]
        try:
            ray.get(stops, timeout=30)
        except Exception:  # noqa: BLE001 - killed below either way
            pass
        for w in workers:
            self._destroy(w)
        self.registry.stop()
        if self._started_ray:
            ray.shutdown()

    # --- workers --------------------------------------------------------------------------------------

    def _launch(self, role: str, tp: int) -> _Worker:
        cfg = self.config
        bundle = {"CPU": cfg.num_cpus_per_rank}
        if cfg.num_gpus_per_rank:
            bundle["GPU"] = cfg.num_gpus_per_rank
        worker_id = f"{role}-{uuid.uuid4().hex[:8]}"
        pg = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=f"tandem-{worker_id}")
        wcfg = WorkerConfig(
            role=role, engine=cfg.engine_options, host=cfg.host or ("127.0.0.1" if cfg.ray_address is None else ""),
            worker_id=worker_id, kv_transport=cfg.resolved_kv_transport, kv_lease_s=cfg.kv_lease_s,
            torch_threads=cfg.torch_threads or max(1, int(cfg.num_cpus_per_rank)), internal_tls=cfg.internal_tls,
            redis_url=cfg.redis_url, kv_offload=cfg.resolved_kv_offload,
        )
        actor = _RemoteWorker.options(
            num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank, name=f"tandem-{worker_id}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(wcfg)
        w = _Worker(worker_id, role, tp, pg, actor)
        w.start_ref = actor.start.remote()
        with self._lock:
            self._workers[worker_id] = w
        return w

    def _await_ready(self, w: _Worker) -> None:
        try:
            info = wpb.WorkerInfo.FromString(ray.get(w.start_ref, timeout=self.config.worker_start_timeout_s))
        except Exception:
            self._forget(w)
            raise
        w.info = info
        self.registry.add(info)

    def _forget(self, w: _Worker) -> None:
        with self._lock:
            self._workers.pop(w.worker_id, None)
        self.registry.remove(w.worker_id)
        self._destroy(w)

    @staticmethod
    def _destroy(w: _Worker) -> None:
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            remove_placement_group(w.pg)
        except Exception:  # noqa: BLE001
            pass

    def _watch(self) -> None:
        """Ping every ready worker; a dead one, or one stuck past health_check_timeout_s (see ClusterConfig for
        the choice), leaves the registry at once and is replaced."""
        cfg = self.config
        while not self._stop.wait(cfg.health_check_period_s):
            with self._lock:
                ready = [w for w in self._workers.values() if w.info is not None]
            pings = {w.worker_id: (w, w.actor.ping.remote()) for w in ready}
            for worker_id, (w, ref) in pings.items():
                if self._stop.is_set():
                    return
                try:
                    ray.get(ref, timeout=cfg.health_check_timeout_s)
                    continue
                except (RayActorError, GetTimeoutError, RuntimeError) as e:
                    log.warning("worker %s (%s) is unhealthy (%s); replacing it", worker_id, w.role, type(e).__name__)
                except Exception as e:  # noqa: BLE001 - any failure to answer counts as dead
                    log.warning("worker %s (%s) failed its health check: %s; replacing it", worker_id, w.role, e)
                self._forget(w)
            try:
                self._reconcile()
            except Exception:  # noqa: BLE001 - keep watching; the next round tries again
                log.exception("could not launch replacement workers")

    def _reconcile(self) -> None:
        """Start a replacement for every worker a pool is short of (dead, or a replacement that failed to start).
        A pool whose last start failed waits `replace_backoff_s` before trying again."""
        now = time.monotonic()
        for role, n, tp in self.config.pools():
            with self._lock:
                have = sum(w.role == role for w in self._workers.values())
            if have >= n or now < self._backoff_until.get(role, 0.0):
                continue
            for _ in range(n - have):
                w = self._launch(role, tp)
                threading.Thread(target=self._replace, args=(w,), daemon=True).start()

    def _replace(self, w: _Worker) -> None:
        try:
            self._await_ready(w)
            self.num_replaced += 1
            log.info("replacement %s worker %s ready at %s", w.role, w.worker_id, w.info.address)
        except Exception:  # noqa: BLE001 - the pool stays short; _reconcile tries again after the backoff
            log.exception("could not start a replacement %s worker", w.role)
            self._backoff_until[w.role] = time.monotonic() + self.replace_backoff_s

    def workers(self) -> list[wpb.WorkerInfo]:
        return self.registry.workers()

    def worker_stats(self, timeout_s: float = 10.0) -> list[wpb.WorkerStats]:
        """Every registered worker's GetStats, asked over gRPC as a router would."""
        stats = []
        for info in self.registry.workers():
            with tls.channel(info.address, self.config.internal_tls) as channel:
                stats.append(worker_pb2_grpc.WorkerStub(channel).GetStats(wpb.GetStatsRequest(), timeout=timeout_s))
        return stats
