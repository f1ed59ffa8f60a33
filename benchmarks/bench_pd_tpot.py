"""Disaggregated against colocated on the `mixed` load-test scenario: long prompts arriving among running decodes.

In a colocated worker every long prefill shares steps with the running decodes, so their time per output token
jumps while it runs; with chunked prefill off (vLLM's --no-enable-chunked-prefill) a whole 1-1.5k-token prompt
is one step. Disaggregated, the decode worker never computes a long prompt: it imports the prompt's KV. The
number compared is TPOT p99 (`p99_tpot_ms`, vllm bench serve's definition).

Each configuration gets a fresh `tandem up` with the same CPU budget (2 cores: 1 prefill + 1 decode worker of
one thread each, or 1 colocated worker of two threads), then `tandem loadtest mixed`:

    python benchmarks/bench_pd_tpot.py --markdown
    python benchmarks/bench_pd_tpot.py --duration 120 --configs disaggregated colocated-no-chunked colocated
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guidellm import REPO, report, start_tandem  # noqa: E402

CONFIGS = {
    "disaggregated": ["--mode", "disaggregated", "--torch-threads", "1", "--max-model-len", "2048"],
    # max_num_batched_tokens must hold the longest prompt when prompts are not chunked.
    "colocated-no-chunked": ["--mode", "colocated", "--workers", "1", "--num-cpus-per-worker", "2",
                             "--torch-threads", "2", "--no-enable-chunked-prefill", "--max-model-len", "2048",
                             "--max-num-batched-tokens", "2048"],
    "colocated": ["--mode", "colocated", "--workers", "1", "--num-cpus-per-worker", "2", "--torch-threads", "2",
                  "--max-model-len", "2048"],
}
KEYS = ("completed", "failed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
        "p90_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "request_goodput")


def run_config(name: str, args, out_dir: Path) -> dict:
    server = start_tandem(args.http_port, args.grpc_port, CONFIGS[name][1], out_dir, CONFIGS[name][2:])
    try:
        run_dir = out_dir / name
        argv = [str(REPO / ".venv" / "bin" / "tandem"), "loadtest", args.scenario, "--target",
                f"127.0.0.1:{args.grpc_port}", "--output-dir", str(run_dir), "--no-progress"]
        if args.duration:
            argv += ["--duration", str(args.duration)]
        print("$", shlex.join(argv), flush=True)
        subprocess.run(argv, check=True, timeout=(args.duration or 600) + 600)
    finally:
        server.stop()
    result = json.loads((run_dir / "result.json").read_text())
    return {"config": name, **{k: result[k] for k in KEYS}, "result": str(run_dir / "result.json")}


def markdown(rows: list[dict]) -> str:
    lines = ["| config | completed | failed | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
             "| TPOT p90 (ms) | TPOT p99 (ms) | ITL p99 (ms) | goodput (req/s) |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['config']} | {r['completed']} | {r['failed']} | {r['output_throughput']:.1f} "
                     f"| {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} "
                     f"| {r['p90_tpot_ms']:.1f} | {r['p99_tpot_ms']:.1f} | {r['p99_itl_ms']:.1f} "
                     f"| {r['request_goodput']:.3f} |")
    by = {r["config"]: r for r in rows}
    if "disaggregated" in by:
        for other in ("colocated-no-chunked", "colocated"):
            if other in by:
                ratio = by["disaggregated"]["p99_tpot_ms"] / by[other]["p99_tpot_ms"]
                lines.append(f"\nTPOT p99 disaggregated / {other}: {ratio:.2f}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["disaggregated", "colocated-no-chunked"], choices=list(CONFIGS))
    p.add_argument("--scenario", default="mixed")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: the scenario's)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.output_dir or REPO / "bench-results" / "pd-tpot" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_config(name, args, out_dir) for name in args.configs]
    report(rows, out_dir, markdown(rows) if args.markdown else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
