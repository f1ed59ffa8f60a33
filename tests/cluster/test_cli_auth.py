"""`tandem up` with API keys, as a user runs it: keys from a file, `tandem generate` / `tandem status` with and
without a key, and a non-loopback host that refuses to start without keys."""
from __future__ import annotations

import subprocess

import pytest

from tests.cluster.tandem_up import TandemUp, free_port, tandem

pytestmark = pytest.mark.slow


def test_tandem_up_off_loopback_without_keys_refuses_to_start():
    out = tandem("up", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert out.returncode == 2
    assert "--disable-auth" in out.stderr and "--api-key-file" in out.stderr


def test_tandem_up_with_an_api_key_file(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("tenants:\n  team: {api_keys: [sk-team-123], priority: 2}\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    up = TandemUp(["--port", str(port), "--http-port", "0", "--kv-cache-memory-bytes", str(128 << 20),
                   "--api-key-file", str(keys)])
    try:
        assert "sk-team-123" not in up.output()

        denied = tandem("generate", "Hi", "--address", address, "--max-tokens", "4")
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert tandem("status", "--address", address).returncode == 1
        out = tandem("generate", "The capital of France is", "--address", address, "--max-tokens", "4",
                     "--api-key", "sk-team-123")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        status = tandem("status", "--address", address, "--api-key", "sk-team-123")
        assert status.returncode == 0 and "prefill" in status.stdout, status.stderr
    finally:
        up.proc.terminate()
        try:
            up.proc.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
    assert up.proc.returncode == 0
    assert "sk-team-123" not in up.output()
