"""tandem's inference engine: paged KV cache, continuous batching, tensor parallelism, KV hand-off.

`from workers import LLM, SamplingParams`. Names resolve lazily, so importing a submodule (say
workers.sampling_params) does not load the model code.
"""
from importlib import import_module

_EXPORTS = {
    "LLM": "workers.llm",
    "LLMEngine": "workers.engine",
    "EngineConfig": "workers.config",
    "RequestOutput": "workers.outputs",
    "TokenEvent": "workers.outputs",
    "SamplingParams": "workers.sampling_params",
    "KVPayload": "workers.kv.handoff",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
