"""The step's GPU work never makes the host wait, except for the sampler's one copy of its results.

A host sync stalls the CPU until the GPU drains its queue, so the next step's scheduling cannot overlap the
current step's kernels. torch's sync debug mode reports syncs (blocking copies, `.item()`, `nonzero`, stream
and device synchronizes); an event synchronize, the sampler's one intended wait, is not reported. Skipped
without CUDA.
"""
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from workers import LLM, SamplingParams
from workers.sampler import Sampler, SamplingBatch

pytestmark = pytest.mark.gpu

VOCAB = 49152
EOS = 2
WORKERS = Path(__file__).resolve().parents[2] / "workers"
# Files of the step's hot path that must never sync: the model forward and the sampler.
HOT_PATH = (WORKERS / "model", WORKERS / "model_runner.py", WORKERS / "sampler.py")


@contextmanager
def sync_debug_mode(mode: str):
    torch.cuda.synchronize()  # earlier work must not be blamed on the code under test
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def record_syncs():
    """Yields a list that gets the Python stack (a traceback.StackSummary) of every reported sync."""
    stacks = []

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            stacks.append(traceback.extract_stack()[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook  # restored by catch_warnings
        with sync_debug_mode("warn"):
            yield stacks


def every_feature(num_rows: int) -> list[SamplingParams]:
    """Greedy, seeded and unseeded rows with top-k/top-p/min-p, penalties, logit_bias, min_tokens and logprobs."""
    params = []
    for row in range(num_rows):
        kind = row % 4
        params.append(SamplingParams(
            temperature=0.0 if kind == 0 else 0.8,
            seed=row if kind in (1, 2) else None,
            top_k=[0, 50, 0, 20][kind], top_p=[1.0, 0.9, 0.95, 1.0][kind], min_p=[0.0, 0.0, 0.05, 0.1][kind],
            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
            logit_bias={7: 5.0, 100 + row: -3.0}, min_tokens=4, max_tokens=32, stop_token_ids=[9],
            logprobs=[None, 0, 3, 5][kind],
        ))
    return params


def make_inputs(num_rows: int):
    torch.manual_seed(0)
    logits = torch.randn(num_rows, VOCAB) * 4  # [B, V]
    prompts = [[(17 * row + i) % VOCAB for i in range(30)] for row in range(num_rows)]
    outputs = [[(5 * row + i) % VOCAB for i in range(row % 6)] for row in range(num_rows)]
    return logits, every_feature(num_rows), prompts, outputs


def sample(logits, params, prompts, outputs, device, sampler=None):
    batch = SamplingBatch.build(params, prompts, outputs, (EOS,), device)
    return (sampler or Sampler())(logits.to(device), batch)


def test_sampler_with_every_feature_does_not_sync_on_cuda():
    logits, params, prompts, outputs = make_inputs(16)
    cuda_logits = logits.cuda()
    sampler = Sampler()
    sample(cuda_logits, params, prompts, outputs, "cuda", sampler)  # warm-up: lazy CUDA init may sync
    with sync_debug_mode("error"):
        got = sample(cuda_logits, params, prompts, outputs, "cuda", sampler)
    want = sample(logits, params, prompts, outputs, "cpu")

    greedy = [row for row, p in enumerate(params) if p.is_greedy]
    assert [got.token_ids[r] for r in greedy] == [want.token_ids[r] for r in greedy]
    # Same output types and places as on CPU, with the raw model logprobs of whatever was sampled.
    assert got.logprobs.device.type == "cpu" and got.top_logprob_ids.device.type == "cpu"
    assert got.top_logprob_ids.dtype == torch.int64 and got.top_logprobs.dtype == torch.float32
    raw = torch.log_softmax(logits, dim=-1)
    chosen = raw[torch.arange(len(params)), torch.tensor(got.token_ids)]
    torch.testing.assert_close(got.logprobs, chosen, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.top_logprob_ids, want.top_logprob_ids)
    torch.testing.assert_close(got.top_logprobs, want.top_logprobs, atol=1e-4, rtol=1e-5)
    # Rows short of min_tokens never get EOS or their stop token id.
    banned_rows = [row for row, p in enumerate(params) if len(outputs[row]) < p.min_tokens]
    assert banned_rows and not {EOS, 9} & {got.token_ids[row] for row in banned_rows}


def test_cuda_seeded_rows_are_reproducible_and_match_cpu_where_the_draw_is_forced():
    logits, params, prompts, outputs = make_inputs(16)
    seeded = [row for row, p in enumerate(params) if p.seed is not None]
    first = sample(logits, params, prompts, outputs, "cuda")
    # Alone in a batch, from a fresh sampler, with another default generator state: the same tokens.
    torch.cuda.manual_seed(1234)
    for row in seeded:
        alone = sample(logits[row : row + 1], params[row : row + 1], prompts[row : row + 1], outputs[row : row + 1],
                       "cuda")
        assert alone.token_ids == [first.token_ids[row]]
    # CUDA and CPU draw their exponential noise from different generators, so a seeded row matches the CPU's
    # token only where one token is left: top_k=1, or a logit_bias of +100 on it.
    forced = [SamplingParams(seed=3, top_k=1, temperature=1.3, presence_penalty=1.0),
              SamplingParams(seed=4, temperature=1.0, logit_bias={321: 100.0}, logprobs=2)]
    args = (logits[:2], forced, prompts[:2], outputs[:2])
    assert sample(*args, "cuda").token_ids == sample(*args, "cpu").token_ids
    assert sample(*args, "cuda").token_ids[1] == 321


def test_sampler_copies_to_host_once_and_only_from_pinned_memory():
    logits, params, prompts, outputs = make_inputs(16)
    cuda_logits = logits.cuda()
    sampler = Sampler()
    sample(cuda_logits, params, prompts, outputs, "cuda", sampler)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sample(cuda_logits, params, prompts, outputs, "cuda", sampler)
        torch.cuda.synchronize()
    # GPU activities are named like "Memcpy DtoH (Device -> Pinned)" and "Memcpy HtoD (Pageable -> Device)".
    copies = sorted({(e.name, e.time_range.start) for e in prof.events() if e.name.startswith("Memcpy")})
    if not copies:
        pytest.skip("the profiler sees no CUDA copies here (no CUPTI)")
    assert sum(name.startswith("Memcpy DtoH") for name, _ in copies) == 1, copies
    assert not [name for name, _ in copies if "Pageable" in name], copies


def test_engine_step_does_not_sync_in_forward_or_sampler(tiny_checkpoint):
    folder = str(tiny_checkpoint("llama"))
    prompts = [[100 + i for i in range(40)], [7000 + 3 * i for i in range(300)], [50 + 7 * i for i in range(90)]]
    params = [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=64, ignore_eos=True, logprobs=3,
                             presence_penalty=0.5, logit_bias={11: 2.0}, min_tokens=32, stop_token_ids=[9]),
              SamplingParams(temperature=1.0, top_k=40, min_p=0.05, max_tokens=64, ignore_eos=True, logprobs=0)]
    with LLM(folder, device="cuda", dtype="float32", kv_cache_memory_bytes=1 << 28) as llm:
        engine = llm.engine
        req_ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        requests = [engine.scheduler.requests[r] for r in req_ids]
        while not all(r.num_output_tokens >= 1 for r in requests):
            engine.step()
        for _ in range(2):  # warm up the decode shapes
            engine.step()
        # Only engine.step() is checked: setup and teardown may sync, the step's hot path must not.
        with record_syncs() as stacks:
            for _ in range(4):
                assert len(engine.step()) == len(requests)
    in_hot_path = [
        stack for stack in stacks
        if any(Path(frame.filename).resolve().is_relative_to(path) for frame in stack for path in HOT_PATH)
    ]
    where = ["".join(traceback.format_list(stack[-8:])) for stack in in_hot_path]
    assert not in_hot_path, "host syncs in the forward or sampler:\n" + "\n".join(where)
