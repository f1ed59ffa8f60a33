"""guidellm, an external OpenAI-API load generator, against tandem's HTTP front and against a CPU peer.

guidellm is not tandem's dependency: it lives in its own venv with the peer (llama-cpp-python's OpenAI server),
made by `make peers` (the one pip command pins torch==2.13.0; otherwise guidellm pulls the CUDA build). It runs
offline: synthetic prompts sized with the default model's tokenizer, exported to a local directory here.

    # guidellm against a tandem that is already up (tandem up --http-port 8000), bounded in requests and time
    python benchmarks/bench_guidellm.py --target http://127.0.0.1:8000 --profile concurrent --streams 16

    # start the server itself: tandem (either mode) or llama-cpp-python on the same GGUF
    python benchmarks/bench_guidellm.py --serve tandem --mode colocated --streams 16
    python benchmarks/bench_guidellm.py --serve llamacpp --streams 16

    # the peer comparison of the issue: both servers, guidellm at 16 concurrent streams, one after the other
    python benchmarks/bench_guidellm.py --peer-comparison --markdown

    # tandem loadtest against guidellm on the same load (same arrivals and lengths) against one `tandem up`
    python benchmarks/bench_guidellm.py --loadtest-agreement --markdown

Each run writes guidellm's own JSON next to a summary JSON (--output-dir) with the command, machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / ".venv-peers"
GUIDELLM = PEERS_VENV / "bin" / "guidellm"
DEFAULT_OUTPUT_DIR = REPO / "bench-results" / "guidellm"


def default_gguf() -> Path:
    sys.path.insert(0, str(REPO))
    from workers.model.loader import resolve_model

    return resolve_model(None, "auto").gguf_file


def export_tokenizer(directory: Path) -> Path:
    """The default model's tokenizer as a Hugging Face directory, for guidellm's hf_auto tokenizer (no hub)."""
    if (directory / "tokenizer.json").exists():
        return directory
    sys.path.insert(0, str(REPO))
    from workers.model.loader import resolve_model
    from workers.tokenizer import load_tokenizer

    load_tokenizer(resolve_model(None, "auto")).save_pretrained(str(directory))
    return directory


# --- servers ---------------------------------------------------------------------------------------------

def _get_json(url: str, timeout_s: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2.0):
                return  # any 2xx; /health is 503 until every pool has a live worker
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


class Server:
    """A server subprocess on this machine: started, waited for, and stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: list[str], ready_url: str, log_path: Path, ready_timeout_s: float = 180):
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(ready_url, self.proc, ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def mode_args(mode: str) -> list[str]:
    """The machine's cores for each mode: one worker per core disaggregated (`tandem up`'s default), one worker
    with every core colocated (its default would give it one)."""
    if mode == "colocated":
        cores = str(os.cpu_count() or 1)
        return ["--workers", "1", "--num-cpus-per-worker", cores, "--torch-threads", cores]
    return []


def start_tandem(http_port: int, grpc_port: int, mode: str, log_dir: Path, extra: list[str]) -> Server:
    argv = [str(REPO / ".venv" / "bin" / "tandem"), "up", "--mode", mode, "--port", str(grpc_port),
            "--http-port", str(http_port), *extra]
    server = Server(argv, f"http://127.0.0.1:{http_port}/v1/models", log_dir / f"tandem-{mode}.log")
    # /v1/models answers as soon as the router listens; wait for the pools (health is 200 only when serving).
    wait_http(f"http://127.0.0.1:{http_port}/health", server.proc, 180)
    return server


def start_llamacpp(port: int, threads: int, log_dir: Path) -> Server:
    argv = [str(PEERS_VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(default_gguf()),
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--model_alias", "llamacpp"]
    return Server(argv, f"http://127.0.0.1:{port}/v1/models", log_dir / "llamacpp.log")


def served_model(base_url: str) -> str:
    return _get_json(f"{base_url}/v1/models")["data"][0]["id"]


# --- guidellm --------------------------------------------------------------------------------------------

def guidellm_argv(target: str, model: str, tokenizer_dir: Path, out_json: Path, args) -> list[str]:
    if args.profile == "concurrent":
        profile = f"kind=concurrent,streams={args.streams}"
    elif args.profile in ("constant", "poisson"):
        profile = f"kind={args.profile},rate={args.rate}"
    else:
        raise ValueError(f"--profile: must be concurrent, constant or poisson, got {args.profile!r}")
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    for name in ("prompt_tokens_stdev", "prompt_tokens_min", "prompt_tokens_max",
                 "output_tokens_stdev", "output_tokens_min", "output_tokens_max"):
        value = getattr(args, name)
        if value is not None:
            data += f",{name}={value}"
    return [
        str(GUIDELLM), "run",
        "--backend", f"kind=openai_http,target={target},model={model},request_format=/v1/completions,"
                     f"validate_backend=false,timeout={args.request_timeout_s}",
        "--profile", profile,
        "--constraint", f"kind=max_requests,count={args.max_requests}",
        "--constraint", f"kind=max_duration,seconds={args.max_seconds}",
        "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}",
        "--data", data,
        "--seed", f"kind=static,value={args.seed}",
        "--output", f"kind=json,path={out_json}",
        "--disable-progress",
    ]


def run_guidellm(target: str, tokenizer_dir: Path, out_dir: Path, label: str, args) -> dict:
    if not GUIDELLM.exists():
        raise SystemExit(f"{GUIDELLM} is missing: run `make peers` first")
    model = args.model or served_model(target)
    out_json = out_dir / f"guidellm-{label}.json"
    argv = guidellm_argv(target, model, tokenizer_dir, out_json, args)
    print("$", shlex.join(argv), flush=True)
    # guidellm's own bound is --max-seconds; this one only guards against a wedged client.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, timeout=args.max_seconds + 300, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = summarize_guidellm(json.loads(out_json.read_text()), label)
    # The client shares the machine with the server: its CPU time is part of the result.
    summary["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return summary


def summarize_guidellm(report: dict, label: str) -> dict:
    bench = report["benchmarks"][0]
    m = bench["metrics"]

    def stat(name: str, field: str, status: str = "successful"):
        return (m[name].get(status) or {}).get(field)

    totals = m["request_totals"]
    return {
        "label": label,
        "completed": totals["successful"],
        "errored": totals["errored"],
        "incomplete": totals["incomplete"],
        "duration_s": bench["duration"],
        "request_throughput": stat("requests_per_second", "mean", "total"),
        "output_throughput": stat("output_tokens_per_second", "mean", "total"),
        "median_ttft_ms": stat("time_to_first_token_ms", "median"),
        "p99_ttft_ms": (m["time_to_first_token_ms"]["successful"].get("percentiles") or {}).get("p99"),
        "median_tpot_ms": stat("time_per_output_token_ms", "median"),
        "median_itl_ms": stat("inter_token_latency_ms", "median"),
        "median_e2el_s": stat("request_latency", "median"),
    }


# --- experiments -----------------------------------------------------------------------------------------

def peer_comparison(args, out_dir: Path, tokenizer_dir: Path) -> list[dict]:
    rows = []
    for mode in args.modes:
        server = start_tandem(args.http_port, args.grpc_port, mode, out_dir, mode_args(mode) + args.tandem_args)
        try:
            rows.append(run_guidellm(f"http://127.0.0.1:{args.http_port}", tokenizer_dir, out_dir,
                                     f"tandem-{mode}", args))
        finally:
            server.stop()
    server = start_llamacpp(args.peer_port, args.peer_threads, out_dir)
    try:
        rows.append(run_guidellm(f"http://127.0.0.1:{args.peer_port}", tokenizer_dir, out_dir, "llama-cpp-python", args))
    finally:
        server.stop()
    return rows


def apply_scenario(args, name: str) -> None:
    """Set guidellm's profile and synthetic lengths to the scenario's: the same load from both clients."""
    sys.path.insert(0, str(REPO))
    from loadtest.scenario import load_scenario

    sc = load_scenario(name)
    if len(sc.requests) != 1 or sc.shared_prefix is not None:
        raise SystemExit(f"--scenario {name}: guidellm's synthetic data has one length distribution and no shared "
                         "prefix; pick a scenario with one request class")
    arrival = sc.arrival
    if arrival.process in ("poisson", "constant"):
        args.profile, args.rate = arrival.process, arrival.rate
    elif arrival.process == "concurrency":
        args.profile, args.streams = "concurrent", arrival.concurrency
    else:
        raise SystemExit(f"--scenario {name}: arrival.process {arrival.process!r} has no guidellm profile "
                         "(poisson, constant or concurrency)")
    for side, dist in (("prompt_tokens", sc.requests[0].prompt_len), ("output_tokens", sc.requests[0].output_len)):
        if dist.dist == "fixed":
            setattr(args, side, dist.value)
        elif dist.dist == "normal":
            setattr(args, side, round(dist.mean))
            for stat, value in (("stdev", dist.std), ("min", dist.min), ("max", dist.max)):
                setattr(args, f"{side}_{stat}", round(value))
        else:
            raise SystemExit(f"--scenario {name}: {side} dist {dist.dist!r} has no guidellm equivalent (fixed, normal)")
    args.seed = sc.seed


def loadtest_agreement(args, out_dir: Path, tokenizer_dir: Path) -> list[dict]:
    """One `tandem up`; `tandem loadtest` (gRPC) then guidellm (HTTP) with the same arrivals and lengths."""
    apply_scenario(args, args.scenario)
    args.max_requests = max(args.max_requests, 10 * args.max_seconds)  # the duration bounds both runs
    mode = args.modes[0]
    server = start_tandem(args.http_port, args.grpc_port, mode, out_dir, mode_args(mode) + args.tandem_args)
    try:
        lt_dir = out_dir / "loadtest"
        argv = [str(REPO / ".venv" / "bin" / "tandem"), "loadtest", args.scenario, "--target",
                f"127.0.0.1:{args.grpc_port}", "--duration", str(args.max_seconds), "--output-dir", str(lt_dir),
                "--no-progress"]
        print("$", shlex.join(argv), flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, check=True, timeout=args.max_seconds + 600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lt = json.loads((lt_dir / "result.json").read_text())
        rows = [{
            "label": f"tandem loadtest {Path(args.scenario).stem}", "completed": lt["completed"], "errored": lt["failed"],
            "incomplete": 0, "duration_s": lt["duration"], "request_throughput": lt["request_throughput"],
            "output_throughput": lt["output_throughput"], "median_ttft_ms": lt["median_ttft_ms"],
            "p99_ttft_ms": lt["p99_ttft_ms"], "median_tpot_ms": lt["median_tpot_ms"],
            "median_itl_ms": lt["median_itl_ms"], "median_e2el_s": lt["median_e2el_ms"] / 1e3,
            "client_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        }]
        rows.append(run_guidellm(f"http://127.0.0.1:{args.http_port}", tokenizer_dir, out_dir, "guidellm", args))
    finally:
        server.stop()
    return rows


def markdown(rows: list[dict], ratio_to: str | None = None) -> str:
    head = ("| run | completed | errored | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
            "| ITL p50 (ms) | client CPU (cores) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['completed']} | {r['errored'] + r['incomplete']} | {r['output_throughput']:.1f} "
            f"| {r['request_throughput']:.2f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} "
            f"| {r['median_tpot_ms']:.1f} | {r['median_itl_ms']:.1f} | {r['client_cpu_s'] / r['duration_s']:.2f} |")
    if ratio_to:
        base = next(r for r in rows if r["label"] == ratio_to)
        for r in rows:
            if r is not base:
                lines.append(f"\n{r['label']} / {ratio_to}: output tok/s {r['output_throughput'] / base['output_throughput']:.2f}x, "
                             f"TTFT p50 {r['median_ttft_ms'] / base['median_ttft_ms']:.2f}x")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--target", help="base URL of a running OpenAI-compatible server")
    what.add_argument("--serve", choices=("tandem", "llamacpp"), help="start this server, run guidellm, stop it")
    what.add_argument("--peer-comparison", action="store_true", help="tandem (--modes) and llama-cpp-python")
    what.add_argument("--loadtest-agreement", action="store_true",
                      help="tandem loadtest SCENARIO and guidellm on the same load against one tandem up")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models id)")
    p.add_argument("--profile", default="concurrent", choices=("concurrent", "constant", "poisson"))
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (profile concurrent)")
    p.add_argument("--rate", type=float, default=1.0, help="requests/s (profiles constant and poisson)")
    p.add_argument("--max-requests", type=int, default=200)
    p.add_argument("--max-seconds", type=int, default=120)
    p.add_argument("--request-timeout-s", type=float, default=300)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    for name in ("prompt-tokens", "output-tokens"):
        for stat in ("stdev", "min", "max"):
            p.add_argument(f"--{name}-{stat}", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", default=["disaggregated"], choices=("disaggregated", "colocated"))
    p.add_argument("--mode", dest="modes", type=lambda m: [m], help="one tandem mode (same as --modes M)")
    p.add_argument("--scenario", default="chat", help="loadtest scenario for --loadtest-agreement")
    p.add_argument("--tandem-args", default="", type=shlex.split, help="extra `tandem up` options, quoted")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--peer-port", type=int, default=8100)
    p.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.output_dir or DEFAULT_OUTPUT_DIR / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = export_tokenizer(REPO / "bench-results" / "smollm2-tokenizer")

    ratio_to = None
    if args.peer_comparison:
        rows = peer_comparison(args, out_dir, tokenizer_dir)
        ratio_to = "llama-cpp-python"
    elif args.loadtest_agreement:
        rows = loadtest_agreement(args, out_dir, tokenizer_dir)
        ratio_to = "guidellm"
    elif args.serve == "tandem":
        server = start_tandem(args.http_port, args.grpc_port, args.modes[0], out_dir,
                              mode_args(args.modes[0]) + args.tandem_args)
        try:
            rows = [run_guidellm(f"http://127.0.0.1:{args.http_port}", tokenizer_dir, out_dir,
                                 f"tandem-{args.modes[0]}", args)]
        finally:
            server.stop()
    elif args.serve == "llamacpp":
        server = start_llamacpp(args.peer_port, args.peer_threads, out_dir)
        try:
            rows = [run_guidellm(f"http://127.0.0.1:{args.peer_port}", tokenizer_dir, out_dir, "llama-cpp-python", args)]
        finally:
            server.stop()
    else:
        rows = [run_guidellm(args.target or f"http://127.0.0.1:{args.http_port}", tokenizer_dir, out_dir, "target", args)]

    report(rows, out_dir, markdown(rows, ratio_to) if args.markdown else None)
    return 0


def report(rows: list[dict], out_dir: Path, markdown_text: str | None) -> None:
    """Write summary.json (the rows with the command, date and machine) and print the markdown, or the JSON."""
    summary = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "rows": rows,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(markdown_text if markdown_text is not None else json.dumps(summary, indent=2))
    print(f"\nresults in {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
