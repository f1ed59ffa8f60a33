"""Pull or recompute: a measured cost model.

A remote tier only helps when pulling a prefix's KV beats computing it again (sglang #26305: a remote tier slower
than recomputing). Pull time is estimated as one round trip plus bytes over the measured pull bandwidth; recompute
time as tokens over the measured prefill speed. Both are moving averages of what this worker saw (every pull; every
prefill of at least `min_prefill_tokens` computed tokens, shorter ones being dominated by per-step overheads), from
priors until the first measurements.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    pull_s: float
    recompute_s: float
    margin: float

    @property
    def pays(self) -> bool:
        return self.pull_s < self.margin * self.recompute_s


class CostModel:
    """`margin` < 1 asks a pull to be that much cheaper than recomputing (estimates are noisy, and a pull that
    runs long still ends in a recompute)."""

    def __init__(self, prior_pull_bytes_per_s: float = 500e6, prior_prefill_tokens_per_s: float = 1000.0,
                 prior_rtt_s: float = 0.002, margin: float = 0.8, alpha: float = 0.3, min_prefill_tokens: int = 128):
        self.pull_bytes_per_s = prior_pull_bytes_per_s
        self.prefill_tokens_per_s = prior_prefill_tokens_per_s
        self.rtt_s = prior_rtt_s
        self.margin = margin
        self.alpha = alpha
        self.min_prefill_tokens = min_prefill_tokens
        self.num_pull_samples = 0
        self.num_prefill_samples = 0

    def estimate(self, num_bytes: int, num_tokens: int) -> Estimate:
        return Estimate(pull_s=self.rtt_s + num_bytes / self.pull_bytes_per_s,
                        recompute_s=num_tokens / self.prefill_tokens_per_s, margin=self.margin)

    def observe_pull(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or seconds <= 0:
            return
        self.pull_bytes_per_s = self._avg(self.pull_bytes_per_s, num_bytes / seconds, self.num_pull_samples)
        self.num_pull_samples += 1

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_s = self._avg(self.rtt_s, max(seconds, 0.0), 1)

    def observe_prefill(self, num_computed_tokens: int, seconds: float) -> None:
        """A prefill that computed `num_computed_tokens` (prompt minus cached) in `seconds` (first scheduled to
        first token)."""
        if num_computed_tokens < self.min_prefill_tokens or seconds <= 0:
            return
        self.prefill_tokens_per_s = self._avg(self.prefill_tokens_per_s, num_computed_tokens / seconds,
                                              self.num_prefill_samples)
        self.num_prefill_samples += 1

    def _avg(self, old: float, new: float, num_samples: int) -> float:
        # The first measurement replaces the prior outright.
        return new if num_samples == 0 else (1 - self.alpha) * old + self.alpha * new
