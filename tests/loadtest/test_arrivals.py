"""Arrival processes: the right rates and burstiness, reproducible under a seed."""
from __future__ import annotations

import numpy as np
import pytest

from loadtest.arrivals import arrival_times
from loadtest.scenario import Arrival


def _gaps(arrival: Arrival, n: int = 20000, seed: int = 0) -> np.ndarray:
    times = arrival_times(arrival, np.random.default_rng(seed), duration_s=None, num_requests=n)
    assert len(times) == n and np.all(np.diff(times) >= 0)
    return np.diff(times)


def test_poisson_mean_gap_is_one_over_rate():
    gaps = _gaps(Arrival(process="poisson", rate=4.0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_keeps_the_rate_and_its_cv_is_one_over_sqrt_burstiness(burstiness):
    gaps = _gaps(Arrival(process="gamma", rate=2.0, burstiness=burstiness))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_constant_rate_over_a_duration():
    times = arrival_times(Arrival(process="constant", rate=5.0), np.random.default_rng(0), duration_s=2.0,
                          num_requests=None)
    assert np.allclose(times, np.arange(10) * 0.2)


def test_the_run_ends_at_whichever_limit_comes_first():
    poisson = Arrival(process="poisson", rate=10.0)
    assert len(arrival_times(poisson, np.random.default_rng(0), duration_s=100.0, num_requests=7)) == 7
    times = arrival_times(poisson, np.random.default_rng(0), duration_s=3.0, num_requests=10_000)
    assert times.max() < 3.0 and 15 < len(times) < 45


def test_same_seed_same_times_other_seed_other_times():
    arrival = Arrival(process="gamma", rate=3.0, burstiness=0.5)
    a, b, c = (arrival_times(arrival, np.random.default_rng(s), duration_s=20.0, num_requests=None) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a[:5], c[:5])


def test_ramp_rate_rises_linearly():
    ramp = Arrival(process="ramp", start_rate=1.0, end_rate=19.0)
    times = arrival_times(ramp, np.random.default_rng(0), duration_s=100.0, num_requests=None)
    counts, _ = np.histogram(times, bins=4, range=(0, 100))
    # Expected per quarter: 25 s at mean rates 3.25, 7.75, 12.25, 16.75 req/s.
    assert np.all(np.diff(counts) > 0)
    assert counts / 25 == pytest.approx([3.25, 7.75, 12.25, 16.75], rel=0.15)
    assert len(times) == pytest.approx(1000, rel=0.1)
    # With a count only, the ramp spans the time that count takes on average.
    times = arrival_times(ramp, np.random.default_rng(0), duration_s=None, num_requests=200)
    assert len(times) <= 200 and times.max() < 2 * 200 / 20.0


def test_closed_loop_has_no_arrival_times():
    with pytest.raises(ValueError, match="closed loop"):
        arrival_times(Arrival(process="concurrency", concurrency=2), np.random.default_rng(0), duration_s=1,
                      num_requests=None)
