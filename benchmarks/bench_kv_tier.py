"""Remote KV tier benchmark: the TTFT of a long prompt whose prefix a worker's small KV cache evicted, pulled back
from Redis against recomputed, with the same greedy output checked.

One worker (the default model, `kv_offload` on) with a KV cache of about one prompt, and a valkey-server of its own.
Per repeat, with fresh random prompts A and B of --prompt-len tokens:

    cold       A on an empty cache (computes everything; its greedy output is the reference)
    B          evicts A's blocks; the worker offloads them to Redis (waited for)
    pulled     A again: the tier pulls A's evicted blocks, the engine inserts them, only the last block computes
    B          evicts A again
    recompute  A again after FLUSHALL: the tier finds nothing (one EXISTS round trip), the worker recomputes

TTFT is measured by the client (the gRPC call to its first token). Also reported: the tier's pull latency and
bytes, and the cost of offloading: engine-thread time to copy evicted blocks out, and the CPU time of the tier's
thread (encoding, CRC32, sockets) per MB moved.

    python benchmarks/bench_kv_tier.py                      # 1536-token prompts, 3 repeats
    python benchmarks/bench_kv_tier.py --prompt-len 1024 --repeats 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import grpc  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_engine import _cpu_model  # noqa: E402
from tandem.redis_store import EmbeddedRedis  # noqa: E402
from tandem.v1 import generation_pb2 as pb  # noqa: E402
from tandem.v1 import worker_pb2 as wpb  # noqa: E402
from tandem.v1 import worker_pb2_grpc  # noqa: E402
from workers.model.loader import load_model_config, resolve_model  # noqa: E402
from workers.server import WorkerConfig, WorkerServer  # noqa: E402


def generate(stub, token_ids: list[int], request_id: str, max_tokens: int) -> tuple[list[int], float, int]:
    """(greedy output, client-side TTFT in s, cached prompt tokens)."""
    req = wpb.EngineRequest(request_id=request_id, prompt_token_ids=token_ids,
                            sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    start = time.perf_counter()
    out, ttft, cached = [], None, 0
    for msg in stub.Decode(wpb.DecodeRequest(request=req), timeout=600):
        if ttft is None:
            ttft, cached = time.perf_counter() - start, msg.num_cached_tokens
        out.extend(msg.token_ids)
    return out, ttft, cached


def wait_drained(server: WorkerServer, pushed_before: int, timeout_s: float = 60.0) -> None:
    tier = server.kv_tier
    deadline = time.monotonic() + timeout_s
    while tier.stats["pushed_blocks"] <= pushed_before or tier._pending_bytes:
        if time.monotonic() > deadline:
            raise TimeoutError("the evicted blocks did not reach Redis")
        time.sleep(0.01)


async def _thread_time() -> float:
    return time.thread_time()  # CPU time of the thread this runs on: the tier's (encode, CRC, sockets, decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    load_start = round(os.getloadavg()[0], 2)
    if load_start > 1.0:
        print(f"warning: load average {load_start}: other work competes for the CPUs; TTFTs will be noisy",
              file=sys.stderr)
    server_redis = EmbeddedRedis()
    url = server_redis.start()
    blocks_per_prompt = -(-(args.prompt_len + args.max_tokens) // args.block_size)
    num_blocks = blocks_per_prompt + 4  # about one prompt: the next prompt evicts nearly all of the one before
    c = load_model_config(resolve_model(None))
    block_bytes = c.num_hidden_layers * 2 * args.block_size * c.num_key_value_heads * c.head_dim * 4  # float32 on CPU
    engine = dict(kv_cache_memory_bytes=num_blocks * block_bytes, max_model_len=num_blocks * args.block_size,
                  block_size=args.block_size)
    server = WorkerServer(WorkerConfig(engine=engine, torch_threads=args.torch_threads, metrics_port=-1,
                                       redis_url=url, kv_offload=True))
    server.start()
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.info.address))
    client = redis.Redis.from_url(url)

    # Engine-thread cost of offloading: time in _offload_evicted (copying evicted blocks out), per block.
    eng, offload = server.engine, {"s": 0.0, "blocks": 0}
    original = eng._offload_evicted

    def timed():
        n = len(eng.kv.pool.evicted or ())
        t = time.perf_counter()
        original()
        offload["s"] += time.perf_counter() - t
        offload["blocks"] += n

    eng._offload_evicted = timed

    rows = []
    try:
        generate(stub, list(range(1000, 1000 + 64)), "warmup", 2)
        for rep in range(args.repeats):
            rng = random.Random(rep)
            a = [rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
            b = [rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
            ref, cold_ttft, _ = generate(stub, a, f"a{rep}-cold", args.max_tokens)
            pushed = server.kv_tier.stats["pushed_blocks"]
            t = time.perf_counter()
            generate(stub, b, f"b{rep}-1", args.max_tokens)
            wait_drained(server, pushed)
            push_s = time.perf_counter() - t
            local_before_pull = eng.kv.num_cached_prefix_tokens(a)
            stats0 = dict(server.kv_tier.stats)
            pulled, pull_ttft, pull_cached = generate(stub, a, f"a{rep}-pulled", args.max_tokens)
            stats1 = dict(server.kv_tier.stats)
            generate(stub, b, f"b{rep}-2", args.max_tokens)
            client.flushall()
            server.kv_tier._written.clear()
            server.kv_tier._written_bytes = 0
            local_before_recompute = eng.kv.num_cached_prefix_tokens(a)
            recomputed, recompute_ttft, recompute_cached = generate(stub, a, f"a{rep}-recompute", args.max_tokens)
            row = dict(
                rep=rep, prompt_len=args.prompt_len, cold_ttft_s=round(cold_ttft, 4),
                pulled_ttft_s=round(pull_ttft, 4), recompute_ttft_s=round(recompute_ttft, 4),
                ratio=round(pull_ttft / recompute_ttft, 3), same_output=pulled == ref == recomputed,
                local_cached_tokens_before=(local_before_pull, local_before_recompute),
                cached_tokens=(pull_cached, recompute_cached),
                pulled_blocks=stats1["pulled_blocks"] - stats0["pulled_blocks"],
                pulled_mb=round((stats1["pulled_bytes"] - stats0["pulled_bytes"]) / 1e6, 1),
                b_run_plus_push_s=round(push_s, 3),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        tier_cpu_s = asyncio.run_coroutine_threadsafe(_thread_time(), server.kv_tier._loop).result(timeout=10)
    finally:
        server.stop()
        server_redis.stop()

    cost = server.kv_tier.cost
    summary = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), cpu=_cpu_model() or platform.processor(), cpus=os.cpu_count(),
        torch=torch.__version__, torch_threads=args.torch_threads, load_avg_start=load_start,
        load_avg_end=round(os.getloadavg()[0], 2),
        model=server.engine.model_name, block_bytes=block_bytes, kv_cache_blocks=num_blocks,
        pulled_ttft_s_median=statistics.median(r["pulled_ttft_s"] for r in rows),
        recompute_ttft_s_median=statistics.median(r["recompute_ttft_s"] for r in rows),
        ratio_median=statistics.median(r["ratio"] for r in rows),
        all_same_output=all(r["same_output"] for r in rows),
        measured_pull_mb_per_s=round(cost.pull_bytes_per_s / 1e6, 1),
        measured_prefill_tokens_per_s=round(cost.prefill_tokens_per_s, 1),
        offload_engine_thread_ms_per_block=round(1000 * offload["s"] / max(offload["blocks"], 1), 3),
        offloaded_blocks=offload["blocks"], pushed_mb=round(server.kv_tier.stats["pushed_bytes"] / 1e6, 1),
        push_dropped_blocks=server.kv_tier.stats["push_dropped_blocks"],
        tier_thread_cpu_s=round(tier_cpu_s, 2),
        tier_thread_cpu_ms_per_mb_moved=round(1000 * tier_cpu_s / max(
            (server.kv_tier.stats["pushed_bytes"] + server.kv_tier.stats["pulled_bytes"]) / 1e6, 1e-9), 3),
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
