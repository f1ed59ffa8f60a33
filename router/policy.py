"""Which worker gets a request: pure functions over load records, so they can be tested without servers."""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's last reported stats plus what this router sent it since that report was asked for."""

    worker_id: str
    num_waiting_tokens: int  # prompt tokens queued, not yet computed
    num_free_blocks: int  # may go negative: an estimate after this router's own unreported requests
    num_running: int  # running plus waiting requests


def pick_prefill(loads: Iterable[WorkerLoad]) -> str | None:
    """The worker with the fewest queued prompt tokens (its first token comes soonest); ties at random."""
    best = min(loads, key=lambda w: (w.num_waiting_tokens, w.num_running, random.random()), default=None)
    return None if best is None else best.worker_id


def pick_decode(loads: Iterable[WorkerLoad]) -> str | None:
    """The worker with the most free KV blocks, then the fewest requests; ties at random.

    Free blocks first: a decode worker that runs out of blocks preempts (recomputes) requests, which costs far
    more than the slightly larger batch of a busier worker.
    """
    best = min(loads, key=lambda w: (-w.num_free_blocks, w.num_running, random.random()), default=None)
    return None if best is None else best.worker_id
