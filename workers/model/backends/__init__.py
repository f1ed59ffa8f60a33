"""Attention backends behind one seam (backends/base.py), picked by the engine option `attention_backend`:

- "sdpa"   (backends/sdpa.py): gathers blocks and runs torch SDPA; the CPU path.
- "triton" (backends/triton_attn.py): Triton paged-decode and KV-store kernels; the CUDA path.
- "auto":  triton on CUDA, sdpa elsewhere.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

log = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend "auto" stands for on `device`.

    ValueError naming attention_backend for triton on a CPU device without Triton's interpreter (the compiled
    kernels take CUDA tensors only). That the triton package is installed is checked by EngineConfig.
    """
    if name == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    if name == "triton" and device.type != "cuda" and not _interpreter_on():
        raise ValueError("attention_backend: 'triton' on a CPU device runs only in Triton's interpreter (slow, for "
                         "tests), which must be on before triton is first imported (transformers' model classes "
                         "import it): set TRITON_INTERPRET=1 in the environment, or use 'sdpa'")
    return name


def _interpreter_on() -> bool:
    """Whether triton's kernels will run in its interpreter: it is on, or triton_kernels will switch it on
    (no CUDA, triton not imported yet)."""
    if "triton" in sys.modules:
        return bool(sys.modules["triton"].knobs.runtime.interpret)
    env = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")
    return env or not torch.cuda.is_available()


def make_attention_backend(name: str, device: torch.device):
    """An AttentionBackend for `name` in ATTENTION_BACKENDS (workers/config.py) on `device`."""
    resolved = resolve_attention_backend(name, device)
    if resolved == "triton" and device.type != "cuda":
        log.warning("attention_backend triton on CPU: Triton's interpreter, for tests (measured ~35x slower than "
                    "sdpa on the default model)")
    else:
        log.info("attention backend: %s%s", resolved, f" (from {name})" if name != resolved else "")
    if resolved == "triton":
        from workers.model.backends.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend(device)
    from workers.model.backends.sdpa import TorchSDPABackend

    return TorchSDPABackend()
