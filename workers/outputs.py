"""What the engine reports: one TokenEvent per request per step, accumulated into RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """New tokens of one request in one step; the unit that services stream."""

    req_id: str
    new_token_ids: list[int]
    text_delta: str
    # Per new token: {token_id: logprob} with the sampled token and the top-n (None if not asked).
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    # Monotonic times of the request's arrival in this engine and its first scheduling (None before it).
    arrival_time: float | None = None
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, event: TokenEvent) -> None:
        self.token_ids.extend(event.new_token_ids)
        self.text += event.text_delta
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + event.logprobs
        self.finish_reason = event.finish_reason
        self.stop_reason = event.stop_reason
        self.num_cached_tokens = event.num_cached_tokens
