"""`tandem up` as a user runs it: a subprocess that serves until SIGTERM; `tandem generate` and `tandem status`
talk to it."""
from __future__ import annotations

import os
import re
import signal
import socket
from urllib.parse import urlsplit

import pytest
import redis

from tests.cluster.tandem_up import TandemUp, free_port, tandem

pytestmark = pytest.mark.slow


def _up_args(port: int) -> list[str]:
    return ["--port", str(port), "--http-port", "0", "--kv-cache-memory-bytes", str(128 << 20)]


def test_tandem_up_generate_status_and_sigterm():
    port = free_port()
    address = f"127.0.0.1:{port}"
    up = TandemUp(_up_args(port), new_session=True)
    proc = up.proc
    try:
        assert address in up.banner
        # No --redis-url: it started its own Redis-compatible server, and a real one answers there.
        redis_url = re.search(r"embedded Redis \(valkey-server\) at (redis://\S+)", up.output()).group(1)
        assert redis.Redis.from_url(redis_url, socket_timeout=2).ping()

        # The README's first example: a real answer (the chat template is applied), not an empty one.
        out = tandem("generate", "Write a haiku about GPUs.", "--address", address, "--max-tokens", "64")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        assert "completion" in out.stderr and "TTFT" in out.stderr

        status = tandem("status", "--address", address)
        assert status.returncode == 0, status.stderr
        assert "disaggregated" in status.stdout
        assert "prefill" in status.stdout and "decode" in status.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        out = up.output()
        assert "tandem: stopped" in out, out
        assert "SIGTERM received" not in out, out
        host, redis_port = urlsplit(redis_url).hostname, urlsplit(redis_url).port
        with pytest.raises(ConnectionRefusedError):  # and stopped it on exit
            socket.create_connection((host, redis_port), timeout=2).close()
    finally:
        up.kill()

    bad = tandem("generate", "hi", "--address", address, "--timeout", "5")
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_to_the_whole_process_group_drains_and_exits_0(sig):
    """As systemd, a container runtime or Ctrl-C in a terminal stop it: the signal reaches every process of its
    group. A stream in flight finishes, the exit status is 0, and Ray prints no "SIGTERM received" stack dump."""
    import grpc

    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc

    port = free_port()
    up = TandemUp(_up_args(port), new_session=True)
    proc = up.proc
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = generation_pb2_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(text="1, 2, 3, 4, 5,", sampling=pb.SamplingParams(temperature=0, max_tokens=48,
                                                                                   ignore_eos=True)),
                timeout=120)
            first = next(stream)
            assert first.HasField("chunk")
            os.killpg(proc.pid, sig)
            rest = list(stream)
        assert rest[-1].HasField("complete"), rest[-1]
        assert rest[-1].complete.usage.completion_tokens == 48
        assert proc.wait(timeout=120) == 0
        out = up.output()
        assert "tandem: stopped" in out, out
        assert "SIGTERM received" not in out, out
    finally:
        up.kill()


def test_a_busy_port_is_refused_before_the_cluster_starts():
    """Named at once (exit 2), not a traceback after Ray and the workers have started (new-user trial)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tandem("up", "--port", str(port), timeout=60)
        assert out.returncode == 2
        assert out.stderr.strip() == f"tandem up: --port: cannot listen on 127.0.0.1:{port}: Address already in use"
        out = tandem("up", "--port", str(free_port()), "--http-port", str(port), timeout=60)
        assert out.returncode == 2 and "--http-port: cannot listen" in out.stderr
