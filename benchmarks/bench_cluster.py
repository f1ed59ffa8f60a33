"""Cluster benchmark: the engine benchmark's workload through a real local cluster against the offline engine.

One run measures, on this machine:

  throughput    the workload (64 requests, prompts 32-512, outputs 16-256, seed 0; every request produces exactly
                its output length) submitted at once, through the offline engine in this process and through
                the cluster over gRPC (Ray workers in their own processes, a router); ratio = cluster / offline.
  TTFT          requests one at a time (no queueing), through both; "added" = cluster p50 - offline p50. The
                offline engine runs with the prefill worker's thread count, so both compute the same prefill.
  KV transfer   bytes / seconds of every pull the decode workers made during the workload, against the
                transport's raw bandwidth measured in the same run: as the worker saw each pull (from handing it
                to a fetch thread until that thread held every shard), and inside the transport's fetch calls
                (the copy and its protocol, without the wait for the fetch thread).

    python benchmarks/bench_cluster.py --markdown                    # disaggregated and colocated
    python benchmarks/bench_cluster.py --modes disaggregated --torch-threads 2

Results go to a JSON file (--output) with the command line, the machine and the date.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import grpc  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_engine import exact_len_params, make_workload, random_prompt  # noqa: E402
from tandem.v1 import generation_pb2 as pb  # noqa: E402
from tandem.v1 import generation_pb2_grpc  # noqa: E402
from workers import LLM  # noqa: E402
from workers.kv_transfer import make_kv_transport  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- offline ---------------------------------------------------------------------------------------------

def offline_throughput(llm: LLM, workload) -> dict:
    t0 = time.perf_counter()
    outs = llm.generate([w.prompt_ids for w in workload], [exact_len_params(w.output_len) for w in workload])
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == w.output_len for o, w in zip(outs, workload))
    n = sum(w.output_len for w in workload)
    return {"time_s": elapsed, "output_tokens": n, "output_tok_s": n / elapsed}


def offline_ttft(llm: LLM, prompts: list[list[int]]) -> list[float]:
    """Time from add_request to the first token, one request at a time, in ms."""
    engine = llm.engine
    engine.kv.pool.reset_prefix_cache()  # a run before with the same prompts must not make these hits
    out = []
    for ids in prompts:
        t0 = time.perf_counter()
        req_id = engine.add_request(ids, exact_len_params(2))
        while True:
            events = [e for e in engine.step() if e.req_id == req_id and e.new_token_ids]
            if events:
                out.append((time.perf_counter() - t0) * 1000)
                break
        while engine.has_unfinished_requests():
            engine.step()
    return out


# --- cluster ---------------------------------------------------------------------------------------------

def _request(ids: list[int], output_len: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
        temperature=0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True))


async def _one(stub, ids, output_len, timeout=900) -> dict:
    t0 = time.perf_counter()
    ttft, n, complete = None, 0, None
    async for resp in stub.Generate(_request(ids, output_len), timeout=timeout):
        if resp.HasField("chunk"):
            if ttft is None and resp.chunk.token_ids:
                ttft = (time.perf_counter() - t0) * 1000
            n += len(resp.chunk.token_ids)
        else:
            complete = resp.complete
    return {"ttft_ms": ttft, "tokens": n, "timings": complete.timings}


async def cluster_throughput(address: str, workload) -> dict:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one(stub, w.prompt_ids, w.output_len) for w in workload))
        elapsed = time.perf_counter() - t0
    for r, w in zip(results, workload):
        if r["tokens"] != w.output_len:
            raise RuntimeError(f"cluster produced {r['tokens']} tokens, expected {w.output_len}")
    n = sum(w.output_len for w in workload)
    return {"time_s": elapsed, "output_tokens": n, "output_tok_s": n / elapsed,
            "ttft_p50_ms": statistics.median(r["ttft_ms"] for r in results)}


async def cluster_ttft(address: str, prompts: list[list[int]]) -> tuple[list[float], list]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        out, timings = [], []
        for ids in prompts:
            r = await _one(stub, ids, 2)
            out.append(r["ttft_ms"])
            timings.append(r["timings"])
    return out, timings


def run_cluster(mode: str, args, workload, ttft_prompts, engine_opts) -> dict:
    from cluster.config import ClusterConfig
    from cluster.controller import Controller
    from router.config import RouterConfig
    from router.server import Router

    controller = Controller(ClusterConfig(mode=mode, engine=engine_opts, kv_transport=args.kv_transport,
                                          torch_threads=args.torch_threads, num_cpus_per_rank=1))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    run = lambda coro, t=1800: asyncio.run_coroutine_threadsafe(coro, loop).result(t)  # noqa: E731
    try:
        registry = controller.start()
        router = Router(RouterConfig(port=0, http_port=-1, registry_address=registry, mode=mode,
                                     max_local_prefill_length=args.max_local_prefill_length,
                                     max_queued_requests=4096))
        address = run(router.start())
        run(router.wait_ready(timeout_s=60))
        print(f"[bench] {mode}: warm-up", file=sys.stderr)
        run(cluster_throughput(address, workload[:4]))
        before = controller.worker_stats()
        print(f"[bench] {mode}: workload ({len(workload)} requests)", file=sys.stderr)
        result = {"throughput": run(cluster_throughput(address, workload))}
        after = controller.worker_stats()
        moved = sum(s.kv_transfer_bytes for s in after) - sum(s.kv_transfer_bytes for s in before)
        seconds = sum(s.kv_transfer_seconds for s in after) - sum(s.kv_transfer_seconds for s in before)
        fetch_seconds = sum(s.kv_fetch_seconds for s in after) - sum(s.kv_fetch_seconds for s in before)
        count = sum(s.kv_transfers for s in after) - sum(s.kv_transfers for s in before)
        result["kv_transfer"] = {"transfers": count, "bytes": moved, "seconds": seconds,
                                 "bytes_per_s": moved / seconds if seconds else None,
                                 "fetch_seconds": fetch_seconds,
                                 "fetch_bytes_per_s": moved / fetch_seconds if fetch_seconds else None}
        print(f"[bench] {mode}: TTFT, {len(ttft_prompts)} requests one at a time", file=sys.stderr)
        ttft, timings = run(cluster_ttft(address, ttft_prompts))
        result["ttft_ms"] = ttft
        result["ttft_breakdown_p50_ms"] = {
            k: statistics.median(getattr(t, k) for t in timings)
            for k in ("queue_ms", "prefill_ms", "kv_transfer_ms", "first_token_ms")
        }
        run(router.stop(grace_s=5))
        return result
    finally:
        loop.call_soon_threadsafe(loop.stop)
        controller.stop()


# --- report ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="disaggregated,colocated")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-requests", type=int, default=20)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per worker (default: 1 per worker when disaggregated, all cores colocated)")
    p.add_argument("--kv-transport", default="shm", help="shm (what `tandem up` picks on one host) or tcp")
    p.add_argument("--max-local-prefill-length", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--markdown", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/bench_cluster.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    engine_opts = {"dtype": "float32", "seed": args.seed}
    cores = os.cpu_count() or 1
    print("[bench] offline engine", file=sys.stderr)
    llm = LLM(**engine_opts)
    vocab = llm.engine.model_config.vocab_size
    workload = make_workload(args.num_requests, (32, 512), (16, 256), vocab, args.seed)
    import random
    rng = random.Random(args.seed + 7)
    ttft_prompts = [random_prompt(rng, rng.randint(32, 512), vocab) for _ in range(args.ttft_requests)]
    llm.generate([w.prompt_ids for w in workload[:4]], exact_len_params(8))  # warm-up
    results = {"command": command, "date": datetime.now().isoformat(timespec="seconds"),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                           "torch": torch.__version__},
               "offline": {"throughput": offline_throughput(llm, workload)}}
    raw = make_kv_transport(args.kv_transport).measure_raw_bandwidth()
    results["kv_transport"] = {"name": args.kv_transport, "raw_bytes_per_s": raw}
    modes = args.modes.split(",")
    for mode in modes:
        threads = args.torch_threads or (max(1, cores // 2) if mode == "disaggregated" else cores)
        torch.set_num_threads(threads)
        results.setdefault("offline_ttft", {})[threads] = offline_ttft(llm, ttft_prompts)
    llm.shutdown()
    torch.set_num_threads(cores)
    for mode in modes:
        threads = args.torch_threads or (max(1, cores // 2) if mode == "disaggregated" else cores)
        a = argparse.Namespace(**{**vars(args), "torch_threads": threads})
        results[mode] = run_cluster(mode, a, workload, ttft_prompts, engine_opts)
        results[mode]["torch_threads"] = threads
    print(json.dumps(summary(results), indent=2))
    out = args.output or Path(_REPO_ROOT) / "bench-results" / f"cluster-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"[bench] wrote {out}", file=sys.stderr)
    if args.markdown:
        print(markdown(results))


def summary(results: dict) -> dict:
    off = results["offline"]["throughput"]["output_tok_s"]
    out = {"offline_output_tok_s": off, "kv_raw_GiB_s": results["kv_transport"]["raw_bytes_per_s"] / 2**30}
    for mode in ("disaggregated", "colocated"):
        if mode not in results:
            continue
        r = results[mode]
        threads = r["torch_threads"]
        off_ttft = statistics.median(results["offline_ttft"][threads])
        kv = r["kv_transfer"]
        out[mode] = {
            "output_tok_s": r["throughput"]["output_tok_s"], "ratio": r["throughput"]["output_tok_s"] / off,
            "ttft_p50_ms": statistics.median(r["ttft_ms"]), "offline_ttft_p50_ms": off_ttft,
            "added_ttft_p50_ms": statistics.median(r["ttft_ms"]) - off_ttft,
            "ttft_breakdown_p50_ms": r["ttft_breakdown_p50_ms"],
            "kv_GiB_s": kv["bytes_per_s"] / 2**30 if kv["bytes_per_s"] else None,
            "kv_vs_raw": kv["bytes_per_s"] / results["kv_transport"]["raw_bytes_per_s"] if kv["bytes_per_s"] else None,
            "kv_transfers": kv["transfers"], "kv_MiB": kv["bytes"] / 2**20,
            "kv_fetch_GiB_s": kv["fetch_bytes_per_s"] / 2**30 if kv.get("fetch_bytes_per_s") else None,
            "kv_fetch_vs_raw": (kv["fetch_bytes_per_s"] / results["kv_transport"]["raw_bytes_per_s"]
                                if kv.get("fetch_bytes_per_s") else None),
        }
    return out


def markdown(results: dict) -> str:
    s = summary(results)
    lines = ["| mode | output tok/s | vs offline | TTFT p50 (ms) | offline TTFT p50 | added TTFT p50 | KV GiB/s (pull) "
             "| vs raw | KV GiB/s (fetch) | vs raw |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| offline engine | {s['offline_output_tok_s']:.1f} | 1.00x | | | | | | | |"]

    def cell(value, spec):
        return "n/a" if value is None else format(value, spec)

    for mode in ("disaggregated", "colocated"):
        if mode in s:
            m = s[mode]
            lines.append(f"| {mode} | {m['output_tok_s']:.1f} | {m['ratio']:.2f}x | {m['ttft_p50_ms']:.1f} | "
                         f"{m['offline_ttft_p50_ms']:.1f} | {m['added_ttft_p50_ms']:+.1f} | {cell(m['kv_GiB_s'], '.2f')} | "
                         f"{cell(m['kv_vs_raw'], '.0%')} | {cell(m.get('kv_fetch_GiB_s'), '.2f')} | "
                         f"{cell(m.get('kv_fetch_vs_raw'), '.0%')} |")
    lines.append(f"\nKV transport raw bandwidth ({results['kv_transport']['name']}): {s['kv_raw_GiB_s']:.2f} GiB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
