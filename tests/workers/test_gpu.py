"""CUDA paths: skipped without a GPU (CI has none)."""
import pytest
import torch

from workers import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = [[100 + i for i in range(40)], [7000 + 3 * i for i in range(300)]]


def test_cuda_fp32_greedy_matches_cpu(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    with LLM(folder, device="cpu") as cpu:
        expected = [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]
    with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28) as gpu:
        assert gpu.engine.device.type == "cuda"
        got = [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)]
    assert got == expected


def test_cuda_dummy_llama_3_8b_bf16_decodes():
    with LLM("llama-3-8b", load_format="dummy", device="cuda", kv_cache_memory_bytes=4 << 30) as llm:
        assert llm.engine.dtype == torch.bfloat16
        outs = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
