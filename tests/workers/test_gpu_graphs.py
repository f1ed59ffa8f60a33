"""CUDA-graph decode on a GPU: replayed decode steps give what eager steps give (skipped without CUDA).

Every engine test runs the same workload twice, enforce_eager=True and False, on the tiny random Llama in fp32,
and also checks that graphs were captured and replayed, so a silent fall-back to eager cannot pass.
"""
import dataclasses

import pytest
import torch

from tests.workers.test_cuda_graph import Sequences, prompt_lens
from workers import LLM, SamplingParams
from workers.model import cuda_graph
from workers.model.cuda_graph import CUDAGraphRunner

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
BACKENDS = ["auto", "sdpa"]  # auto is triton on CUDA


@pytest.fixture(scope="module")
def folder(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama"))


@pytest.fixture
def replays(monkeypatch) -> list[int]:
    """Batch sizes of the decode steps that replayed a graph."""
    calls = []
    run = CUDAGraphRunner.run

    def counting_run(self, inp):
        calls.append(len(inp.spans))
        return run(self, inp)

    monkeypatch.setattr(CUDAGraphRunner, "run", counting_run)
    return calls


def ragged_prompts(n: int, start: int = 100) -> list[list[int]]:
    return [[start + 37 * i + j for j in range(3 + (11 * i) % 41)] for i in range(n)]


def generate(folder: str, prompts, params=GREEDY, **options) -> tuple[list[list[int]], object]:
    with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28, **options) as llm:
        outs = llm.generate(prompts, params)
        return [o.token_ids for o in outs], llm.engine.stats()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 17, 64])
def test_replayed_decode_gives_eager_greedy_tokens(folder, replays, caplog, backend, n):
    prompts = ragged_prompts(n)
    expected, _ = generate(folder, prompts, enforce_eager=True, attention_backend=backend)
    assert not replays
    with caplog.at_level("INFO", logger=cuda_graph.__name__):
        got, _ = generate(folder, prompts, enforce_eager=False, attention_backend=backend)
    assert "CUDA graphs: captured 11 decode batch sizes (1..64)" in caplog.text  # max_num_seqs 64
    assert n in replays, "the full batch's decode steps replayed a graph"
    assert got == expected


def test_batches_above_the_largest_bucket_run_eagerly(folder, replays):
    prompts = ragged_prompts(17, start=900)
    # Requests finish one by one, so the batch shrinks from 17 (eager) into the captured buckets.
    params = [dataclasses.replace(GREEDY, max_tokens=4 + 2 * i) for i in range(17)]
    expected, _ = generate(folder, prompts, params, enforce_eager=True)
    got, _ = generate(folder, prompts, params, enforce_eager=False, cudagraph_capture_sizes=[1, 2, 4, 8])
    assert got == expected
    assert replays and max(replays) == 8 and 17 not in replays


def test_prefix_cache_hits_decode_the_same(folder, replays):
    prefix = [2000 + (7 * i) % 3000 for i in range(80)]
    prompts = [prefix + [50 + i] * (1 + i) for i in range(6)]

    def run(**options):
        with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28, **options) as llm:
            llm.generate(prompts[:1], GREEDY)  # caches the shared prefix
            outs = llm.generate(prompts, GREEDY)
            return [o.token_ids for o in outs], min(o.num_cached_tokens for o in outs)

    expected, _ = run(enforce_eager=True)
    got, num_cached = run(enforce_eager=False)
    assert num_cached >= 64, "every prompt hit the cached prefix blocks"
    assert 6 in replays
    assert got == expected


def test_preemption_under_a_tiny_kv_budget_decodes_the_same(folder, replays):
    prompts = [[6000 + 300 * i + j for j in range(100)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected, _ = generate(folder, prompts, params, enforce_eager=True)
    with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28) as probe:
        block_bytes = probe.engine.kv_bytes_per_block
    replays.clear()
    with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=24 * block_bytes) as small:
        got = [o.token_ids for o in small.generate(prompts, params)]  # 384 tokens of KV for 4 x 140
        assert small.engine.stats().num_preemptions > 0
        assert small.engine.stats().num_free_blocks == 24
    assert replays
    assert got == expected


def test_prefill_to_decode_handoff_then_replayed_decode(folder, replays):
    prompts = ragged_prompts(5, start=4000)
    expected, _ = generate(folder, prompts, enforce_eager=True)
    opts = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28)
    with LLM(folder, role="prefill", enforce_eager=True, **opts) as prefill, \
            LLM(folder, role="decode", enforce_eager=False, **opts) as decode:
        tokens = {}
        for i, prompt in enumerate(prompts):
            req_id = prefill.engine.add_request(prompt, GREEDY)
            events = []
            while not events:
                events = prefill.engine.step()
            tokens[req_id] = list(events[0].new_token_ids)
            on_device = i % 2 == 0  # as for cuda_ipc: the payload stays on the GPU
            payloads = prefill.engine.export_kv(req_id, on_device=on_device)
            assert payloads[0].kv.device.type == ("cuda" if on_device else "cpu")
            decode.engine.import_kv(payloads, GREEDY)
            prefill.engine.release_kv(req_id)
        while decode.engine.has_unfinished_requests():
            for ev in decode.engine.step():
                tokens[ev.req_id] += ev.new_token_ids
    assert 5 in replays
    assert list(tokens.values()) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_replayed_logits_are_close_to_eager(folder, backend):
    """Logits straight from the runner: bf16 rounding differs between padded and unpadded shapes, so greedy
    tokens of a random model may flip, but the logits stay within bf16's tolerance."""
    with LLM(folder, device="cuda", dtype="bfloat16", enforce_eager=True, attention_backend=backend,
             kv_cache_memory_bytes=1 << 28) as llm:
        runner = llm.engine.executor.runner
        max_blocks = 10  # 160 tokens: the longest prompt (135) and its decode steps

        def forward_logits(input_ids, positions, meta):
            hidden = runner.model(input_ids, positions, runner.layer_caches, runner.backend, meta)
            return runner.model.compute_logits(hidden).float()

        graphs = CUDAGraphRunner(
            forward_logits, runner.backend, capture_sizes=[1, 2, 4, 8, 16, 24], max_num_blocks_per_seq=max_blocks,
            block_size=runner.block_size, vocab_size=runner.model_config.vocab_size, device=runner.device,
        )
        graphs.capture()
        for n in (1, 3, 17):
            seqs = Sequences(runner, [3 * c for c in prompt_lens(n)], seed=n,
                             vocab_size=runner.model_config.vocab_size, max_blocks=max_blocks)
            for _ in range(3):
                inp = seqs.next_step()
                got = graphs.run(inp)
                expected = runner.execute(inp)
                assert got.shape == expected.shape == (n, runner.model_config.vocab_size)
                torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
                seqs.advance()
