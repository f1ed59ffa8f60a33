"""`tandem up` in a session of its own, so that a stop signal sent to a whole process group drains it.

Ray starts its GCS, raylet and worker processes in the caller's process group and blocks only SIGINT in them
(`ray._private.services.start_ray_process`): Ctrl-C reaches the driver alone, but a SIGTERM sent to the group
(`kill -TERM -PGID`, a container runtime, systemd stopping a unit whose processes share a group) kills the workers
mid-request and the GCS, after which Ray's core worker in the driver aborts (SIGABRT) and its C++ failure handler
prints "SIGTERM received" with a stack.

So `tandem up` is two processes. The supervisor (`run_in_own_session`) stays in the caller's process group and
runs the cluster in a child in a new session (the child and every Ray process it starts). Each SIGINT, SIGTERM or
SIGHUP the supervisor gets becomes one SIGINT to the child, which drains and stops everything; the supervisor
exits with the child's status. If the supervisor is killed, the child gets SIGINT as well (Linux
`PR_SET_PDEATHSIG`), so nothing is left running.

systemd sends its stop signal to every process of the unit's cgroup, whatever the group: run `tandem up` there with
`KillMode=mixed` (SIGTERM to the main process, SIGKILL to the rest after `TimeoutStopSec`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

# Set (to the supervisor's pid) in the child's environment: the child serves instead of supervising.
CHILD_ENV = "TANDEM_UP_SUPERVISOR_PID"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def is_child() -> bool:
    """True in the process that serves (the supervisor's child)."""
    return CHILD_ENV in os.environ


def run_in_own_session(argv: list[str]) -> int:
    """Run `python -m cluster.cli *argv` in a new session, forwarding stop signals as SIGINT; returns its exit
    status (128 + N when signal N ended it, as shells report)."""
    child: subprocess.Popen | None = None
    early: list[int] = []

    def forward(signum, frame):
        if child is None:
            early.append(signum)
        else:
            child.send_signal(signal.SIGINT)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    env = {**os.environ, CHILD_ENV: str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], env=env, start_new_session=True)
    if early:
        child.send_signal(signal.SIGINT)
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


def stop_with_supervisor() -> None:
    """In the child, before anything starts: get SIGINT when the supervisor dies (Linux; elsewhere a no-op), and
    exit at once if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0) != 0:
        return
    if str(os.getppid()) != os.environ.get(CHILD_ENV):
        raise SystemExit("tandem up: the supervising process is gone")
