"""Router configuration: one frozen record, validated at construction."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from tandem.redis_store.client import StoreConfig
from tandem.tls import TLSConfig

from router.cache.semantic.config import SemanticCacheConfig
from router.tenants import TenancyConfig

MODES = ("disaggregated", "colocated")
# cache_aware: the worker with the least prefill work ahead of the first token, from the global prefix index;
# load: queued tokens and free blocks only (no index).
ROUTING_POLICIES = ("cache_aware", "load")
# What the router does when a decode worker cannot load a request's KV from its prefill worker (llm-d's and vLLM's
# name): recompute: Decode again on that worker without KV, which prefills the prompt itself; fail: end the request
# with UNAVAILABLE (for deployments where a silent recompute would break a latency budget or hide a broken KV path).
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port; Router.start() returns the address actually bound.
    port: int = 50051
    # The OpenAI-compatible HTTP front, on its own port (vLLM's default): 0 picks a free port, -1 turns it off.
    http_port: int = 8000
    # host:port of the cluster's Registry service.
    registry_address: str = ""
    # Where the tokenizer comes from (None: the default SmolLM2 GGUF); its name is the model the router serves
    # and must be what the workers report in WorkerInfo.model.
    model: str | None = None
    load_format: str = "auto"
    mode: str = "disaggregated"
    # Per pool: requests admitted by this router that have not yet had their first token from that pool.
    max_queued_requests: int = 256
    # Refuse at admission a request whose estimated queue time exceeds this (0: only its deadline bounds it).
    max_queue_time_s: float = 0.0
    # API keys, tenants, their limits and priorities (router/tenants.py); none: auth off, only on loopback.
    tenancy: TenancyConfig = TenancyConfig()
    # Conditional disaggregation: a prompt whose uncached part is shorter than this is prefilled on the decode
    # worker itself (0: always disaggregate). Ignored in colocated mode.
    max_local_prefill_length: int = 64
    # How long a prefill worker holds a request's KV for the decode worker (0: the worker's default).
    kv_lease_ms: int = 0
    # Times a request may move to another decode worker after its decode worker failed mid-stream.
    max_migrations: int = 3
    # A failed KV hand-off (the decode worker's pull refused "kv: ...", or the prefill worker stalled during it):
    # one of KV_LOAD_FAILURE_POLICIES.
    kv_load_failure_policy: str = "recompute"
    # Times a prefill may be retried on another prefill worker after its worker became unavailable.
    max_prefill_retries: int = 3
    # MatchPrefix is a hint: past this the request is disaggregated without it.
    match_prefix_timeout_s: float = 0.05
    registry_poll_interval_s: float = 1.0
    stats_poll_interval_s: float = 0.1
    # A worker that answers no GetStats for this long is marked down and the calls in flight there are cancelled
    # and moved to other workers (a stopped or hung process keeps its connections open: only silence shows it).
    # 1.5 s is 15 polls; a worker answers stats from a snapshot, off its engine thread, within milliseconds even
    # while it computes, so only a process that is not running stays silent this long.
    worker_stall_timeout_s: float = 1.5
    # How long stop() lets in-flight requests finish when no grace is given.
    drain_timeout_s: float = 30.0
    # TLS on both client fronts (gRPC port and HTTP port), vLLM's names: certificate and key; with ssl_ca_certs,
    # clients must present a certificate it signed (mTLS) unless ssl_cert_reqs is 0. See tandem/tls.py.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int | None = None
    # Mutual TLS to the registry and the workers (TLSConfig.internal); None: plaintext.
    internal_tls: TLSConfig | None = None
    # Chat message content is text by default: control markers in it (`<|im_end|>`) become ordinary tokens.
    # True restores the raw behaviour, where content can write the template's control tokens.
    chat_content_special_tokens: bool = False
    # Redis beside the router (tandem/redis_store/): the global prefix index and the semantic cache. None: no
    # Redis; cache_aware routing then has no index and routes by load.
    redis_url: str | None = None
    routing_policy: str = "cache_aware"
    # cache_aware's hot-spot guard (router/policy.py `Balance`, SGLang's names): the worker the cache picks loses to
    # the load choice when it has more than balance_abs_threshold requests more than the least loaded worker and
    # more than balance_rel_threshold times as many.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    # The semantic response cache (router/cache/semantic/), for requests that opt in; None: off. Needs redis_url.
    semantic_cache: SemanticCacheConfig | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(f"routing_policy: must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing_policy!r}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold: must be >= 0, got {self.balance_abs_threshold}")
        if not 1.0 <= self.balance_rel_threshold < float("inf"):
            raise ValueError(f"balance_rel_threshold: must be >= 1, got {self.balance_rel_threshold}")
        if self.redis_url is not None:
            StoreConfig(self.redis_url)  # checks the URL's scheme
        if self.semantic_cache is not None and self.redis_url is None:
            raise ValueError("semantic_cache: needs redis_url (the cache's entries live in Redis)")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if not self.host:
            raise ValueError("host: must be a host name or address, got ''")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be in [0, 65535] (0 picks a free port), got {self.port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port: must be in [0, 65535] (0 picks a free port) or -1 (off), got {self.http_port}")
        if self.http_port > 0 and self.http_port == self.port:
            raise ValueError(f"http_port: must differ from port (the gRPC port); both are {self.port}")
        if not self.registry_address or ":" not in self.registry_address:
            raise ValueError(f"registry_address: must be host:port, got {self.registry_address!r}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {self.max_queued_requests}")
        if not 0 <= self.max_queue_time_s < float("inf"):
            raise ValueError(f"max_queue_time_s: must be >= 0 (0: no limit), got {self.max_queue_time_s}")
        self.tenancy.check_host(self.host)
        if self.max_local_prefill_length < 0:
            raise ValueError(f"max_local_prefill_length: must be >= 0, got {self.max_local_prefill_length}")
        if not 0 <= self.kv_lease_ms <= 3_600_000:
            raise ValueError(f"kv_lease_ms: must be in [0, 3600000] (0: the worker's default), got {self.kv_lease_ms}")
        if self.kv_load_failure_policy not in KV_LOAD_FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy: must be one of {', '.join(KV_LOAD_FAILURE_POLICIES)}, "
                             f"got {self.kv_load_failure_policy!r}")
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations: must be >= 0, got {self.max_migrations}")
        if self.max_prefill_retries < 0:
            raise ValueError(f"max_prefill_retries: must be >= 0, got {self.max_prefill_retries}")
        for name in ("match_prefix_timeout_s", "registry_poll_interval_s", "stats_poll_interval_s",
                     "worker_stall_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not self.worker_stall_timeout_s > self.stats_poll_interval_s:
            raise ValueError(f"worker_stall_timeout_s: must be > stats_poll_interval_s ({self.stats_poll_interval_s}), "
                             f"got {self.worker_stall_timeout_s}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")
        _ = self.ssl  # checks the files now

    @cached_property
    def ssl(self) -> TLSConfig | None:
        """The client fronts' TLS, or None (plaintext)."""
        return TLSConfig.front(self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certs, self.ssl_cert_reqs)

    @property
    def pools(self) -> tuple[str, ...]:
        """The worker pools requests need: prefill and decode, or one pool of role "both"."""
        return ("prefill", "decode") if self.mode == "disaggregated" else ("both",)
