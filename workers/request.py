"""The engine's record of one request, from arrival to finish."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    # Prefill role: prompt computed and first token sampled; KV blocks held until hand-off is released.
    PREFILLED = "prefilled"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Most tokens this request may generate: params.max_tokens clamped to the room left in max_model_len.
    max_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache. The newest sampled token never is: the next step computes it.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first scheduling (-1: not scheduled yet).
    num_cached_tokens: int = -1
    status: RequestStatus = RequestStatus.WAITING
    # What stopped it: a stop token id or stop string; None for EOS or length.
    stop_reason: int | str | None = None
    # Chained hashes of the request's full blocks, extended as tokens arrive.
    block_hashes: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # When the scheduler first gave it a slot (monotonic); queue time is this minus arrival_time.
    first_scheduled_time: float | None = None

    def __post_init__(self):
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After a new token: set a finished status if a stop token or a length limit was reached."""
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in self.params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
