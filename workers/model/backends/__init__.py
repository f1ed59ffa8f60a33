"""Attention backends behind one seam (backends/base.py), picked by the engine option `attention_backend`:

- "sdpa"   (backends/sdpa.py): gathers blocks and runs torch SDPA; the CPU path.
- "triton" (backends/triton_attn.py): Triton paged-decode and KV-store kernels; the CUDA path.
- "auto":  triton on CUDA, sdpa elsewhere.
"""
from __future__ import annotations

import importlib.util
import sys

import torch


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend "auto" stands for on `device`; ValueError if triton is asked for and cannot be imported."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "sdpa"
    # Only looked up, not imported: without CUDA, triton_kernels must switch on the interpreter before triton
    # is first imported.
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("attention_backend: 'triton' needs the triton package (it ships with CUDA builds of torch; "
                         "pip install triton for CPU tests), which is not installed")
    if name == "triton" and device.type != "cuda" and "triton" in sys.modules and not _interpreting():
        raise ValueError("attention_backend: 'triton' without CUDA runs Triton's interpreter, which must be on before "
                         "triton is first imported (transformers' model classes import it): set TRITON_INTERPRET=1 "
                         "in the environment, or use 'sdpa'")
    return name


def _interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def make_attention_backend(name: str, device: torch.device):
    """An AttentionBackend for `name` in ATTENTION_BACKENDS (workers/config.py) on `device`."""
    name = resolve_attention_backend(name, device)
    if name == "triton":
        from workers.model.backends.triton_attn import TritonAttentionBackend

        return TritonAttentionBackend(device)
    from workers.model.backends.sdpa import TorchSDPABackend

    return TorchSDPABackend()
