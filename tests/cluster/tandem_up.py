"""`tandem` as a user runs it, for the CLI tests: `tandem up` as a subprocess until it serves, and one-shot commands."""
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

# Model load and Ray start on a loaded 2-core machine.
UP_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """One `tandem` command (generate, status, ...) to its end."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=timeout)


class TandemUp:
    """`tandem up *args`, started and read until its "router listening on" banner (test failure otherwise).

    `new_session`: in its own process group, as a shell job or a service is, so a test can signal the group.
    """

    def __init__(self, args: list[str], new_session: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.log: list[str] = []
        deadline = time.monotonic() + UP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail("tandem up exited:\n" + self.output())
                continue
            self.log.append(line)
            if "router listening on" in line:
                self.banner = line
                return
        self.kill()
        pytest.fail("tandem up did not come up:\n" + self.output())

    def output(self) -> str:
        """Everything it printed so far (after it exited: everything)."""
        time.sleep(0.5)
        while not self._lines.empty():
            self.log.append(self._lines.get())
        return "".join(self.log)

    def kill(self) -> None:
        """SIGKILL it (its whole group when it has its own) if it still runs."""
        if self.proc.poll() is None:
            if os.getpgid(self.proc.pid) == self.proc.pid:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait(10)
