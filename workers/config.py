"""Engine configuration: one frozen record per component, composed into EngineConfig."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

ROLES = ("both", "prefill", "decode")
SCHEDULING_POLICIES = ("fcfs", "priority")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
# "auto": triton on CUDA, sdpa on CPU (workers/model/backends/).
ATTENTION_BACKENDS = ("auto", "triton", "sdpa")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # KV cache budget: explicit bytes win; otherwise a fraction of device memory on CUDA
    # (gpu_memory_utilization, as vLLM) and cpu_kv_cache_fraction of available RAM on CPU.
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_fraction: float = 0.25
    enable_prefix_caching: bool = True
    # Record prefix cache changes for LLMEngine.take_kv_events() (vLLM's name); workers with Redis publish them.
    enable_kv_cache_events: bool = False

    def __post_init__(self):
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size: must be a power of two in [1, 128], got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes: must be > 0, got {self.kv_cache_memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 < self.cpu_kv_cache_fraction <= 1:
            raise ValueError(f"cpu_kv_cache_fraction: must be in (0, 1], got {self.cpu_kv_cache_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens computed per step across all sequences (decodes count 1 each; prefill chunks fill the rest).
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    role: str = "both"

    def __post_init__(self):
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy: must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    # False: stop strings and text are someone else's (cluster workers: the router detokenizes).
    detokenize: bool = True
    attention_backend: str = "auto"
    # CUDA graphs for decode-only steps (workers/model/cuda_graph.py), as vLLM names them: enforce_eager turns
    # them off; cudagraph_capture_sizes are the padded batch sizes captured (None: 1, 2, 4, 8, 16, ... up to
    # max_num_seqs). Ignored on CPU, which has no graphs.
    enforce_eager: bool = False
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend: must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        # Only looked up, not imported: without CUDA the interpreter must be switched on before triton is imported
        # (workers/model/backends/triton_kernels.py).
        if self.attention_backend == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError("attention_backend: 'triton' needs the triton package (CUDA builds of torch ship it; "
                             "pip install triton for CPU tests), which is not installed; use 'auto' or 'sdpa'")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager: must be true or false, got {self.enforce_eager!r}")
        if self.cudagraph_capture_sizes is not None:
            sizes = self.cudagraph_capture_sizes
            if not isinstance(sizes, (list, tuple)) or not all(type(n) is int for n in sizes):
                raise ValueError(f"cudagraph_capture_sizes: must be a list of integers, got {sizes!r}")
            if not sizes or min(sizes) < 1 or max(sizes) > self.scheduler.max_num_seqs:
                raise ValueError(
                    f"cudagraph_capture_sizes: must be non-empty, each in [1, max_num_seqs={self.scheduler.max_num_seqs}],"
                    f" got {list(sizes)}"
                )
            object.__setattr__(self, "cudagraph_capture_sizes", tuple(sorted(set(sizes))))

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs) -> "EngineConfig":
        """Flat vLLM-style options (block_size=..., max_num_seqs=..., role=...) into the nested config."""
        cache_keys = CacheConfig.__dataclass_fields__.keys()
        sched_keys = {"max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "scheduling_policy", "role"}
        cache = {k: kwargs.pop(k) for k in list(kwargs) if k in cache_keys}
        sched = {k: kwargs.pop(k) for k in list(kwargs) if k in sched_keys}
        if "scheduling_policy" in sched:
            sched["policy"] = sched.pop("scheduling_policy")
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            allowed = sorted(set(cls.__dataclass_fields__) - {"cache", "scheduler"} | set(cache_keys) | sched_keys)
            raise ValueError(f"{sorted(unknown)[0]}: unknown engine option; allowed: {', '.join(allowed)}")
        return cls(model=model, cache=CacheConfig(**cache), scheduler=SchedulerConfig(**sched), **kwargs)
