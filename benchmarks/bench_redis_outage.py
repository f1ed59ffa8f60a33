"""Redis killed during load: requests never fail or wait on it, and the caches come back by themselves.

Issue 10's "Redis killed during load" line, on a `tandem up` cluster (1 prefill + 1 decode worker, the semantic
cache on) joined to a Redis this script owns (`EmbeddedRedis` on a fixed port), so it can kill it:

    python benchmarks/bench_redis_outage.py --markdown

Two loads run together for --duration s:
  rag       the `rag` loadtest scenario over gRPC (shared prefixes: the prefix index and the KV tier are used);
  semantic  every --semantic-interval-s an HTTP completion that opts in to the semantic cache, cycling through a
            few questions, so hits (answered from the router's memory) and stores (written to Redis) go on.
At --kill-at-s the Redis process gets SIGKILL; at --restart-at-s a new one starts on the same port (empty: a
restarted cache loses its contents, as a real one without persistence does).

Reported: requests and failures of each load; TTFT p50 / max before, during and after the outage (a request that
waited on Redis would show as a TTFT jump during it); the router's `tandem_router_redis_up` and prefix-index size
sampled every 0.25 s; the workers' tandem_kv_tier_wait_seconds (the only Redis wait on a request's path) per
phase, with how many waits ended within 100 ms; from the restart to (a) the router seeing Redis up, (b) the prefix
index holding blocks again, (c) the first semantic-cache store that succeeded, (d) the first stream batch applied
after it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO_ROOT))
sys.path.insert(0, str(_REPO_ROOT / "benchmarks"))

from bench_guidellm import report, start_tandem  # noqa: E402

from loadtest.prompts import load_tokenizer  # noqa: E402
from loadtest.runner import drive  # noqa: E402
from loadtest.scenario import load_scenario  # noqa: E402
from tandem.redis_store import EmbeddedRedis  # noqa: E402

QUESTIONS = (
    "What is the boiling point of water at sea level?",
    "Name three primary colors.",
    "What does a compiler do?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_samples(http_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("tandem_router_redis_up", "tandem_router_prefix_index_blocks",
                          "tandem_router_kv_events_batches_applied_total"):
                out[s.name] = out.get(s.name, 0) + s.value
            elif s.name == "tandem_router_semantic_cache_stores_total":
                key = f"semantic_stores_{s.labels.get('status')}"
                out[key] = out.get(key, 0) + s.value
            elif s.name == "tandem_router_semantic_cache_lookups_total":
                key = f"semantic_lookups_{s.labels.get('result')}"
                out[key] = out.get(key, 0) + s.value
    return out


class Sampler(threading.Thread):
    """The router's metrics every `interval_s`, with the wall time, until stopped."""

    def __init__(self, http_port: int, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.http_port, self.interval_s = http_port, interval_s
        self.samples: list[tuple[float, dict]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.samples.append((time.time(), router_samples(self.http_port)))
            except OSError:
                pass
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


async def semantic_load(http_port: int, duration_s: float, interval_s: float) -> list[dict]:
    import aiohttp

    records = []
    start = time.time()
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            body = {"prompt": QUESTIONS[i % len(QUESTIONS)], "max_tokens": 16, "temperature": 0,
                    "semantic_cache": True, "stream": True}
            sent = time.time()
            first = None
            status, error = "OK", ""
            try:
                async with session.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(total=120)) as resp:
                    if resp.status != 200:
                        status, error = str(resp.status), (await resp.text())[:200]
                    hit = resp.headers.get("X-Semantic-Cache") == "hit"
                    async for line in resp.content:
                        if first is None and line.startswith(b"data: {"):
                            first = time.time()
            except Exception as e:  # noqa: BLE001 - counted as a failure
                status, error, hit = "EXC", f"{type(e).__name__}: {e}", False
            records.append({"send_s": sent, "ttft_ms": None if first is None else (first - sent) * 1000,
                            "status": status, "error": error, "hit": hit})

        tasks = []
        i = 0
        while time.time() - start < duration_s:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(interval_s)
        await asyncio.gather(*tasks)
    return records


def worker_metrics_urls(grpc_port: int) -> list[str]:
    """Every worker's Prometheus endpoint, from the router's Cluster/GetStatus (WorkerInfo.metrics_address)."""
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        status = worker_pb2_grpc.ClusterStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
    return [f"http://{w.info.metrics_address}/metrics" for w in status.workers if w.info.metrics_address]


def tier_waits(urls: list[str]) -> dict[str, float]:
    """The workers' tandem_kv_tier_wait_seconds, summed: prompts that waited on the KV tier, and those that waited
    at most 100 ms ("le_0.1"), each by result (hit, miss, skipped, error) and in all."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"count": 0.0, "le_0.1": 0.0}
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                result = sample.labels.get("result")
                if sample.name == "tandem_kv_tier_wait_seconds_count":
                    key = "count"
                elif sample.name == "tandem_kv_tier_wait_seconds_bucket" and float(sample.labels["le"]) == 0.1:
                    key = "le_0.1"
                else:
                    continue
                out[key] += sample.value
                out[f"{key}_{result}"] = out.get(f"{key}_{result}", 0.0) + sample.value
    return out


def waits_between(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b.get(k, 0.0) - a.get(k, 0.0) for k in sorted(set(a) | set(b)) if b.get(k, 0.0) - a.get(k, 0.0)}


def phase_stats(records: list[dict], start: float, end: float) -> dict:
    sel = [r for r in records if start <= r["send_s"] < end]
    ttfts = [r["ttft_ms"] for r in sel if r["ttft_ms"] is not None]
    return {"requests": len(sel), "failed": sum(r["status"] != "OK" for r in sel),
            "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
            "ttft_max_ms": round(max(ttfts), 1) if ttfts else None}


def first_after(samples: list[tuple[float, dict]], t0: float, pred) -> float | None:
    for t, s in samples:
        if t >= t0 and pred(s):
            return round(t - t0, 2)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=75.0)
    p.add_argument("--kill-at-s", type=float, default=25.0)
    p.add_argument("--restart-at-s", type=float, default=45.0)
    p.add_argument("--rate", type=float, default=0.5, help="rag requests per second")
    p.add_argument("--semantic-interval-s", type=float, default=0.5)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=256 << 20)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    out_dir = Path(args.output_dir or _REPO_ROOT / "bench-results" / f"redis-outage-{time.strftime('%Y%m%dT%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)

    redis_port = free_port()
    redis = EmbeddedRedis(port=redis_port)
    redis.start()
    grpc_port, http_port = free_port(), free_port()
    server = None
    try:
        server = start_tandem(http_port, grpc_port, "disaggregated", out_dir, [
            "--redis-url", redis.url, "--semantic-cache", "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)])
        scenario = load_scenario("rag")
        scenario = scenario.with_overrides(duration_s=args.duration, rate=args.rate)
        tokenizer = load_tokenizer()
        sampler = Sampler(http_port)
        sampler.start()
        events: dict[str, float] = {}

        metrics_urls = worker_metrics_urls(grpc_port)
        waits = {"start": tier_waits(metrics_urls)}

        def chaos() -> None:
            time.sleep(args.kill_at_s)
            waits["killed"] = tier_waits(metrics_urls)
            os.kill(redis.proc.pid, signal.SIGKILL)
            redis.proc.wait()
            events["killed"] = time.time()
            time.sleep(args.restart_at_s - args.kill_at_s)
            restarted = EmbeddedRedis(port=redis_port)
            restarted.start()
            events["restarted"] = time.time()
            waits["restarted"] = tier_waits(metrics_urls)
            events["_server"] = restarted  # type: ignore[assignment]
            # The server gets SIGTERM when the thread that started it ends (EmbeddedRedis): live until the end.
            finished.wait()

        finished = threading.Event()
        chaos_thread = threading.Thread(target=chaos, daemon=True)
        start = time.time()
        chaos_thread.start()

        async def both():
            rag_task = asyncio.create_task(drive(scenario, tokenizer, target=f"127.0.0.1:{grpc_port}"))
            semantic = await semantic_load(http_port, args.duration, args.semantic_interval_s)
            return await rag_task, semantic

        load, semantic = asyncio.run(both())
        time.sleep(3)
        waits["end"] = tier_waits(metrics_urls)
        sampler.stop()
        restarted = events.pop("_server")
        rag = [{"send_s": start + r.send_s, "ttft_ms": r.ttft_ms, "status": r.status, "error": r.error}
               for r in load.records]
        killed, back = events["killed"], events["restarted"]
        samples = sampler.samples
        applied_at_restart = next((s.get("tandem_router_kv_events_batches_applied_total", 0)
                                   for t, s in samples if t >= back), 0)
        stores_ok_at_restart = next((s.get("semantic_stores_stored", 0) for t, s in samples if t >= back), 0)
        blocks_before = max((s.get("tandem_router_prefix_index_blocks", 0) for t, s in samples if t < killed),
                            default=0)
        row = {
            "rag": {name: phase_stats(rag, a, b) for name, (a, b) in
                    {"before": (start, killed), "during": (killed, back), "after": (back, float("inf"))}.items()},
            "semantic": {name: phase_stats(semantic, a, b) for name, (a, b) in
                         {"before": (start, killed), "during": (killed, back), "after": (back, float("inf"))}.items()},
            "failed_total": sum(r["status"] != "OK" for r in rag + semantic),
            "errors": sorted({r["error"][:120] for r in rag + semantic if r["status"] != "OK"})[:5],
            "semantic_hits": sum(r["hit"] for r in semantic),
            "router_saw_redis_down_s": first_after(samples, killed, lambda s: s.get("tandem_router_redis_up") == 0),
            "recovery_s": {
                "redis_up": first_after(samples, back, lambda s: s.get("tandem_router_redis_up") == 1),
                "index_blocks_back_to_90pct": first_after(
                    samples, back, lambda s: s.get("tandem_router_prefix_index_blocks", 0) >= 0.9 * blocks_before),
                "first_batch_applied": first_after(
                    samples, back, lambda s: s.get("tandem_router_kv_events_batches_applied_total", 0)
                    > applied_at_restart),
                "first_semantic_store_ok": first_after(
                    samples, back, lambda s: s.get("semantic_stores_stored", 0) > stores_ok_at_restart),
            },
            # How long prompts waited on the KV tier (the one Redis wait on a request's path; the router's caches
            # answer from memory): counts, and how many of them within 100 ms, per phase.
            "kv_tier_waits": {"before": waits_between(waits["start"], waits["killed"]),
                              "during": waits_between(waits["killed"], waits["restarted"]),
                              "after": waits_between(waits["restarted"], waits["end"])},
            "index_blocks_before_kill": blocks_before,
            "kill_at_s": args.kill_at_s, "restart_at_s": args.restart_at_s, "duration_s": args.duration,
        }
        (out_dir / "samples.json").write_text(json.dumps([{"t": t - start, **s} for t, s in samples]))
        md = None
        if args.markdown:
            r = row
            lines = ["| load | phase | requests | failed | TTFT p50 ms | TTFT max ms |", "|---|---|---|---|---|---|"]
            for load_name in ("rag", "semantic"):
                for phase, st in r[load_name].items():
                    lines.append(f"| {load_name} | {phase} | {st['requests']} | {st['failed']} | {st['ttft_p50_ms']} "
                                 f"| {st['ttft_max_ms']} |")
            lines.append("")
            lines.append(f"failed in all: {r['failed_total']}; semantic hits: {r['semantic_hits']}; router saw Redis "
                         f"down after {r['router_saw_redis_down_s']} s; after the restart: {r['recovery_s']}")
            for phase, w in r["kv_tier_waits"].items():
                lines.append(f"\nKV tier waits {phase}: {w.get('count', 0):.0f} prompts, "
                             f"{w.get('le_0.1', 0):.0f} of them within 100 ms ({w})")
            md = "\n".join(lines)
        report([row], out_dir, md)
        finished.set()
        chaos_thread.join()
        restarted.stop()
    finally:
        if server is not None:
            server.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
