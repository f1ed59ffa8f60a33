"""The cluster controller: starts or joins Ray, creates the worker pools, keeps the registry current and
replaces dead workers.

Each worker is a Ray actor in its own STRICT_PACK placement group (one bundle per TP rank). The actor runs a
WorkerServer (engine loop + gRPC Worker service + KV transport) and reports where it listens; routers find it
through the registry and talk to it over gRPC, never through Ray. With TP > 1 it is rank 0, and ranks 1..N-1 are
TPRankActors in the other bundles (cluster/tp_ranks.py); any rank that dies takes the whole worker with it.

Pool sizes can change while it runs (`scale_pool`, the autoscaler's actuator): new workers start in the
background; a worker that leaves drains first: the registry marks it draining (routers send it no new request),
and it is stopped once its GetStats shows nothing running, waiting or held, or after `drain_timeout_s`.

On Kubernetes (`tandem controller`, KubeRay) each worker asks for the Ray resource `tandem_<role>` that one pod of
its worker group offers (`pool_resources`), and each pool's size follows the nodes offering it (`follow_nodes`):
the RayCluster's worker group replicas size the pools.
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
from ray.util import get_node_ip_address, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from cluster.pools import PoolReplicas
from cluster.registry import NotResizable, WorkerRegistry
from cluster.tp_ranks import TPRankActor, rendezvous_address
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

    def rendezvous(self) -> str:
        """TP > 1: where this rank 0 and the TPRankActors meet (a free port on this node)."""
        return rendezvous_address(self.config.host or get_node_ip_address())

    def start(self, tp_init_method: str | None = None) -> bytes:
        host = self.config.host or get_node_ip_address()
        self.server = WorkerServer(dataclasses.replace(self.config, host=host, tp_init_method=tp_init_method))
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
_RemoteRank = ray.remote(max_restarts=0)(TPRankActor)


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
    draining: bool = False
    node_id: str | None = None  # the Ray node its placement group landed on, once known (follow_nodes)
    ranks: list = field(default_factory=list)  # TP > 1: the TPRankActors of ranks 1..N-1
    rank_refs: list = field(default_factory=list)  # their run() calls, which end only with the group


class Controller:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.registry = WorkerRegistry()
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._reconciling = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._started_ray = False
        self.num_replaced = 0
        self.replace_backoff_s = 10.0
        self._backoff_until: dict[str, float] = {}
        self._desired = {role: n for role, n, _ in config.pools()}
        self._tp = {role: tp for role, _, tp in config.pools()}
        self.drain_poll_s = 0.5
        self.drain_quiet_s = 2.0  # idle this long before it stops: routers poll the registry every second
        self._drains: dict[str, threading.Thread] = {}  # by worker id, while it drains
        self._drained_nodes: set[str] = set()  # Ray node ids of workers drained by DrainWorker: not counted by follow_nodes
        self.registry.control = self  # ScalePool, GetPools, DrainWorker

    @property
    def registry_address(self) -> str | None:
        return self.registry.address

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> str:
        """Start or join Ray, serve the registry, and bring every pool up; returns the registry address."""
        cfg = self.config
        if not ray.is_initialized():
            if cfg.ray_address is None:
                # CPUs for every worker a pool may be scaled to, or scaled-up workers would wait forever.
                need = sum(cfg.max_workers(role) * tp * cfg.num_cpus_per_rank for role, _, tp in cfg.pools())
                # address="local": a cluster of our own even when another Ray runs on this machine (or RAY_ADDRESS
                # is set), which ray.init would otherwise join, refusing num_cpus.
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                         include_dashboard=False, object_store_memory=128 << 20, log_to_driver=True)
            else:
                ray.init(address=cfg.ray_address, log_to_driver=True)
            self._started_ray = True
        self.host = cfg.host or ("127.0.0.1" if cfg.ray_address is None else get_node_ip_address())
        self.registry.serve(cfg.registry_host or self.host, cfg.registry_port, cfg.internal_tls)
        if cfg.follow_nodes:
            with self._lock:
                self._desired.update(pool_sizes_from_nodes(ray.nodes(), self._desired, self._drained_nodes))
        why = ("kv_transport auto: one host" if cfg.ray_address is None else "kv_transport auto: the Ray cluster "
               "may span hosts") if cfg.kv_transport == "auto" else "kv_transport set"
        log.info("KV transport: %s (%s); %s", cfg.resolved_kv_transport, why,
                 ", ".join(f"{role} TP {tp}" for role, tp in self._tp.items()))
        launched = [self._launch(role, self._tp[role]) for role, n in self._desired.items() for _ in range(n)]
        for w in launched:
            self._await_ready(w)
        self._monitor = threading.Thread(target=self._watch, name="tandem-health", daemon=True)
        self._monitor.start()
        log.info("cluster up: %s", ", ".join(f"{w.role} {w.worker_id} at {w.info.address}" for w in launched
                                             if w.info is not None) or "no workers yet")
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
        bundles = [dict(bundle) for _ in range(tp)]
        if cfg.pool_resources:
            bundles[0][pool_resource(role)] = 1
        pg = placement_group(bundles, strategy="STRICT_PACK", name=f"tandem-{worker_id}")
        engine = cfg.engine_options if tp == 1 else {**cfg.engine_options, "tensor_parallel_size": tp}
        torch_threads = cfg.torch_threads or max(1, int(cfg.num_cpus_per_rank))
        wcfg = WorkerConfig(
            role=role, engine=engine, host=cfg.host or ("127.0.0.1" if cfg.ray_address is None else ""),
            worker_id=worker_id, kv_transport=cfg.resolved_kv_transport, kv_lease_s=cfg.kv_lease_s,
            torch_threads=torch_threads, internal_tls=cfg.internal_tls,
            redis_url=cfg.redis_url, kv_offload=cfg.resolved_kv_offload,
        )
        actor = _RemoteWorker.options(
            num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank, name=f"tandem-{worker_id}",
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(wcfg)
        w = _Worker(worker_id, role, tp, pg, actor)
        if tp == 1:
            w.start_ref = actor.start.remote()
        else:
            # One ObjectRef for the address: Ray hands its value to rank 0 and every rank, nobody waits here.
            address = actor.rendezvous.remote()
            w.ranks = [_RemoteRank.options(
                num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank, name=f"tandem-{worker_id}-tp{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(engine, rank, tp, torch_threads) for rank in range(1, tp)]
            w.rank_refs = [r.run.remote(address) for r in w.ranks]
            w.start_ref = actor.start.remote(address)
        with self._lock:
            self._workers[worker_id] = w
        return w

    def _await_ready(self, w: _Worker) -> None:
        try:
            if w.rank_refs:  # a rank that fails to start fails the worker now, not at rank 0's collective timeout
                done, _ = ray.wait([w.start_ref, *w.rank_refs], num_returns=1,
                                   timeout=self.config.worker_start_timeout_s)
                if done and w.start_ref not in done:
                    ray.get(done[0])  # raises the rank's failure
                    raise RuntimeError(f"worker {w.worker_id}: a TP rank ended while the worker started")
            info = wpb.WorkerInfo.FromString(ray.get(w.start_ref, timeout=self.config.worker_start_timeout_s))
        except Exception:
            if w.draining:  # stopped by a scale-down while it started: not a failure
                return
            self._forget(w)
            raise
        with self._lock:
            w.info = info
            if w.draining or w.worker_id not in self._workers:
                return
            self.registry.add(info)

    def _forget(self, w: _Worker) -> None:
        with self._lock:
            self._workers.pop(w.worker_id, None)
        self.registry.remove(w.worker_id)
        self._destroy(w)

    @staticmethod
    def _destroy(w: _Worker) -> None:
        for actor in (w.actor, *w.ranks):
            try:
                ray.kill(actor, no_restart=True)
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
            if cfg.follow_nodes:
                try:
                    self._follow_nodes()
                except Exception:  # noqa: BLE001 - the GCS may be briefly unreachable; the next round tries again
                    log.exception("could not read the Ray nodes")
            with self._lock:
                ready = [w for w in self._workers.values() if w.info is not None]
            pings = {w.worker_id: (w, w.actor.ping.remote()) for w in ready}
            for worker_id, (w, ref) in pings.items():
                if self._stop.is_set():
                    return
                try:
                    ray.get(ref, timeout=cfg.health_check_timeout_s)
                    if not _ranks_alive(w):
                        log.warning("worker %s (%s): a TP rank is gone; replacing the whole worker", worker_id, w.role)
                        self._forget(w)
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
        with self._reconciling:  # the health loop and scale_pool's caller: counted and launched by one at a time
            for role, tp in self._tp.items():
                with self._lock:
                    n = self._desired[role]
                    have = sum(w.role == role and not w.draining for w in self._workers.values())
                if have >= n or now < self._backoff_until.get(role, 0.0):
                    continue
                for _ in range(n - have):
                    w = self._launch(role, tp)
                    threading.Thread(target=self._replace, args=(w,), daemon=True).start()

    def _replace(self, w: _Worker) -> None:
        try:
            self._await_ready(w)
            if w.draining:
                return
            self.num_replaced += 1
            log.info("new %s worker %s ready at %s", w.role, w.worker_id, w.info.address)
        except Exception:  # noqa: BLE001 - the pool stays short; _reconcile tries again after the backoff
            log.exception("could not start a replacement %s worker", w.role)
            self._backoff_until[w.role] = time.monotonic() + self.replace_backoff_s

    # --- pool sizes -----------------------------------------------------------------------------------

    def pool_status(self) -> dict[str, PoolReplicas]:
        """Per pool: its desired size, and its workers ready, starting and draining."""
        with self._lock:
            out = {}
            for role, desired in self._desired.items():
                mine = [w for w in self._workers.values() if w.role == role]
                out[role] = PoolReplicas(
                    desired=desired,
                    ready=sum(w.info is not None and not w.draining for w in mine),
                    starting=sum(w.info is None and not w.draining for w in mine),
                    draining=sum(w.draining for w in mine))
            return out

    def scale_pool(self, role: str, replicas: int) -> None:
        """Set a pool's size. Returns at once: new workers start in the background, leaving ones drain there.
        Those that leave: workers still starting first (stopped at once), then the least loaded ready ones (requests
        running, waiting or holding KV, from GetStats; the newest among equals: the least prefix cache lost).
        ValueError naming the argument for a pool this cluster lacks or a negative size; NotResizable with
        follow_nodes (the nodes size the pools: resize the RayCluster's worker groups)."""
        if self.config.follow_nodes:
            raise NotResizable("this controller's pools follow the Ray nodes (follow_nodes): resize the RayCluster's "
                               "worker groups instead")
        self._scale(role, replicas)

    def _scale(self, role: str, replicas: int) -> None:
        if role not in self._desired:
            raise ValueError(f"role: must be one of {', '.join(self._desired)}, got {role!r}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ValueError(f"replicas: must be an integer >= 0, got {replicas!r}")
        if self.config.ray_address is None and replicas > self.config.max_workers(role):
            # A local Ray was started with the CPUs for that many (a joined one has what its nodes offer).
            raise ValueError(f"replicas: at most {self.config.max_workers(role)} (the cluster's "
                             f"max_workers_per_pool), got {replicas}")
        with self._lock:
            ready = [w for w in self._workers.values() if w.role == role and not w.draining and w.info is not None]
            shrinking = len([w for w in self._workers.values() if w.role == role and not w.draining]) > replicas
        loads = self._loads(ready) if shrinking else {}  # outside the lock: RPCs
        with self._lock:
            before = self._desired[role]
            self._desired[role] = replicas
            active = [w for w in self._workers.values() if w.role == role and not w.draining]
            leaving = sorted(active, key=lambda w: (w.info is not None, loads.get(w.worker_id, 0), -w.started))
            leaving = leaving[:max(len(active) - replicas, 0)]
            for w in leaving:
                w.draining = True
            self._backoff_until.pop(role, None)
        if before != replicas:
            log.info("pool %s: %d -> %d workers", role, before, replicas)
        for w in leaving:
            self._start_drain(w)
        if not self._stop.is_set():
            self._reconcile()

    def drain_workers(self, worker_id: str = "", node_ip: str = "", wait: bool = False) -> list[str]:
        """Drain one worker (`worker_id`) or every ready worker on a node (`node_ip`: a pod going away), shrinking
        their pools by as many; with `wait`, return when they have stopped. Returns their ids. ValueError without a
        target, LookupError when no worker matches."""
        if not worker_id and not node_ip:
            raise ValueError("target: set worker_id or node_ip")
        with self._lock:
            matches = [w for w in self._workers.values()
                       if (w.worker_id == worker_id if worker_id else w.info is not None and w.info.node_ip == node_ip)]
            if not matches:
                what = f"worker_id: no worker {worker_id!r}" if worker_id else f"node_ip: no ready worker on {node_ip!r}"
                raise LookupError(f"{what}; workers: {', '.join(sorted(self._workers)) or 'none'}")
            fresh = [w for w in matches if not w.draining]
            for w in fresh:
                w.draining = True
                self._desired[w.role] = max(self._desired[w.role] - 1, 0)
        if self.config.follow_nodes:  # its node (a pod going away) no longer counts, or another would start there
            nodes = {w.node_id or _node_of(w.pg) for w in fresh}
            with self._lock:
                self._drained_nodes |= nodes - {None}
        for w in fresh:
            log.info("draining %s worker %s (asked for)", w.role, w.worker_id)
            self._start_drain(w)
        if wait:
            deadline = time.monotonic() + self.config.drain_timeout_s + 40  # the drain, then stop's own bound
            for w in matches:
                thread = self._drains.get(w.worker_id)
                if thread is not None:
                    thread.join(max(deadline - time.monotonic(), 0))
        return [w.worker_id for w in matches]

    def _loads(self, workers: list[_Worker]) -> dict[str, int]:
        """Requests on each worker (running, waiting, holding KV); 0 for one that does not answer in 1 s."""
        loads = {}
        for w in workers:
            try:
                loads[w.worker_id] = self._num_busy(w.info, timeout_s=1)
            except Exception:  # noqa: BLE001 - silent: a good one to let go
                loads[w.worker_id] = 0
        return loads

    def _num_busy(self, info: wpb.WorkerInfo, timeout_s: float) -> int:
        """The requests a worker has (running, waiting, holding KV for a hand-off), from its GetStats."""
        with tls.channel(info.address, self.config.internal_tls) as channel:
            s = worker_pb2_grpc.WorkerStub(channel).GetStats(wpb.GetStatsRequest(), timeout=timeout_s)
        return s.num_running + s.num_waiting + s.num_kv_held

    def _start_drain(self, w: _Worker) -> None:
        thread = threading.Thread(target=self._drain, args=(w,), name=f"tandem-drain-{w.worker_id}", daemon=True)
        self._drains[w.worker_id] = thread
        thread.start()

    def _follow_nodes(self) -> None:
        """follow_nodes: a worker whose node left is forgotten (not replaced elsewhere), then each pool is sized to
        the alive nodes offering its resource."""
        nodes = ray.nodes()
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        with self._lock:
            self._drained_nodes &= alive
            workers = list(self._workers.values())
        for w in workers:
            if w.node_id is None:
                w.node_id = _node_of(w.pg)
            if w.node_id is not None and w.node_id not in alive:
                log.warning("%s worker %s: its node %s left", w.role, w.worker_id, w.node_id[:12])
                self._forget(w)
        for role, n in pool_sizes_from_nodes(nodes, self._desired, self._drained_nodes).items():
            if n != self._desired[role]:
                self._scale(role, n)

    def _drain(self, w: _Worker) -> None:
        """Mark `w` draining in the registry, wait until it holds no request (or drain_timeout_s), stop it."""
        try:
            self._drain_and_stop(w)
        finally:
            self._drains.pop(w.worker_id, None)

    def _drain_and_stop(self, w: _Worker) -> None:
        if w.info is not None:
            with self._lock:
                if self._workers.get(w.worker_id) is w:  # not forgotten (dead) meanwhile: no ghost entry
                    self.registry.add(_draining(w.info))
            deadline = time.monotonic() + self.config.drain_timeout_s
            idle_since = None
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    busy = self._num_busy(w.info, timeout_s=5)
                except Exception:  # noqa: BLE001 - gone already: nothing left to wait for
                    break
                now = time.monotonic()
                if busy:
                    idle_since = None
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= self.drain_quiet_s:
                    break
                time.sleep(self.drain_poll_s)
            else:
                if not self._stop.is_set():
                    log.warning("worker %s still busy after drain_timeout_s (%.0f s): stopping it; the routers move "
                                "its requests", w.worker_id, self.config.drain_timeout_s)
        with self._lock:
            if self._workers.get(w.worker_id) is not w:
                return  # stop() took it
        if w.info is not None:
            try:
                ray.get(w.actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - killed below either way
                pass
        self._forget(w)
        log.info("%s worker %s drained and stopped", w.role, w.worker_id)

    def workers(self) -> list[wpb.WorkerInfo]:
        return self.registry.workers()

    def worker_stats(self, timeout_s: float = 10.0) -> list[wpb.WorkerStats]:
        """Every registered worker's GetStats, asked over gRPC as a router would."""
        stats = []
        for info in self.registry.workers():
            with tls.channel(info.address, self.config.internal_tls) as channel:
                stats.append(worker_pb2_grpc.WorkerStub(channel).GetStats(wpb.GetStatsRequest(), timeout=timeout_s))
        return stats


def _ranks_alive(w: _Worker) -> bool:
    """Whether every TP rank of `w` still runs: their run() calls end only with the group (or with the rank)."""
    if not w.rank_refs:
        return True
    done, _ = ray.wait(w.rank_refs, num_returns=len(w.rank_refs), timeout=0)
    return not done


def _draining(info: wpb.WorkerInfo) -> wpb.WorkerInfo:
    marked = wpb.WorkerInfo()
    marked.CopyFrom(info)
    marked.draining = True
    return marked


def pool_resource(role: str) -> str:
    """The Ray resource a worker of `role` asks for with pool_resources (a KubeRay worker group's pods offer it)."""
    return f"tandem_{role}"


def pool_sizes_from_nodes(nodes: list[dict], roles, drained_node_ids=frozenset()) -> dict[str, int]:
    """follow_nodes: each pool's size, the sum of its `tandem_<role>` resource over the alive nodes (`ray.nodes()`
    records), leaving out the nodes of workers drained through DrainWorker (their pods are going away)."""
    sizes = dict.fromkeys(roles, 0)
    for node in nodes:
        if not node.get("Alive") or node.get("NodeID") in drained_node_ids:
            continue
        resources = node.get("Resources") or {}
        for role in sizes:
            sizes[role] += int(resources.get(pool_resource(role), 0))
    return sizes


def _node_of(pg) -> str | None:
    """The node a worker's placement group's first bundle is on; None while it is pending."""
    try:
        return placement_group_table(pg).get("bundles_to_node_id", {}).get(0)
    except Exception:  # noqa: BLE001 - removed or unknown: not placed
        return None
