"""KV events through a real valkey-server: what publishing costs the engine thread, how long a batch takes to
reach a router's prefix index, and how long a router (re)started under load takes to rebuild its index.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_kv_events.py [--workers 4] [--blocks 20000] [--batches 2000]

No model: the batches are what a busy worker's engine produces (a few stored blocks per step, evictions once its
cache is full), from synthetic chained hashes.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from router.cache.kv_events_follower import FollowerConfig, KVEventsFollower
from tandem.redis_store import EmbeddedRedis
from workers.kv.events import BlockRemoved, BlockStored
from workers.kv_events import KVEventPublisher, KVEventsConfig

MODEL = "bench-model"


async def run(args) -> None:
    server = EmbeddedRedis()
    url = server.start()
    listed = {f"w{i}": 16 for i in range(args.workers)}
    pubs = [KVEventPublisher(url, MODEL, wid, 16, KVEventsConfig(interval_s=args.interval_s)) for wid in listed]
    try:
        for p in pubs:
            await p.start()
        # Fill each worker's cache to --blocks, then churn: every batch stores 4 blocks and evicts 4.
        publish_us = []
        next_hash = 1
        for p in pubs:
            for start in range(0, args.blocks, 256):
                p.publish([BlockStored(list(range(next_hash + start, next_hash + min(start + 256, args.blocks))))])
            p.first_hash, next_hash = next_hash, next_hash + args.blocks
        live = KVEventsFollower(url, MODEL, lambda: listed, FollowerConfig(block_s=0.1))
        await live.start()
        while any(live.index.num_blocks(w) != args.blocks or live.index.workers[w].stale for w in listed):
            await asyncio.sleep(0.01)
        lags = []
        oldest = {p.worker_id: p.first_hash for p in pubs}
        for i in range(args.batches):
            p = pubs[i % len(pubs)]
            new = list(range(next_hash, next_hash + 4))
            next_hash += 4
            gone = list(range(oldest[p.worker_id], oldest[p.worker_id] + 4))
            oldest[p.worker_id] += 4
            t = time.perf_counter()
            p.publish([BlockRemoved(gone), BlockStored(new)])
            publish_us.append((time.perf_counter() - t) * 1e6)
            if i % 50 == 0:  # a sample of batches: time until the live router's index has them
                while live.index.match(new[:1]).get(p.worker_id) is None:
                    await asyncio.sleep(0.0005)
                lags.append((time.perf_counter() - t) * 1000)
            else:
                await asyncio.sleep(0)
        # A router started now, under that load: snapshots plus the stream's tail.
        await asyncio.sleep(args.interval_s)
        t = time.perf_counter()
        late = KVEventsFollower(url, MODEL, lambda: listed, FollowerConfig(block_s=0.1))
        await late.start(wait_s=30)
        while any(late.index.num_blocks(w) != live.index.num_blocks(w) for w in listed):
            await asyncio.sleep(0.005)
        rebuild_s = time.perf_counter() - t
        p50, p99 = (lambda xs: statistics.quantiles(xs, n=100)[49]), (lambda xs: statistics.quantiles(xs, n=100)[98])
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; workers {args.workers}, "
              f"{args.blocks} cached blocks each, {args.batches} churn batches")
        print(f"publish() on the engine thread: p50 {p50(publish_us):.1f} us, p99 {p99(publish_us):.1f} us")
        print(f"publish -> live index: p50 {p50(lags):.2f} ms, p99 {p99(lags):.2f} ms ({len(lags)} samples)")
        print(f"late router rebuild: {rebuild_s:.2f} s for {late.index.num_blocks()} blocks "
              f"({late.num_snapshots_loaded} snapshots, {late.num_batches_applied} tail batches)")
        held = {k: v for k, v in live.num_rejected.items() if v}
        print(f"live router: {live.num_batches_applied} batches applied; not applied on arrival: {held}")
        assert all(late.index.workers[w].block_hashes == live.index.workers[w].block_hashes for w in listed)
        for f in (live, late):
            await f.stop()
    finally:
        for p in pubs:
            await p.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=20000, help="cached blocks per worker")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--interval-s", type=float, default=2.0, help="snapshot interval")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
