"""Chaos under load on a real cluster (2 prefill + 2 decode Ray workers, a router, steady greedy streams): a
decode worker is stopped (SIGSTOP) for 4 s and resumes, a prefill worker and a decode worker are killed, a decode
worker is stopped for 20 s with its connections open, and a replacement is killed again. The scenario is
benchmarks/bench_chaos.py's, which records the timings."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_kills_and_a_stopped_worker_under_load_lose_nothing():
    from benchmarks.bench_chaos import ChaosRun

    report = ChaosRun(clients=3, max_tokens=24, stop_s=20.0, warmup_s=2.0).run()
    summary = report.summary()

    assert report.hung == 0, summary  # every request ended: none waits past its deadline
    assert len(report.completed) > 0, summary
    # A fault may end a request only as UNAVAILABLE, never as a deadline, INTERNAL or a wrong answer.
    assert set(report.failed_by_code) <= {"UNAVAILABLE"}, [(r.code, r.details) for r in report.records if r.code]
    assert report.wrong == [], summary
    # Streams on the killed and stopped workers moved on.
    assert summary["migrations"] > 0, summary
    # The router found the stopped worker while it was stopped (its stats went silent), not by its replacement.
    assert report.detect_s is not None, summary
    # A worker stopped for less than the health-check timeout is routed around and taken back when it resumes.
    assert report.pause_detect_s is not None and report.rejoin_s is not None, summary
    # Each fault was repaired: both pools full again without the victims, listed and live in the router.
    assert None not in report.refill_s.values(), summary
    assert report.pools_back, summary
    # Nothing stays held anywhere: not on the resumed worker, not for a request that moved.
    assert report.leaked == [], summary
