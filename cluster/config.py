"""What a cluster is made of: the pools, their sizes and TP, the model and the KV transport."""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.tls import TLSConfig
from workers.config import EngineConfig
from workers.kv_transfer import KV_TRANSPORTS, cuda_ipc, nixl
from workers.model.loader import load_model_config, resolve_model
from workers.parallel import check_tp_size

KV_OFFLOAD = ("auto", "on", "off")

MODES = ("disaggregated", "colocated")


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct GGUF)
    mode: str = "disaggregated"
    # Disaggregated mode runs prefill and decode pools; colocated mode runs one pool of "both" workers.
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    num_colocated_workers: int = 1
    # Ranks per worker, one Ray actor per device in a STRICT_PACK placement group (cluster/tp_ranks.py). Prefill
    # and decode may differ: the decode worker regroups the prefill group's KV shards for its own size.
    prefill_tensor_parallel_size: int = 1
    decode_tensor_parallel_size: int = 1
    # LLMEngine options for every worker (EngineConfig.from_kwargs names).
    engine: dict = field(default_factory=dict)
    # "auto": shm when Ray is local (one host), tcp when joining a Ray cluster that may span hosts.
    kv_transport: str = "auto"
    kv_lease_s: float = 30.0
    # Ray: None starts a local cluster; "auto" or "host:port" joins one.
    ray_address: str | None = None
    # Resources of one rank. CPU ranks also get this many torch threads.
    num_cpus_per_rank: float = 1
    num_gpus_per_rank: float = 0
    torch_threads: int | None = None
    # Where workers and the registry listen; None: this node's IP when joining a Ray cluster, else 127.0.0.1.
    host: str | None = None
    registry_port: int = 0
    # Where the registry listens when not `host` (tandem controller on Kubernetes: 0.0.0.0, for routers in other pods).
    registry_host: str | None = None
    # Each worker's placement group also asks for one unit of the Ray resource `tandem_<role>` (in its first
    # bundle): on KubeRay, the pods of the prefill and decode worker groups offer 1 each, so one worker lands per pod.
    pool_resources: bool = False
    # Each pool's size follows the alive Ray nodes (the sum of their `tandem_<role>` resource), read every health
    # check: a RayCluster's worker group replicas size the pools, and a worker whose node left is not replaced.
    follow_nodes: bool = False
    health_check_period_s: float = 1.0
    # A worker that does not answer its ping for this long is declared dead: it leaves the registry and is
    # replaced. Routers already route around a silent worker after their worker_stall_timeout_s (1.5 s) and move
    # its requests, so this only decides when to give up on it: a pause of a few seconds (GC, swapping, a busy
    # host) passes and keeps the worker and its prefix cache, while a replacement costs a model load (15-30 s on
    # CPU) during which the pool is one short.
    health_check_timeout_s: float = 10.0
    worker_start_timeout_s: float = 600.0
    # A worker leaving its pool (Controller.scale_pool) takes no new requests and is stopped when it has none left,
    # or after this long (then the routers move its streams elsewhere, as for a failed worker).
    drain_timeout_s: float = 60.0
    # The most workers a pool may be scaled to (Controller.scale_pool); None: its initial size. A local Ray is
    # started with the CPUs (and GPUs) for that many, or new workers would wait for resources forever.
    max_workers_per_pool: int | None = None
    # Mutual TLS between the registry, routers and workers, KV transfer included (TLSConfig.internal); None: plaintext.
    internal_tls: TLSConfig | None = None
    # The Redis every worker publishes KV events to (tandem up starts an embedded one when not given).
    redis_url: str | None = None
    # The remote KV tier in that Redis (workers/kv_tier). auto: on for CPU workers, where pulling an evicted
    # 1.5k-token prefix measured 6x faster than recomputing it (docs/benchmarks.md); off on GPUs, not measured.
    kv_offload: str = "auto"

    def __post_init__(self):
        if self.kv_offload not in KV_OFFLOAD:
            raise ValueError(f"kv_offload: must be one of {', '.join(KV_OFFLOAD)}, got {self.kv_offload!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.kv_transport not in ("auto", *KV_TRANSPORTS):
            raise ValueError(f"kv_transport: must be one of auto, {', '.join(KV_TRANSPORTS)}, got {self.kv_transport!r}")
        if self.kv_transport == "nixl":
            nixl.nixl_api()  # ValueError naming kv_transport, now rather than in every worker
        if self.kv_transport == "cuda_ipc":
            cuda_ipc.require_cuda()  # the same, for a cluster that has no GPU to move KV between
        for name in ("num_prefill_workers", "num_decode_workers", "num_colocated_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("prefill_tensor_parallel_size", "decode_tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_workers_per_pool is not None and self.max_workers_per_pool < max(n for _, n, _ in self.pools()):
            raise ValueError(f"max_workers_per_pool: must be >= every pool's initial size, got "
                             f"{self.max_workers_per_pool}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")
        if {"model", "tensor_parallel_size", "role"} & set(self.engine):
            raise ValueError("engine: set model, tensor_parallel_size and role through the cluster options, "
                             "not engine options")
        # Checked here, before Ray starts, as each worker's engine will: a bad option is refused by name at once
        # instead of failing every worker start.
        engine = EngineConfig.from_kwargs(**self.engine_options)
        if self.prefill_tensor_parallel_size > 1 or self.decode_tensor_parallel_size > 1:
            self._check_tp_sizes(engine)

    def _check_tp_sizes(self, engine: EngineConfig) -> None:
        """Each pool's TP size against the model's heads, as its workers' engines will check it: refused here rather
        than after Ray has placed (or waited forever to place) that many ranks. Skipped when the model is not
        readable on this host (a Ray cluster whose nodes hold it): the workers check it there."""
        try:
            model = load_model_config(resolve_model(engine.model, engine.load_format))
        except Exception:  # noqa: BLE001 - unreadable here, for whatever reason: the workers report it
            return
        names = ("decode_tensor_parallel_size",) if self.mode == "colocated" else (
            "prefill_tensor_parallel_size", "decode_tensor_parallel_size")
        for name in names:
            check_tp_size(getattr(self, name), model.num_attention_heads, model.num_key_value_heads, name)

    @property
    def engine_options(self) -> dict:
        """What every worker's LLMEngine gets: the engine options plus the model."""
        return {**self.engine, "model": self.model} if self.model is not None else dict(self.engine)

    @property
    def resolved_kv_transport(self) -> str:
        if self.kv_transport != "auto":
            return self.kv_transport
        return "shm" if self.ray_address is None else "tcp"

    @property
    def resolved_kv_offload(self) -> bool:
        if self.redis_url is None or self.kv_offload == "off":
            return False
        return self.kv_offload == "on" or not self.num_gpus_per_rank

    def max_workers(self, role: str) -> int:
        """The most workers pool `role` may be scaled to."""
        n = {r: n for r, n, _ in self.pools()}[role]
        return n if self.max_workers_per_pool is None else self.max_workers_per_pool

    def pools(self) -> list[tuple[str, int, int]]:
        """(role, number of workers, TP size) per pool."""
        if self.mode == "colocated":
            return [("both", self.num_colocated_workers, self.decode_tensor_parallel_size)]
        return [("prefill", self.num_prefill_workers, self.prefill_tensor_parallel_size),
                ("decode", self.num_decode_workers, self.decode_tensor_parallel_size)]
