"""Tensor parallelism on CPU: two processes over gloo give the same tokens as one."""
import pytest

from workers import LLM, SamplingParams
from workers.engine import LLMEngine
from workers.config import EngineConfig

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = [[100 + i for i in range(40)], [7000 + 3 * i for i in range(150)], [42, 43, 44]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_greedy_matches_tp1(arch, tiny_checkpoint):
    folder = str(tiny_checkpoint(arch))
    with LLM(folder) as tp1:
        expected = [o.token_ids for o in tp1.generate(PROMPTS, GREEDY)]
    with LLM(folder, tensor_parallel_size=2) as tp2:
        got = [o.token_ids for o in tp2.generate(PROMPTS, GREEDY)]
        stats = tp2.engine.stats()
    assert got == expected
    assert stats.num_free_blocks == stats.num_blocks


def test_tp2_kv_payloads_carry_their_shard_and_hand_off(tiny_checkpoint):
    folder = str(tiny_checkpoint("mistral"))
    prompt = PROMPTS[1]
    with LLM(folder) as tp1:
        (expected,) = tp1.generate([prompt], GREEDY)

    # One TP group per process at a time (as with one engine per Ray actor): prefill, then decode.
    prefill = LLMEngine(EngineConfig.from_kwargs(folder, tensor_parallel_size=2, role="prefill"))
    try:
        req_id = prefill.add_request(prompt, GREEDY)
        events = []
        while not events:
            events = prefill.step()
        payloads = prefill.export_kv(req_id)
        prefill.release_kv(req_id)
    finally:
        prefill.shutdown()
    assert [(p.tp_rank, p.tp_size) for p in payloads] == [(0, 2), (1, 2)]
    assert all(p.kv.shape[4] == 1 for p in payloads), "each rank holds 1 of the 2 KV heads"
    assert not payloads[0].kv.equal(payloads[1].kv)

    decode = LLMEngine(EngineConfig.from_kwargs(folder, tensor_parallel_size=2, role="decode"))
    try:
        with pytest.raises(ValueError, match="tp_rank"):
            decode.import_kv(list(reversed(payloads)), GREEDY, req_id="swapped")
        decode.import_kv(payloads, GREEDY)
        tokens = list(events[0].new_token_ids)
        while decode.has_unfinished_requests():
            for ev in decode.step():
                tokens += ev.new_token_ids
    finally:
        decode.shutdown()
    assert tokens == expected.token_ids


def test_tp_size_must_divide_heads():
    # The default model has 9 query heads and 3 KV heads.
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 must divide num_attention_heads=9"):
        LLM(tensor_parallel_size=2)


def test_tp_engine_works_after_a_rejected_tp_size(tiny_checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(tensor_parallel_size=2)
    with LLM(str(tiny_checkpoint("llama")), tensor_parallel_size=2) as tp2:
        (out,) = tp2.generate([PROMPTS[2]], GREEDY)
    assert len(out.token_ids) == GREEDY.max_tokens


def test_idle_group_stays_up_and_a_dead_rank_is_an_error_not_a_hang(tiny_checkpoint, monkeypatch):
    """Rank 0 keeps an idle group alive with no-op commands (collectives have a bounded timeout); a rank that dies
    while idle turns the next call into an error at once instead of a collective that waits for it."""
    import time

    from workers.executor import MultiprocTPExecutor

    monkeypatch.setattr(MultiprocTPExecutor, "keepalive_s", 0.4)
    with LLM(str(tiny_checkpoint("llama")), tensor_parallel_size=2) as tp2:
        (before,) = tp2.generate([PROMPTS[0]], GREEDY)
        time.sleep(1.5)  # a few keep-alives go out
        (after,) = tp2.generate([PROMPTS[0]], GREEDY)
        assert after.token_ids == before.token_ids
        executor = tp2.engine.executor
        executor.procs[0].kill()
        executor.procs[0].join(10)
        deadline = time.monotonic() + 30
        while executor.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert executor.error is not None
        with pytest.raises(RuntimeError, match="tensor-parallel group failed"):
            tp2.generate([PROMPTS[0]], GREEDY)
