"""`tandem up --autoscale` as a user runs it: the in-process autoscaler reads the router and sizes the pools
through the controller; `tandem autoscaler --actuator registry` does the same from another process."""
from __future__ import annotations

import re
import signal
import time

import pytest

from tests.cluster.tandem_up import TandemUp, free_port, tandem

pytestmark = pytest.mark.slow


def decode_workers(address: str) -> int:
    out = tandem("status", "--address", address)
    assert out.returncode == 0, out.stderr
    # Worker rows: "<worker id> <role>" with a * after the role of a draining one.
    return sum(1 for line in out.stdout.splitlines() if re.match(r"decode-[0-9a-f]{8}\s+decode\s", line))


def test_an_idle_pool_shrinks_to_its_minimum_and_serving_goes_on():
    """Two decode workers, no load: the planner finds the decode pool idle (KV usage 0, nothing queued) and drains
    it to --decode-min 1; the prefill pool stays at its bounds (1-1); a request is served afterwards."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    up = TandemUp(["--port", str(port), "--http-port", "0", "--kv-cache-memory-bytes", str(128 << 20),
                   "--decode-workers", "2", "--autoscale", "--autoscale-interval-s", "1", "--decode-min", "1",
                   "--decode-max", "2", "--prefill-min", "1", "--prefill-max", "1"], new_session=True)
    try:
        assert "autoscaling prefill 1-1, decode 1-2 every 1 s" in up.output()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and decode_workers(address) != 1:
            time.sleep(1)
        assert decode_workers(address) == 1, up.output()
        out = up.output()
        assert "autoscaler: decode 2 -> 1 (idle" in out, out
        assert "drained and stopped" in out or "stopped" in out
        gen = tandem("generate", "Say hi.", "--address", address, "--max-tokens", "8")
        assert gen.returncode == 0, gen.stderr
        time.sleep(3)  # several more intervals: it stays at its minimum
        assert decode_workers(address) == 1
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=90) == 0
    finally:
        up.kill()


def test_autoscale_options_are_checked_before_anything_starts():
    out = tandem("up", "--autoscale", "--decode-workers", "3", "--decode-max", "2")
    assert out.returncode == 2
    assert "--decode-workers: must be between --decode-min (1) and --decode-max (2) with --autoscale, got 3" \
        in out.stderr
    out = tandem("up", "--autoscale", "--tpot-slo-s", "0")
    assert out.returncode == 2 and "--tpot-slo-s: must be > 0" in out.stderr
