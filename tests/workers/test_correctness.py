"""Greedy output and logits against Hugging Face transformers, the reference nobody here wrote."""
import pytest
import torch

from tests.workers.prompts import prompt_token_ids
from workers import LLM, SamplingParams
from workers.model_runner import build_model_input

pytestmark = pytest.mark.slow

NUM_TOKENS = 64
# min_tokens bans EOS exactly as HF's min_new_tokens does, so both produce all 64 tokens.
GREEDY_64 = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)


def hf_greedy(model, ids: list[int], n: int = NUM_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def first_step_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of the token after each prompt, from one engine step that prefills all prompts together."""
    engine = llm.engine
    req_ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=1)) for p in prompts]
    out = engine.scheduler.schedule()
    assert all(s.samples for s in out.seqs), "the step must cover every prompt in full"
    logits = engine.executor.execute(build_model_input(out, engine.kv.block_ids))
    order = [s.request.req_id for s in out.seqs]
    for r in req_ids:
        engine.abort_request(r)
    return logits[[order.index(r) for r in req_ids]]


def hf_last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])


@pytest.fixture(scope="module")
def default_llm():
    llm = LLM(max_num_batched_tokens=4096)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def prompts(hf_default_tokenizer):
    ids = prompt_token_ids(hf_default_tokenizer)
    assert max(len(p) for p in ids) > 900 and min(len(p) for p in ids) < 10
    return ids


def test_default_model_greedy_matches_hf(default_llm, hf_default_model, prompts):
    # All 8 prompts run as one continuous batch: short ones decode while the ~1k-token ones prefill.
    outs = default_llm.generate(prompts, GREEDY_64)
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf_default_model, ids), f"prompt of {len(ids)} tokens diverged"
        assert out.finish_reason == "length"


def test_default_model_first_step_logits_match_hf(default_llm, hf_default_model, prompts):
    ours = first_step_logits(default_llm, prompts)
    ref = hf_last_logits(hf_default_model, prompts)
    assert (ours - ref).abs().max().item() < 1e-3


def test_chunked_prefill_gives_the_same_tokens(hf_default_model, prompts):
    """A 64-token budget splits every long prompt into many chunks, mixed with running decodes."""
    with LLM(max_num_batched_tokens=64, max_num_seqs=4) as llm:
        outs = llm.generate(prompts[2:4], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))
    for ids, out in zip(prompts[2:4], outs):
        assert out.token_ids == hf_greedy(hf_default_model, ids, 16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_checkpoints_match_hf(arch, tiny_checkpoint, hf_default_tokenizer):
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(arch)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = prompt_token_ids(hf_default_tokenizer)
    with LLM(str(folder), max_num_batched_tokens=4096) as llm:
        ours = first_step_logits(llm, prompts)
        assert (ours - hf_last_logits(hf, prompts)).abs().max().item() < 1e-3
        outs = llm.generate(prompts, GREEDY_64)
    for ids, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, ids), f"{arch}: prompt of {len(ids)} tokens diverged"
