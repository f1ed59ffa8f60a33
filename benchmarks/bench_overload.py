"""Overload: a burst at 10x the sustainable rate gets fast refusals, and the requests admitted keep their SLO.

Starts `tandem up` (1 prefill + 1 decode worker, the default model, `--max-queue-time-s` = the TTFT SLO, and
`--max-num-seqs` = the streams of step 1, which bounds the decode batch and so TPOT), then:
  1. sustainable rate: `--streams` closed-loop clients for `--measure-s` seconds; completed requests per second;
  2. burst: open-loop arrivals at `--burst-factor` (10) times that rate for `--burst-s` seconds, each request with
     a gRPC deadline of `--deadline-s`.
Reports refusals (RESOURCE_EXHAUSTED) and how fast they came, the admitted requests' TTFT and TPOT against the
SLO, and the requests that waited past their deadline (DEADLINE_EXCEEDED; the target is 0):

    python benchmarks/bench_overload.py --markdown
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guidellm import report, start_tandem  # noqa: E402

from router.admission import DEADLINE_REFUSAL  # noqa: E402
from tandem.v1 import generation_pb2 as pb  # noqa: E402
from tandem.v1 import generation_pb2_grpc  # noqa: E402

FILLER = ("The river bends around the old mill, where the miller keeps his ledgers of grain and weather. "
          "Each spring the water rises, and each autumn the wheel turns slower as the leaves clog the race. ")


def request(i: int, max_tokens: int) -> pb.GenerateRequest:
    # A distinct start per request: no prefix-cache hits make the load lighter than it looks.
    return pb.GenerateRequest(text=f"Note {i}: " + FILLER * 2, sampling=pb.SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True))


async def one(stub, i: int, max_tokens: int, deadline_s: float) -> dict:
    t0 = time.perf_counter()
    ttft = None
    n = 0
    try:
        async for resp in stub.Generate(request(i, max_tokens), timeout=deadline_s):
            if resp.HasField("chunk") and resp.chunk.token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n += len(resp.chunk.token_ids)
    except grpc.aio.AioRpcError as e:
        retry_after = dict(e.trailing_metadata() or ()).get("retry-after")
        code = e.code().name
        if code == "DEADLINE_EXCEEDED" and (e.details() or "").startswith(DEADLINE_REFUSAL):
            code = "DEADLINE_REFUSED"  # refused at once: it could not have finished in time even unqueued
        return {"code": code, "latency_s": time.perf_counter() - t0, "ttft_s": ttft,
                "retry_after_s": float(retry_after) if retry_after else None}
    e2e = time.perf_counter() - t0
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return {"code": "OK", "latency_s": e2e, "ttft_s": ttft, "tpot_s": tpot, "tokens": n}


async def sustainable_rate(stub, streams: int, duration_s: float, max_tokens: int) -> tuple[float, list[dict]]:
    end = time.perf_counter() + duration_s
    results: list[dict] = []
    counter = iter(range(10**9))

    async def client():
        while time.perf_counter() < end:
            result = await one(stub, next(counter), max_tokens, 600)
            results.append(result)
            if result["code"] == "RESOURCE_EXHAUSTED":  # a client that honours retry-after, not a tight loop
                await asyncio.sleep(result["retry_after_s"] or 1.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    return sum(r["code"] == "OK" for r in results) / elapsed, results


async def burst(stub, rate: float, duration_s: float, max_tokens: int, deadline_s: float) -> list[dict]:
    tasks = []
    t0 = time.perf_counter()
    for i in range(int(rate * duration_s)):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(stub, 10**6 + i, max_tokens, deadline_s)))
    return await asyncio.gather(*tasks)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(name: str, results: list[dict], args) -> dict:
    ok = [r for r in results if r["code"] == "OK"]
    refused = [r for r in results if r["code"] in ("RESOURCE_EXHAUSTED", "DEADLINE_REFUSED")]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    in_slo = [r for r in ok if r["ttft_s"] <= args.slo_ttft_s and (r["tpot_s"] or 0) <= args.slo_tpot_s]
    return {
        "phase": name, "requests": len(results), "completed": len(ok), "refused": len(refused),
        "deadline_exceeded": sum(r["code"] == "DEADLINE_EXCEEDED" for r in results),
        "other_errors": sum(r["code"] not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_REFUSED", "DEADLINE_EXCEEDED")
                            for r in results),
        "refusal_p50_ms": _ms(pct([r["latency_s"] for r in refused], 0.5)),
        "refusal_p99_ms": _ms(pct([r["latency_s"] for r in refused], 0.99)),
        "ttft_p50_ms": _ms(pct(ttft, 0.5)), "ttft_p99_ms": _ms(pct(ttft, 0.99)),
        "tpot_p50_ms": _ms(pct(tpot, 0.5)), "tpot_p99_ms": _ms(pct(tpot, 0.99)),
        "completed_in_slo": len(in_slo),
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def markdown(rows: list[dict], args, rate: float) -> str:
    cols = ("phase", "requests", "completed", "refused", "deadline_exceeded", "other_errors", "refusal_p50_ms",
            "refusal_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "completed_in_slo")
    lines = [f"sustainable rate {rate:.2f} req/s; burst {args.burst_factor:g}x = {rate * args.burst_factor:.2f} "
             f"req/s for {args.burst_s:g} s; SLO TTFT <= {args.slo_ttft_s:g} s, TPOT <= {args.slo_tpot_s:g} s; "
             f"deadline {args.deadline_s:g} s", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


async def run(args) -> tuple[float, list[dict]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        rate, base = await sustainable_rate(stub, args.streams, args.measure_s, args.max_tokens)
        rows = [summarize("sustainable (closed loop)", base, args)]
        results = await burst(stub, rate * args.burst_factor, args.burst_s, args.max_tokens, args.deadline_s)
        rows.append(summarize(f"burst {args.burst_factor:g}x (open loop)", results, args))
    return rate, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-port", type=int, default=50071)
    p.add_argument("--http-port", type=int, default=8071)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="the workers' batch bound, which bounds TPOT (default: --streams)")
    p.add_argument("--measure-s", type=float, default=40)
    p.add_argument("--burst-factor", type=float, default=10)
    p.add_argument("--burst-s", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--deadline-s", type=float, default=30)
    p.add_argument("--slo-ttft-s", type=float, default=3.0)
    p.add_argument("--slo-tpot-s", type=float, default=0.25)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="bench_overload-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    server = start_tandem(args.http_port, args.grpc_port, "disaggregated", out_dir,
                          ["--torch-threads", "1", "--max-queue-time-s", str(args.slo_ttft_s),
                           "--max-num-seqs", str(args.max_num_seqs or args.streams)])
    try:
        rate, rows = asyncio.run(run(args))
    finally:
        server.stop()
    report(rows, out_dir, markdown(rows, args, rate) if args.markdown else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
