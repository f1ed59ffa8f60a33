"""The scheduler driven with no model: budgets, chunked prefill, preemption, priority, roles."""
import itertools

from workers.config import SchedulerConfig
from workers.kv.kv_cache_manager import KVCacheManager
from workers.request import Request, RequestStatus
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler

_ids = itertools.count()


def make_requests(*prompt_lens: int, max_tokens: int = 4, priority: int = 0, t0: float = 0.0) -> list[Request]:
    """Requests with distinct prompts (no shared prefix), arriving one second apart from t0."""
    reqs = []
    for i, n in enumerate(prompt_lens):
        k = next(_ids)
        reqs.append(Request(f"r{k}", list(range(1000 * k, 1000 * k + n)), SamplingParams(max_tokens=max_tokens),
                            max_tokens=max_tokens, eos_token_ids=(), priority=priority, arrival_time=t0 + i))
    return reqs


def make_scheduler(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size), max_model_len=4096)


def run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request.req_id: token for s in out.seqs if s.samples}
    return out, sched.update_from_output(out, sampled)


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = make_scheduler(max_num_batched_tokens=16)
    short, long = make_requests(4, 50)
    sched.add_request(short)
    run_step(sched)  # short prefilled, now decoding
    sched.add_request(long)
    chunks = []
    while long.num_computed_tokens < 50:
        out, _ = run_step(sched)
        by_id = {s.request.req_id: s.num_new_tokens for s in out.seqs}
        if short.status == RequestStatus.RUNNING:
            assert by_id[short.req_id] == 1, "a running decode gets its token every step"
        chunks.append(by_id[long.req_id])
        assert out.num_batched_tokens <= 16
    assert sum(chunks) == 50 and len(chunks) >= 4
    assert long.num_output_tokens == 1, "only the last chunk samples"


def test_decodes_come_first_in_the_batch():
    sched = make_scheduler(max_num_batched_tokens=64)
    a, b = make_requests(5, 9)
    sched.add_request(a)
    run_step(sched)
    sched.add_request(b)
    out = sched.schedule()
    assert [s.num_new_tokens for s in out.seqs] == [1, 9]


def test_max_num_seqs_bounds_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    for r in make_requests(3, 3, 3):
        sched.add_request(r)
    out = sched.schedule()
    assert len(out.seqs) == 2 and sched.num_waiting == 1


def test_preemption_frees_blocks_and_the_request_recomputes():
    # 6 blocks of 4 tokens: two 8-token prompts fill 4; decoding grows them until blocks run out.
    sched = make_scheduler(num_blocks=6, block_size=4)
    first, second = make_requests(8, 8, max_tokens=12)
    sched.add_request(first)
    sched.add_request(second)
    preempted = []
    for _ in range(40):
        if not sched.has_work():
            break
        out, _ = run_step(sched)
        preempted += out.preempted
    assert preempted and preempted[0] is second, "the latest arrival is preempted first"
    assert first.status == RequestStatus.FINISHED_LENGTH and second.status == RequestStatus.FINISHED_LENGTH
    assert first.num_output_tokens == 12 and second.num_output_tokens == 12
    assert second.num_preemptions >= 1
    assert sched.kv.num_free_blocks == 6, "every block is back in the pool"


def test_priority_policy_admits_lower_value_first():
    sched = make_scheduler(policy="priority", max_num_seqs=1)
    (late_urgent,) = make_requests(3, priority=-1, t0=10)
    (early,) = make_requests(3, priority=0, t0=0)
    sched.add_request(early)
    sched.add_request(late_urgent)
    out = sched.schedule()
    assert [s.request for s in out.seqs] == [late_urgent]


def test_fcfs_admits_in_arrival_order():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_requests(3, 3)
    sched.add_request(a)
    sched.add_request(b)
    assert [s.request for s in sched.schedule().seqs] == [a]


def test_prefill_role_holds_kv_until_released():
    sched = make_scheduler(role="prefill")
    (req,) = make_requests(10)
    sched.add_request(req)
    _, stopped = run_step(sched)
    assert stopped == [req] and req.status == RequestStatus.PREFILLED
    assert req.output_token_ids == [7] and not sched.has_work()
    held = len(sched.kv.block_ids(req.req_id))
    assert held == 3 and sched.kv.num_free_blocks == 64 - 3
    sched.release_handoff(req.req_id)
    assert sched.kv.num_free_blocks == 64


def test_abort_frees_blocks():
    sched = make_scheduler()
    a, b = make_requests(10, 10)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    sched.finish(a, RequestStatus.FINISHED_ABORTED)
    assert a.status.finish_reason == "abort"
    assert sched.num_running == 1 and sched.kv.block_ids(a.req_id) == []


def test_prefix_cache_counts_each_prompt_once_under_kv_pressure():
    # 8 blocks of 4 tokens. Three 12-token prompts: the second and third wait for blocks for many steps, and
    # decoding preempts them again; each prompt is still one query, counted when it is first admitted.
    sched = make_scheduler(num_blocks=8, block_size=4)
    reqs = make_requests(12, 12, 12, max_tokens=8)
    for r in reqs:
        sched.add_request(r)
    num_waiting_steps = 0
    for _ in range(200):
        if not sched.has_work():
            break
        num_waiting_steps += bool(sched.waiting)
        run_step(sched)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert num_waiting_steps > 10 and sum(r.num_preemptions for r in reqs) >= 1, "not under KV pressure"
    assert sched.kv.prefix_queries == 3 * 12 and sched.kv.prefix_hits == 0

    # A prompt, then the same prompt again: its first two blocks are cached (the last token is always computed).
    first, again = make_requests(12, 12, max_tokens=2)
    again.prompt_token_ids[:] = again.all_token_ids[:] = first.prompt_token_ids
    for r in (first, again):
        sched.add_request(r)
        while sched.has_work():
            run_step(sched)
    assert again.num_cached_tokens == 8
    assert sched.kv.prefix_queries == 5 * 12 and sched.kv.prefix_hits == 8


def test_prefix_cache_counts_nothing_when_disabled():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(8, 4, enable_prefix_caching=False), max_model_len=4096)
    for r in make_requests(12, 12):
        sched.add_request(r)
    while sched.has_work():
        run_step(sched)
    assert sched.kv.prefix_queries == 0 and sched.kv.prefix_hits == 0


def _adopt(sched: Scheduler, req: Request) -> None:
    """What LLMEngine.import_kv does: blocks for the prompt, its KV in place, one output token sampled."""
    assert sched.kv.allocate_slots(req, req.num_prompt_tokens)
    req.num_computed_tokens = req.num_prompt_tokens
    req.append_output_token(5)
    sched.add_running(req)


def test_imported_requests_wait_for_a_seat_under_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2, role="decode")
    reqs = make_requests(4, 4, 4, max_tokens=3)
    for r in reqs:
        _adopt(sched, r)
    assert sched.num_running == 0 and sched.num_waiting == 3
    out, _ = run_step(sched)
    assert [s.request.req_id for s in out.seqs] == [reqs[0].req_id, reqs[1].req_id]
    assert all(s.num_new_tokens == 1 for s in out.seqs), "adopted requests decode, they do not recompute"
    assert sched.num_running == 2 and sched.num_waiting == 1 and reqs[2].num_output_tokens == 1
    run_step(sched)  # the first two reach max_tokens=3 and finish
    assert reqs[0].status.is_finished and reqs[1].status.is_finished
    out, _ = run_step(sched)
    assert [s.request.req_id for s in out.seqs] == [reqs[2].req_id]


def test_an_imported_request_aborted_while_waiting_frees_its_blocks():
    sched = make_scheduler(max_num_seqs=1, role="decode")
    a, b = make_requests(8, 8)
    _adopt(sched, a)
    _adopt(sched, b)
    used = sched.kv.num_used_blocks
    sched.finish(b, RequestStatus.FINISHED_ABORTED)
    assert sched.kv.num_used_blocks < used and sched.num_waiting == 1  # a still waits for the seat
    out, _ = run_step(sched)
    assert [s.request.req_id for s in out.seqs] == [a.req_id]
