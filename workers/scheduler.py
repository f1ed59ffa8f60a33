"""Iteration-level scheduler: which requests compute how many tokens in the next step.

Every step, running requests go first (a decode needs one token, a partly prefilled prompt continues), then
waiting requests are admitted while the token budget, the sequence limit and the KV blocks allow. A prompt
longer than the remaining budget is split into chunks (chunked prefill), so a long prompt never stalls the
running decodes. When blocks run out, the lowest-priority running request is preempted: its blocks are
freed and it later recomputes its prompt and output so far (mostly from the prefix cache).

The scheduler decides; the KV cache manager and its block pool keep the accounts.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from workers.config import SchedulerConfig
from workers.kv.kv_cache_manager import KVCacheManager
from workers.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    request: Request
    # Tokens already in the cache before this step, and tokens computed in it.
    context_len: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so a new token is sampled."""
        return self.context_len + self.num_new_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    # Decodes (one new token) first, then prefill chunks. Attention regroups them itself (decodes bucketed by
    # length); this order just keeps batches readable and stable.
    seqs: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Imported requests (decode role): their KV is in place, and they wait here for a seat under max_num_seqs
        # instead of growing the batch past it; they take free seats before new prompts are admitted.
        self.ready: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Prompt tokens of requests admitted for prefill here (cached ones included, as vLLM counts them); a
        # preempted request's recompute is not counted again.
        self.num_prompt_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.ready)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def _order_key(self, req: Request):
        if self.config.policy == "priority":
            return (req.priority, req.arrival_time)
        return (req.arrival_time,)

    def add_request(self, req: Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"request_id: {req.req_id!r} is already in use")
        self.requests[req.req_id] = req
        self._enqueue(req)

    def add_running(self, req: Request) -> None:
        """Adopt a request whose KV is already in place (decode role, after import). It runs from the next step
        when fewer than max_num_seqs requests run, else it waits in `ready`, holding its blocks."""
        if req.req_id in self.requests:
            raise ValueError(f"request_id: {req.req_id!r} is already in use")
        self.requests[req.req_id] = req
        req.status = RequestStatus.WAITING
        if self.config.policy == "priority":
            bisect.insort(self.ready, req, key=self._order_key)
        else:
            self.ready.append(req)

    def _enqueue(self, req: Request) -> None:
        if self.config.policy == "priority":
            bisect.insort(self.waiting, req, key=self._order_key)
        elif req.status == RequestStatus.PREEMPTED:
            self.waiting.appendleft(req)  # it was admitted before anything still waiting
        else:
            self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Request] = []

        while self.ready and len(self.running) < self.config.max_num_seqs:
            req = self.ready.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                # Only requests not yet scheduled this step may be preempted; req itself is one of them.
                victim = max(self.running[i:], key=self._order_key)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledSeq(req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1

        # Admit new work only when nothing was preempted: otherwise the freed blocks belong to the preempted.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits = self.kv.get_computed_blocks(req)
            num_cached = len(hits) * self.kv.block_size
            num_new = req.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                # First admission: counted once, not at failed attempts before it nor again after a preemption.
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
                self.num_prompt_tokens += req.num_prompt_tokens
                self.kv.record_prefix_lookup(req.num_tokens, num_cached)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(ScheduledSeq(req, num_cached, num_new))
            budget -= num_new

        scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance each scheduled request and append its sampled token; returns requests that stopped
        (finished, or handed off in the prefill role)."""
        stopped = []
        for seq in out.seqs:
            req = seq.request
            if req.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile
            req.num_computed_tokens = seq.context_len + seq.num_new_tokens
            self.kv.cache_blocks(req)
            token = sampled.get(req.req_id)
            if token is None:
                continue
            req.append_output_token(token)
            if req.check_stop(self.max_model_len):
                self.finish(req, req.status)
                stopped.append(req)
            elif self.config.role == "prefill":
                # The prompt's KV stays allocated for hand-off; release_handoff frees it.
                self.running.remove(req)
                req.status = RequestStatus.PREFILLED
                stopped.append(req)
        return stopped

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.ready:
            self.ready.remove(req)
        req.status = status
        self.kv.free(req)
        self.requests.pop(req.req_id, None)

    def release_handoff(self, req_id: str) -> None:
        req = self.requests.get(req_id)
        if req is None or req.status != RequestStatus.PREFILLED:
            raise KeyError(f"request_id: {req_id!r} holds no KV for hand-off")
        self.kv.free(req)
        self.requests.pop(req_id)
