"""`tandem up` as a user runs it: a subprocess that serves until SIGTERM; `tandem generate` and `tandem status`
talk to it."""
from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tandem(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_tandem_up_generate_status_and_sigterm():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--port", str(port),
                             "--kv-cache-memory-bytes", str(128 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(log)
                continue
            log.append(line)
            if "router listening on" in line:
                break
        else:
            pytest.fail("tandem up did not come up:\n" + "".join(log))
        assert address in log[-1]

        # The README's first example: a real answer (the chat template is applied), not an empty one.
        out = _tandem("generate", "Write a haiku about GPUs.", "--address", address, "--max-tokens", "64")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        assert "completion" in out.stderr and "TTFT" in out.stderr

        status = _tandem("status", "--address", address)
        assert status.returncode == 0, status.stderr
        assert "disaggregated" in status.stdout
        assert "prefill" in status.stdout and "decode" in status.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        time.sleep(0.5)
        rest = []
        while not lines.empty():
            rest.append(lines.get())
        assert any("tandem: stopped" in line for line in log + rest), "".join(log + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    bad = _tandem("generate", "hi", "--address", address, "--timeout", "5")
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr
