"""`tandem up` as a user runs it: a subprocess that serves until SIGTERM; `tandem generate` and `tandem status`
talk to it."""
from __future__ import annotations

import os
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


def _start_up(port: int) -> tuple[subprocess.Popen, queue.Queue, list[str]]:
    """`tandem up` in its own process group (as a shell job or a service is), serving; its output so far."""
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--port", str(port), "--http-port", "0",
                             "--kv-cache-memory-bytes", str(128 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                pytest.fail("tandem up exited:\n" + "".join(log))
            continue
        log.append(line)
        if "router listening on" in line:
            return proc, lines, log
    proc.kill()
    pytest.fail("tandem up did not come up:\n" + "".join(log))


def _rest(proc: subprocess.Popen, lines: queue.Queue, log: list[str]) -> str:
    time.sleep(0.5)
    while not lines.empty():
        log.append(lines.get())
    return "".join(log)


def test_tandem_up_generate_status_and_sigterm():
    port = _free_port()
    address = f"127.0.0.1:{port}"
    proc, lines, log = _start_up(port)
    try:
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
        out = _rest(proc, lines, log)
        assert "tandem: stopped" in out, out
        assert "SIGTERM received" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    bad = _tandem("generate", "hi", "--address", address, "--timeout", "5")
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_to_the_whole_process_group_drains_and_exits_0(sig):
    """As systemd, a container runtime or Ctrl-C in a terminal stop it: the signal reaches every process of its
    group. A stream in flight finishes, the exit status is 0, and Ray prints no "SIGTERM received" stack dump."""
    import grpc

    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc

    port = _free_port()
    proc, lines, log = _start_up(port)
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
        out = _rest(proc, lines, log)
        assert "tandem: stopped" in out, out
        assert "SIGTERM received" not in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
