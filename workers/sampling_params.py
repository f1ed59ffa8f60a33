"""Per-request sampling parameters: vLLM's field names and defaults, validated once at construction.

The record is frozen; derive a changed copy with `dataclasses.replace(params, max_tokens=...)`, which
validates again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType

# Below this temperature a request is sampled greedily (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_NUM_LOGPROBS = 20
# OpenAI's bound on a logit_bias value.
MAX_LOGIT_BIAS = 100.0
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables; vLLM's -1 is accepted and normalized to 0.
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # None: up to the context limit (the engine clamps it).
    max_tokens: int | None = 16
    min_tokens: int = 0
    # Normalized to a tuple of strings.
    stop: str | list[str] | tuple[str, ...] | None = None
    # Normalized to a tuple of ints.
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    # Number of top logprobs to return per token; 0 returns only the sampled token's logprob.
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # {token id: bias in [-100, 100]} added to the logits before penalties and temperature (OpenAI's and
    # vLLM's logit_bias); +100 all but forces a token, -100 all but bans it. Normalized to a read-only mapping.
    logit_bias: dict[int, float] | None = field(default=None, hash=False)

    def __post_init__(self):
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        else:
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict | MappingProxyType):
            raise ValueError(f"logit_bias: must be a dict of token id to bias, got {type(self.logit_bias).__name__}")
        object.__setattr__(self, "logit_bias", MappingProxyType(dict(self.logit_bias or {})))
        self._validate()

    def _validate(self) -> None:
        if self.n != 1:
            raise ValueError(f"n: only n=1 is supported, got {self.n}")
        # `not (x >= lo)` rather than `x < lo` so that NaN is rejected too.
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty: must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty: must be in [-2, 2], got {self.frequency_penalty}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name}: must be finite, got {value!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an int or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        max_min_tokens = self.max_tokens if self.max_tokens is not None else float("inf")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= max_min_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_NUM_LOGPROBS):
            raise ValueError(f"logprobs: must be in [0, {MAX_NUM_LOGPROBS}] or None, got {self.logprobs}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids: must be ints >= 0, got {t!r}")
        for t, bias in self.logit_bias.items():
            if not _is_int(t) or t < 0:
                raise ValueError(f"logit_bias: token ids must be ints >= 0, got {t!r}")
            if isinstance(bias, bool) or not isinstance(bias, int | float) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{t}]: must be a number in [-100, 100], got {bias!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
