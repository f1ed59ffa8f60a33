"""Record the autoscaler's metric series from a real cluster under a ramp, for the planner's tests.

Starts `tandem up` (1 prefill + 1 decode worker, the default model), collects what the autoscaler would see every
`--interval-s` (cluster/autoscaler/metrics.py: the router's GetStatus and /metrics), while `tandem loadtest`
runs the `ramp` scenario (0.25 -> 3 req/s over --ramp-s) and then nothing for --idle-s. Writes one JSON line per
interval: {"t_s", "pools": {role: PoolReplicas fields}, "sample": {role: PoolLoad fields} or null}, and prints
what the planner (default options, dry run) decides on it.

    python benchmarks/record_autoscaler_series.py --out tests/cluster/autoscaler/data/ramp_1p1d.jsonl
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.autoscaler.metrics import RouterScraper, SampleBuilder  # noqa: E402
from cluster.autoscaler.planner import Planner, PlannerConfig, PoolLimits  # noqa: E402
from cluster.autoscaler.series import load_series, series_row  # noqa: E402
from cluster.pools import PoolReplicas  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests/cluster/autoscaler/data/ramp_1p1d.jsonl"))
    ap.add_argument("--interval-s", type=float, default=5.0)
    ap.add_argument("--ramp-s", type=int, default=150)
    ap.add_argument("--idle-s", type=int, default=60)
    args = ap.parse_args()

    port, http_port = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    up = subprocess.Popen([str(bin_dir / "tandem"), "up", "--port", str(port), "--http-port", str(http_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in up.stdout:
            print("  up:", line.rstrip())
            if "router listening" in line:
                break
        else:
            print("tandem up exited before serving", file=sys.stderr)
            return 1
        threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()
        scraper = RouterScraper(lambda: [(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/metrics")])
        builder = SampleBuilder()
        rows: list[str] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def record():
            while not stop.is_set():
                now = time.monotonic() - t0
                workers, routers = scraper.collect()
                sample = builder.update(now, workers, routers)
                pools = {}
                for role in ("prefill", "decode"):
                    n = sum(w.role == role for w in workers)
                    pools[role] = PoolReplicas(desired=1, ready=n, starting=max(1 - n, 0))
                rows.append(series_row(now, pools, sample))
                stop.wait(args.interval_s - (time.monotonic() - t0 - now))

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        time.sleep(2 * args.interval_s)  # idle before the ramp
        subprocess.run([str(bin_dir / "tandem"), "loadtest", "ramp", "--target", f"127.0.0.1:{port}",
                        "--duration", str(args.ramp_s), "--no-progress", "--output-dir", "/tmp/autoscaler-ramp"],
                       check=False)
        time.sleep(args.idle_s)
        stop.set()
        recorder.join()
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(rows))
    print(f"{len(rows)} samples -> {out}")
    planner = Planner(PlannerConfig(pools={"prefill": PoolLimits(1, 4), "decode": PoolLimits(1, 4)}))
    for t_s, pools, sample in load_series(out):
        decisions = planner.plan(t_s, pools, sample)
        for d in decisions.values():
            if d.changes:
                planner.not_applied(d.role, d.current)
        print(f"{t_s:7.1f} " + "  ".join(f"{d.role}: {d.reason} {d.current}->{d.desired} "
                                        f"u={'-' if d.utilization is None else f'{d.utilization:.2f}'}"
                                        for d in decisions.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
