"""The attention-backend seam on CPU: the engine options that pick a backend and CUDA graphs are validated by name,
and the Triton backend (kernels in Triton's interpreter) gives the SDPA backend's greedy tokens through the whole
engine: mixed prefill + decode steps, chunked prefill, prefix-cache hits and preemption-free batching.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from workers import LLM, SamplingParams
from workers.config import EngineConfig
from workers.model.backends import make_attention_backend, resolve_attention_backend

HAS_TRITON = importlib.util.find_spec("triton") is not None
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("options, field", [
    ({"attention_backend": "flash"}, "attention_backend"),
    ({"attention_backend": None}, "attention_backend"),
    ({"enforce_eager": "yes"}, "enforce_eager"),
    ({"cudagraph_capture_sizes": [0, 2]}, "cudagraph_capture_sizes"),
    ({"cudagraph_capture_sizes": [1, 4096]}, "cudagraph_capture_sizes"),
    ({"cudagraph_capture_sizes": []}, "cudagraph_capture_sizes"),
    ({"cudagraph_capture_sizes": [1.5]}, "cudagraph_capture_sizes"),
    ({"cudagraph_capture_sizes": [True]}, "cudagraph_capture_sizes"),
    ({"cudagraph_capture_sizes": "1,2"}, "cudagraph_capture_sizes"),
])
def test_bad_backend_options_are_refused_by_name(options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**options)


def test_capture_sizes_are_sorted_and_deduplicated():
    assert EngineConfig(cudagraph_capture_sizes=[8, 1, 2, 8]).cudagraph_capture_sizes == (1, 2, 8)


def test_auto_is_sdpa_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "sdpa"
    assert make_attention_backend("auto", cpu).name == "sdpa"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"


def test_triton_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(ValueError, match="attention_backend: 'triton' needs the triton package"):
        EngineConfig(attention_backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
def test_triton_on_cpu_imported_without_the_interpreter_is_a_clear_error():
    code = ("import torch, triton\n"
            "from workers.model.backends import resolve_attention_backend\n"
            "resolve_attention_backend('triton', torch.device('cpu'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "ValueError: attention_backend: 'triton' on a CPU device runs only in Triton's interpreter" in out.stderr, out.stderr


def _generate(folder, backend, **options):
    """Greedy tokens of a mixed batch, then of a prompt whose first two blocks are prefix-cache hits."""
    shared = list(range(200, 240))  # 40 tokens: two and a half blocks of 16
    batch = [[5, 6, 7], list(range(300, 351)), shared + [11, 12]]
    with LLM(folder, device="cpu", dtype="float32", attention_backend=backend, **options) as llm:
        first = [o.token_ids for o in llm.generate(batch, GREEDY)]
        second = [o.token_ids for o in llm.generate([shared + [13]], GREEDY)]
        return first + second, llm.engine.stats()


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package (Triton's CPU interpreter)")
def test_triton_backend_gives_sdpa_greedy_tokens(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    # A token budget of 24 splits the 51-token prompt over steps that also carry the others' decodes.
    options = {"max_num_batched_tokens": 24, "block_size": 16}
    expected, _ = _generate(folder, "sdpa", **options)
    got, stats = _generate(folder, "triton", **options)
    assert got == expected
    assert all(len(t) == GREEDY.max_tokens for t in got)
    assert stats.prefix_cache_hits >= 32, "the last prompt read its first two blocks from the cache"
