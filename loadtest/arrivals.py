"""Open-loop arrival times: offsets in seconds from the start of a run, drawn once before it starts."""
from __future__ import annotations

import math

import numpy as np

from loadtest.scenario import Arrival


def arrival_times(arrival: Arrival, rng: np.random.Generator, *, duration_s: float | None,
                  num_requests: int | None) -> np.ndarray:
    """Sorted send offsets (s) until `duration_s` or `num_requests`, whichever comes first.

    poisson: exponential gaps; gamma: gamma gaps with shape = burstiness and the same mean (vLLM's --burstiness);
    constant: equal gaps; ramp: a Poisson process whose rate goes linearly from start_rate to end_rate over the
    run (over 2 * num_requests / (start_rate + end_rate) seconds when only a count is given).
    The first request of poisson, gamma and constant goes at 0.
    """
    if not arrival.is_open_loop:
        raise ValueError(f"arrival.process: {arrival.process!r} is closed loop; it has no arrival times")
    max_n = num_requests if num_requests is not None else math.inf
    end_s = duration_s if duration_s is not None else math.inf
    if arrival.process == "ramp":
        return _ramp(arrival, rng, end_s, max_n, num_requests)
    if arrival.process == "constant":
        # i / rate rather than summed gaps, which drift and could add one more request before the end.
        n = max_n if end_s == math.inf else min(max_n, math.ceil(end_s * arrival.rate - 1e-9))
        return np.arange(n) / arrival.rate

    def gaps(n: int) -> np.ndarray:
        if arrival.process == "gamma":
            shape = arrival.burstiness
            return rng.gamma(shape, 1.0 / (arrival.rate * shape), n)
        return rng.exponential(1.0 / arrival.rate, n)

    times: list[float] = []
    t = 0.0
    while len(times) < max_n:
        # Draw in batches of about the expected count; times already drawn never change.
        batch = gaps(int(min(max_n, arrival.rate * min(end_s, 1e6))) + 16)
        for gap in batch:
            if t >= end_s or len(times) >= max_n:
                return np.asarray(times)
            times.append(t)
            t += float(gap)
    return np.asarray(times)


def _ramp(arrival: Arrival, rng: np.random.Generator, end_s: float, max_n: float,
          num_requests: int | None) -> np.ndarray:
    a, b = arrival.start_rate, arrival.end_rate
    span_s = end_s if end_s != math.inf else 2 * num_requests / (a + b)
    c = (b - a) / (2 * span_s)  # cumulative rate: L(t) = a t + c t^2
    total = a * span_s + c * span_s ** 2
    # Unit-rate Poisson events mapped through the inverse of L are the ramp's events.
    events: list[float] = []
    s = 0.0
    while len(events) < max_n:
        s += float(rng.exponential(1.0))
        if s > total:
            break
        events.append(s / a if c == 0 else (-a + math.sqrt(a * a + 4 * c * s)) / (2 * c))
    return np.asarray(events)

