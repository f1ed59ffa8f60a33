"""`tandem up` with API keys, as a user runs it: keys from a file, `tandem generate` / `tandem status` with and
without a key, and a non-loopback host that refuses to start without keys."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.cluster.test_cli import _free_port, _tandem

pytestmark = pytest.mark.slow


def test_tandem_up_off_loopback_without_keys_refuses_to_start():
    out = _tandem("up", "--host", "0.0.0.0", "--port", str(_free_port()), timeout=60)
    assert out.returncode == 2
    assert "--disable-auth" in out.stderr and "--api-key-file" in out.stderr


def test_tandem_up_with_an_api_key_file(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  team: {api_keys: [sk-team-123], priority: 2}\n")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--port", str(port), "--http-port", "0",
                                 "--kv-cache-memory-bytes", str(128 << 20), "--api-key-file", str(keys)],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while "router listening on" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        assert "sk-team-123" not in log_path.read_text()

        denied = _tandem("generate", "Hi", "--address", address, "--max-tokens", "4")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert _tandem("status", "--address", address).returncode == 1
        out = _tandem("generate", "The capital of France is", "--address", address, "--max-tokens", "4",
                      "--api-key", "sk-team-123")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        status = _tandem("status", "--address", address, "--api-key", "sk-team-123")
        assert status.returncode == 0 and "prefill" in status.stdout, status.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert "sk-team-123" not in log_path.read_text()
