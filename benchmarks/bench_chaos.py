"""Chaos under load: a real local cluster (2 prefill + 2 decode workers, one router) serving steady greedy streams
while workers are killed and stopped. tests/cluster/test_chaos.py runs the same scenario and asserts on it.

The scenario, after a reference pass (each prompt once, before any fault) and a warm-up under load:
  0. SIGSTOP the busiest decode worker for `pause_s` (shorter than the controller's health-check timeout, so it
     is not replaced), then SIGCONT: the router routes around it and takes it back when it answers.
  1. SIGKILL the busiest prefill worker; a moment later SIGKILL the busiest decode worker; wait for both pools
     to be full again (the controller replaces them, the router sees the replacements live).
  2. SIGSTOP the busiest decode worker for `stop_s` (its connections stay open), then SIGCONT; meanwhile SIGKILL
     the replacement prefill worker from step 1 (the other pool, so one worker of each pool keeps serving).
     Wait for the pools; stop the clients; wait until every worker is idle and holds no KV.

It reports: requests, completed, failed by gRPC code, wrong outputs (a completed greedy stream whose tokens differ
from the reference pass), migrations, the longest pause between two chunks of any stream, the longest TTFT, the
time from SIGSTOP to the router marking the worker down, from SIGCONT to the router taking it back, the time from
each fault until its pool was full, and the workers still holding KV blocks or requests once the load stopped.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_chaos.py                 # prints a JSON report
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_chaos.py --markdown      # and a table for docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import grpc  # noqa: E402

from tandem.v1 import generation_pb2 as pb  # noqa: E402
from tandem.v1 import generation_pb2_grpc  # noqa: E402

PROMPTS = (
    "The history of the printing press begins",
    "Write a short story about a robot who learns to paint.",
    "1, 2, 3, 4, 5,",
    "Explain how a bicycle stays upright while moving.",
    "The recipe for a simple tomato soup is",
    "In the year 2100, cities will",
    "A list of the planets of the solar system: Mercury,",
    "def fibonacci(n):\n    ",
)
# Small enough for four workers on two cores.
ENGINE = dict(max_num_seqs=16, kv_cache_memory_bytes=128 << 20)
POOLS = ("prefill", "decode")


@dataclass
class RequestRecord:
    prompt_index: int
    started: float
    ended: float = 0.0
    code: str | None = None  # the gRPC status name of a failed request; None: it completed
    details: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_migrations: int = 0
    ttft_s: float | None = None
    max_gap_s: float = 0.0  # the longest pause between two chunks after the first


@dataclass
class ChaosReport:
    records: list[RequestRecord]
    reference: dict[int, list[int]]
    events: list[tuple[float, str]]  # seconds since the load started, what happened
    detect_s: float | None  # SIGSTOP (20 s) -> the router marks the worker down; None: never
    pause_detect_s: float | None  # SIGSTOP (pause_s) -> marked down
    rejoin_s: float | None  # SIGCONT after pause_s -> up again in the router; None: not within the wait
    leaked: list[str]  # workers holding KV blocks, held KV or requests after the load stopped
    refill_s: dict[str, float | None]  # fault -> seconds until its pool was full again (None: not within the wait)
    pools_back: bool  # every pool full at the end, in the registry and live in the router
    hung: int  # client threads still running after their request deadline

    @property
    def failed_by_code(self) -> dict[str, int]:
        return dict(Counter(r.code for r in self.records if r.code is not None))

    @property
    def completed(self) -> list[RequestRecord]:
        return [r for r in self.records if r.code is None]

    @property
    def wrong(self) -> list[RequestRecord]:
        return [r for r in self.completed if r.token_ids != self.reference[r.prompt_index]]

    def summary(self) -> dict:
        gaps = [r.max_gap_s for r in self.records]
        ttfts = [r.ttft_s for r in self.records if r.ttft_s is not None]
        return {
            "requests": len(self.records), "completed": len(self.completed), "failed_by_code": self.failed_by_code,
            "wrong_outputs": len(self.wrong), "hung": self.hung,
            "migrations": sum(r.num_migrations for r in self.completed),
            "max_stall_s": round(max(gaps, default=0.0), 2), "max_ttft_s": round(max(ttfts, default=0.0), 2),
            "detect_stopped_s": None if self.detect_s is None else round(self.detect_s, 2),
            "detect_paused_s": None if self.pause_detect_s is None else round(self.pause_detect_s, 2),
            "rejoin_after_pause_s": None if self.rejoin_s is None else round(self.rejoin_s, 2),
            "leaked": self.leaked,
            "refill_s": {k: None if v is None else round(v, 1) for k, v in self.refill_s.items()},
            "pools_back": self.pools_back,
            "events": [f"{t:6.1f} s  {what}" for t, what in self.events],
        }


class _LoopThread:
    """An asyncio loop on a background thread, for the router."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chaos-router", daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ChaosRun:
    """One run of the scenario; `run()` brings the cluster up, runs it and takes everything down again."""

    def __init__(self, *, clients: int = 4, max_tokens: int = 32, stop_s: float = 20.0, pause_s: float = 4.0,
                 warmup_s: float = 3.0,
                 request_timeout_s: float = 90.0, pool_wait_s: float = 180.0, engine: dict | None = None):
        self.clients = clients
        self.max_tokens = max_tokens
        self.stop_s = stop_s
        self.pause_s = pause_s
        self.warmup_s = warmup_s
        self.request_timeout_s = request_timeout_s
        self.pool_wait_s = pool_wait_s
        self.engine = dict(ENGINE if engine is None else engine)
        self.records: list[RequestRecord] = []
        self.events: list[tuple[float, str]] = []
        self.victims: set[str] = set()
        self._seen: list[str] = []  # worker ids in the order this run first saw them listed
        self._by_id: dict = {}
        self._t0 = 0.0
        self._lock = threading.Lock()

    # --- the run ----------------------------------------------------------------------------------------------

    def run(self) -> ChaosReport:
        from cluster.config import ClusterConfig
        from cluster.controller import Controller
        from router.config import RouterConfig
        from router.server import Router

        self.controller = Controller(ClusterConfig(num_prefill_workers=2, num_decode_workers=2, engine=self.engine,
                                                   health_check_period_s=0.5))
        loops = _LoopThread()
        self.router = None
        try:
            registry = self.controller.start()
            # max_local_prefill_length=0: every request goes prefill worker -> KV -> decode worker.
            self.router = Router(RouterConfig(port=0, http_port=-1, registry_address=registry,
                                              max_local_prefill_length=0))
            address = loops.run(self.router.start())
            loops.run(self.router.wait_ready(timeout_s=60))
            with grpc.insecure_channel(address) as channel:
                self.stub = generation_pb2_grpc.GenerationStub(channel)
                return self._scenario()
        finally:
            if self.router is not None:
                loops.run(self.router.stop(grace_s=1))
            loops.close()
            self.controller.stop()

    def _scenario(self) -> ChaosReport:
        reference = {}
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            for i, record in enumerate(pool.map(self._request, range(len(PROMPTS)))):
                if record.code is not None:
                    raise RuntimeError(f"reference pass: prompt {i} failed: {record.code}: {record.details}")
                reference[i] = record.token_ids
        self._pools_full()  # the first workers are seen
        self._t0 = time.monotonic()
        stop_clients = threading.Event()
        threads = [threading.Thread(target=self._client, args=(c, stop_clients), name=f"chaos-client-{c}",
                                    daemon=True) for c in range(self.clients)]
        for t in threads:
            t.start()
        refill: dict[str, float | None] = {}
        time.sleep(self.warmup_s)

        paused = self._busiest("decode")
        paused_at = self._signal_worker(paused, signal.SIGSTOP, victim=False)
        pause_detect_s = self._wait_down(paused, paused_at, self.pause_s)
        time.sleep(max(0.0, paused_at + self.pause_s - time.monotonic()))
        resumed_at = self._signal_worker(paused, signal.SIGCONT)
        rejoin_s = self._wait_up(paused, resumed_at, 30.0)

        killed_prefill = self._signal("prefill", signal.SIGKILL)
        time.sleep(2.0)
        killed_decode = self._signal("decode", signal.SIGKILL)
        refill.update(self._wait_pools({"kill prefill": killed_prefill, "kill decode": killed_decode}))

        stopped = self._busiest("decode")
        stopped_at = self._signal_worker(stopped, signal.SIGSTOP)
        replacement = next(self._by_id[wid] for wid in reversed(self._seen)
                           if self._by_id[wid].role == "prefill" and wid not in self.victims)
        killed_again = self._signal_worker(replacement, signal.SIGKILL)
        detect_s = self._wait_down(stopped, stopped_at, self.stop_s)
        time.sleep(max(0.0, stopped_at + self.stop_s - time.monotonic()))
        self._signal_worker(stopped, signal.SIGCONT)
        refill.update(self._wait_pools({f"stop decode {self.stop_s:.0f} s": stopped_at,
                                        "kill the replacement prefill": killed_again}))
        time.sleep(2.0)

        stop_clients.set()
        for t in threads:
            t.join(self.request_timeout_s + 10)
        hung = sum(t.is_alive() for t in threads)
        self._event("clients stopped")
        pools_back = self._pools_full()
        leaked = self._wait_idle(45.0)
        return ChaosReport(records=list(self.records), reference=reference, events=list(self.events),
                           detect_s=detect_s, pause_detect_s=pause_detect_s, rejoin_s=rejoin_s, leaked=leaked,
                           refill_s=refill, pools_back=pools_back, hung=hung)

    # --- load -------------------------------------------------------------------------------------------------

    def _client(self, index: int, stop: threading.Event) -> None:
        i = index
        while not stop.is_set():
            record = self._request(i % len(PROMPTS))
            with self._lock:
                self.records.append(record)
            i += 1

    def _request(self, prompt_index: int) -> RequestRecord:
        sampling = pb.SamplingParams(temperature=0, max_tokens=self.max_tokens, ignore_eos=True)
        req = pb.GenerateRequest(text=PROMPTS[prompt_index], sampling=sampling)
        record = RequestRecord(prompt_index, started=time.monotonic())
        last = None
        try:
            for resp in self.stub.Generate(req, timeout=self.request_timeout_s):
                now = time.monotonic()
                if resp.HasField("chunk"):
                    record.token_ids += resp.chunk.token_ids
                    if last is None:
                        record.ttft_s = now - record.started
                    else:
                        record.max_gap_s = max(record.max_gap_s, now - last)
                    last = now
                else:
                    record.num_migrations = resp.complete.timings.num_migrations
        except grpc.RpcError as e:
            record.code, record.details = e.code().name, e.details() or ""
        record.ended = time.monotonic()
        return record

    # --- faults -----------------------------------------------------------------------------------------------

    def _event(self, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, what))

    def _busiest(self, role: str):
        """The listed worker of `role` with the most requests, as the router last saw its stats."""
        workers = [w for w in self.controller.workers() if w.role == role and w.worker_id not in self.victims]
        handles = self.router.pool.workers

        def load(info) -> int:
            h = handles.get(info.worker_id)
            return h.stats.num_running + h.stats.num_waiting if h is not None and h.stats is not None else -1
        return max(workers, key=load)

    def _signal(self, role: str, sig: signal.Signals) -> float:
        return self._signal_worker(self._busiest(role), sig)

    def _signal_worker(self, info, sig: signal.Signals, victim: bool = True) -> float:
        at = time.monotonic()
        try:
            os.kill(info.pid, sig)
        except ProcessLookupError:
            self._event(f"{sig.name} {info.role} {info.worker_id}: already gone")
            return at
        if victim and sig != signal.SIGCONT:
            self.victims.add(info.worker_id)
        self._event(f"{sig.name} {info.role} {info.worker_id} (pid {info.pid})")
        return at

    def _wait_down(self, info, since: float, limit_s: float) -> float | None:
        """Seconds from `since` until the router marks the worker down (None: not within `limit_s`)."""
        while time.monotonic() < since + limit_s:
            h = self.router.pool.workers.get(info.worker_id)
            if h is None or h.down_since is not None:
                down_at = h.down_since if h is not None else time.monotonic()
                self._event(f"router: {info.worker_id} down")
                return down_at - since
            time.sleep(0.02)
        return None

    def _wait_up(self, info, since: float, limit_s: float) -> float | None:
        """Seconds from `since` until the router has the worker up again (None: not within `limit_s`)."""
        while time.monotonic() < since + limit_s:
            h = self.router.pool.workers.get(info.worker_id)
            if h is not None and h.is_up:
                self._event(f"router: {info.worker_id} up")
                return time.monotonic() - since
            time.sleep(0.02)
        return None

    def _wait_idle(self, limit_s: float) -> list[str]:
        """Wait until every listed worker runs nothing and holds no KV (leases last 30 s); those that still do."""
        deadline = time.monotonic() + limit_s
        while True:
            busy = [f"{s.info.worker_id}: {s.num_running} running, {s.num_waiting} waiting, {s.num_used_blocks} "
                    f"blocks, {s.num_kv_held} KV held" for s in self.controller.worker_stats(timeout_s=5.0)
                    if s.num_running or s.num_waiting or s.num_used_blocks or s.num_kv_held]
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(0.5)

    def _pools_full(self) -> bool:
        listed = [w for w in self.controller.workers() if w.worker_id not in self.victims]
        for w in listed:
            if w.worker_id not in self._by_id:
                self._seen.append(w.worker_id)
                self._by_id[w.worker_id] = w
        expected = {"prefill": 2, "decode": 2}
        return all(sum(w.role == role for w in listed) == n and self.router.pool.num_live(role) == n
                   for role, n in expected.items())

    def _wait_pools(self, faults: dict[str, float]) -> dict[str, float | None]:
        """Wait until every pool is full again without the victims; seconds from each fault until then."""
        deadline = time.monotonic() + self.pool_wait_s
        while time.monotonic() < deadline:
            if self._pools_full():
                now = time.monotonic()
                self._event("pools full: 2 prefill + 2 decode")
                return {what: now - at for what, at in faults.items()}
            time.sleep(0.2)
        return {what: None for what in faults}


# --- the record -------------------------------------------------------------------------------------------

def markdown(summary: dict) -> str:
    failed = ", ".join(f"{n} {code}" for code, n in sorted(summary["failed_by_code"].items())) or "0"
    rows = [("requests", summary["requests"]), ("completed", summary["completed"]), ("failed", failed),
            ("wrong greedy outputs", summary["wrong_outputs"]), ("hung", summary["hung"]),
            ("migrations", summary["migrations"]), ("longest pause in a stream", f"{summary['max_stall_s']} s"),
            ("longest TTFT", f"{summary['max_ttft_s']} s"),
            ("SIGSTOP (20 s) → worker marked down", f"{summary['detect_stopped_s']} s"),
            ("SIGSTOP (4 s) → worker marked down", f"{summary['detect_paused_s']} s"),
            ("SIGCONT after 4 s → worker back in the router", f"{summary['rejoin_after_pause_s']} s"),
            ("workers holding KV or requests afterwards", len(summary["leaked"]))]
    rows += [(f"{what} → pools full", f"{s} s") for what, s in summary["refill_s"].items()]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="client threads, each one stream at a time")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stop-s", type=float, default=20.0, help="how long the decode worker stays stopped")
    p.add_argument("--output", default=None, help="also write the JSON report here")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()[0]
    report = ChaosRun(clients=args.clients, max_tokens=args.max_tokens, stop_s=args.stop_s).run()
    # Other jobs on the machine show in the load average: a stall they cause looks like a slow worker.
    result = {"command": shlex.join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "date": date, "load_avg_1m": [load_before, os.getloadavg()[0]],
              **report.summary()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
