"""Cache-aware against load routing on the `rag` scenario, and the prefix index after a router restart.

Issue 10's first two "Done when" lines, on a `tandem up` cluster of 2 prefill + 2 decode workers:
  1. TTFT p50 with `--routing-policy cache_aware` at most 0.2x that of `load`, and the cached prompt tokens within
     80% of the ideal;
  2. the router restarted in the middle of that load: within 10 s it routes with its full index again (hit rate
     back to at least 90% of before).

    python benchmarks/bench_routing.py --markdown                  # both policies, then the restart phase
    python benchmarks/bench_routing.py --policies cache_aware --duration 60 --no-restart   # a quick look

Phases (the same script and seed, so both policies get the very same requests at the same times):
  load, cache_aware  a fresh `tandem up` each (cold caches, an embedded Redis each), then the `rag` scenario
                     (loadtest/scenarios/rag.yaml: groups sharing a 1-1.8k-token system prompt, 32-96-token
                     questions) with --num-groups groups, Poisson --rate req/s for --duration s.
  restart            on the cache_aware cluster, after its run: a second router (`python -m router`, same
                     registry and Redis) takes a new run of the scenario (seed + 1, --restart-rate req/s for
                     --restart-duration s); --restart-at-s into it, that
                     router is killed (SIGKILL) and started again. Requests sent while it is down fail (counted).
                     Reported: the hit rate (cached / ideal) of requests sent in the 30 s before the kill, and of
                     those sent in the first 10 s after the new router served its first request (the client's
                     channel reconnects with gRPC's backoff), plus 5 s bins; and, sampled every 0.25 s, how long
                     the restarted router's prefix index took to hold 99% of the blocks of the cluster's own router
                     (never restarted, following the same workers).

Sizing, so that the cache-aware advantage can show: the working set (the sum of the groups' shared prefixes) must be
larger than one worker's KV cache but fit in the two prefill workers' caches together. The script computes it from
the scenario's own prompts and sets `--kv-cache-memory-bytes` so that one worker holds working_set /
--capacity-ratio tokens (default 1.5: the working set is 1.5x one cache, and half of it, what cache_aware leaves on
each worker, fills 75% of one, the rest being room for the requests in flight). Routed by load, every worker sees
every group and its LRU cache cycles through 1.5x its size; routed by cache, each worker keeps its half. The sizing
is checked against the workers' reported blocks and printed.

Ideal cached tokens: every request after the first of its group (in send order) finds the group's whole shared
prefix (the longest common prefix of the group's prompts) cached, in full blocks (block_size from the workers),
and never more than the engine can reuse ((prompt_len - 1) // block_size blocks: it always computes the last
token). Cached tokens are what the workers
reported (`usage.cached_tokens`: the prefill worker's hits, or the decode worker's for a prompt prefilled there).

Needs the KV-events publisher on the workers and the follower in the router (issue 10, items 1-2): without them,
cache_aware has no index and routes by load (the routing metrics then say `no_index`).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guidellm import REPO, Server, report, wait_http  # noqa: E402

sys.path.insert(0, str(REPO))
from loadtest.prompts import RequestFactory, load_tokenizer, open_loop_plan  # noqa: E402
from loadtest.report import build_result  # noqa: E402
from loadtest.runner import drive, run_scenario, write_outputs  # noqa: E402
from loadtest.scenario import Scenario, load_scenario  # noqa: E402

# One thread per worker: 4 workers share the machine's 2 cores.
CLUSTER_ARGS = ["--prefill-workers", "2", "--decode-workers", "2", "--torch-threads", "1", "--max-model-len", "2048"]


def make_scenario(args, seed: int) -> Scenario:
    base = load_scenario("rag")
    scenario = dataclasses.replace(base, shared_prefix=dataclasses.replace(base.shared_prefix,
                                                                           num_groups=args.num_groups))
    return scenario.with_overrides(duration_s=args.duration, rate=args.rate, seed=seed)


def group_prefix_lens(scenario: Scenario, tokenizer) -> dict[int, int]:
    """Each group's shared prefix length: the longest common prefix of its prompts (each prompt's own head comes
    after it, so this is exact for groups of two or more; a group of one counts its whole prompt)."""
    prompts: dict[int, list[tuple[int, ...]]] = {}
    for spec in open_loop_plan(scenario, RequestFactory(scenario, tokenizer)):
        prompts.setdefault(spec.group, []).append(spec.prompt_ids)
    lens = {}
    for group, ps in prompts.items():
        n = min(len(p) for p in ps)
        for i in range(n):
            if any(p[i] != ps[0][i] for p in ps):
                n = i
                break
        lens[group] = n
    return lens


def kv_bytes_per_token(model: str | None) -> int:
    """K and V of every layer, float32 (the CPU dtype): what one token takes in a worker's KV cache."""
    from workers.model.loader import load_model_config, resolve_model

    c = load_model_config(resolve_model(model))
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4


def ideal_and_cached(records: list[dict], prefix_lens: dict[int, int], block_size: int) -> tuple[int, int]:
    """(ideal, cached) prompt tokens over the successful requests; see the module docstring."""
    seen: set[int] = set()
    ideal = cached = 0
    for r in sorted(records, key=lambda r: r["send_s"]):
        group = r["group"]
        if group in seen and r["status"] == "OK":
            full = prefix_lens[group] // block_size * block_size
            ideal += min(full, (r["prompt_tokens"] - 1) // block_size * block_size)
        seen.add(group)
        if r["status"] == "OK":
            cached += r["cached_tokens"]
    return ideal, cached


def hit_rate(records: list[dict], prefix_lens: dict[int, int], block_size: int, start_s: float, end_s: float,
             all_records: list[dict]) -> tuple[float | None, int]:
    """cached / ideal of the requests sent in [start_s, end_s) (first-of-group decided over the whole run)."""
    firsts = {}
    for r in sorted(all_records, key=lambda r: r["send_s"]):
        firsts.setdefault(r["group"], r["index"])
    window = [r for r in records if start_s <= r["send_s"] < end_s and r["status"] == "OK"]
    ideal = sum(min(prefix_lens[r["group"]] // block_size * block_size,
                    (r["prompt_tokens"] - 1) // block_size * block_size)
                for r in window if firsts[r["group"]] != r["index"])
    cached = sum(r["cached_tokens"] for r in window if firsts[r["group"]] != r["index"])
    return (cached / ideal if ideal else None), len(window)


def cluster_kv(grpc_port: int) -> tuple[int, dict[str, int]]:
    """(block_size, {prefill worker id: KV cache blocks}) from the router's Cluster/GetStatus."""
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        status = worker_pb2_grpc.ClusterStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
    prefill = {w.info.worker_id: w.num_blocks for w in status.workers if w.info.role == "prefill"}
    return max(w.info.block_size for w in status.workers), prefill


def router_counters(http_port: int) -> dict[str, float]:
    """The router's routing and prefix-cache counters (router/metrics.py), summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("tandem_router_prefix_cache_"):
                out[s.name] = out.get(s.name, 0) + s.value
            elif s.name == "tandem_router_routing_decisions_total":
                key = f"decisions_{s.labels.get('pool')}_{s.labels.get('reason')}"
                out[key] = out.get(key, 0) + s.value
    return out


def local_prefill_args(args) -> list[str]:
    """The router's conditional-disaggregation threshold, when the run sets one (else the router's default)."""
    if args.max_local_prefill_length is None:
        return []
    return ["--max-local-prefill-length", str(args.max_local_prefill_length)]


# --- the phases -----------------------------------------------------------------------------------------------

def run_policy(policy: str, args, kv_bytes: int, prefix_lens: dict[int, int], working_set: int, out_dir: Path,
               tokenizer) -> dict:
    extra = [*CLUSTER_ARGS, "--routing-policy", policy, "--kv-cache-memory-bytes", str(kv_bytes),
             "--kv-offload", args.kv_offload, *local_prefill_args(args)]
    run_dir = out_dir / policy
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(REPO / ".venv" / "bin" / "tandem"), "up", "--port", str(args.grpc_port), "--http-port",
            str(args.http_port), *extra]
    # /v1/models answers once the router listens, /health once every pool has a live worker.
    server = Server(argv, f"http://127.0.0.1:{args.http_port}/v1/models", run_dir / "tandem-up.log",
                    ready_timeout_s=args.start_timeout_s)
    wait_http(f"http://127.0.0.1:{args.http_port}/health", server.proc, args.start_timeout_s)
    try:
        block_size, prefill_blocks = cluster_kv(args.grpc_port)
        capacity = min(prefill_blocks.values()) * block_size
        sized = capacity < working_set <= 2 * capacity
        print(f"[{policy}] working set {working_set} tokens; one prefill worker's KV cache {capacity} tokens "
              f"({'ok' if sized else 'NOT'} between 1x and 2x)", flush=True)
        result = run_scenario(make_scenario(args, args.seed), tokenizer, target=f"127.0.0.1:{args.grpc_port}",
                              output_dir=run_dir)
        ideal, cached = ideal_and_cached(result["requests"], prefix_lens, block_size)
        row = {"phase": policy, "completed": result["completed"], "failed": result["failed"],
               "median_ttft_ms": result["median_ttft_ms"], "p99_ttft_ms": result["p99_ttft_ms"],
               "cached_tokens": cached, "ideal_cached_tokens": ideal,
               "cached_of_ideal": cached / ideal if ideal else None, "kv_capacity_tokens": capacity,
               "working_set_tokens": working_set, "sized_as_intended": sized,
               "max_local_prefill_length": args.max_local_prefill_length,
               "router": router_counters(args.http_port), "result": str(run_dir / "result.json")}
        if policy == "cache_aware" and not args.no_restart:
            row["restart"] = run_restart(args, run_dir, block_size, tokenizer)
        if policy == "cache_aware" and args.kill_worker_at_s is not None:
            row["worker_kill"] = run_worker_kill(args, run_dir, tokenizer)
        return row
    finally:
        server.stop()


class RouterProcess:
    """`python -m router` beside the cluster's own router: same registry and Redis, its own ports."""

    def __init__(self, registry: str, redis_url: str, args, log_path: Path):
        self.argv = [sys.executable, "-m", "router", "--registry", registry, "--redis-url", redis_url,
                     "--routing-policy", "cache_aware", "--port", str(args.restart_grpc_port),
                     "--http-port", str(args.restart_http_port), *local_prefill_args(args)]
        self.log = open(log_path, "a")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)

    def wait_serving(self, port: int, timeout_s: float) -> None:
        wait_http(f"http://127.0.0.1:{port}/health", self.proc, timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def index_blocks(http_port: int) -> float | None:
    """The router's tandem_router_prefix_index_blocks (None while it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tandem_router_prefix_index_blocks":
                return s.value
    return None


class IndexSampler(threading.Thread):
    """Every 0.25 s, the prefix index size of the cluster's own router (never restarted: the reference) and of the
    restarted one: how complete the restarted router's index is, over time."""

    def __init__(self, reference_port: int, restarted_port: int):
        super().__init__(daemon=True)
        self.ports = (reference_port, restarted_port)
        self.samples: list[tuple[float, float | None, float | None]] = []  # (monotonic s, reference, restarted)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.samples.append((time.monotonic(), *(index_blocks(port) for port in self.ports)))

    def full_again_s(self, since: float, fraction: float = 0.99) -> float | None:
        """Seconds from `since` (monotonic) until the restarted router's index held `fraction` of the reference's."""
        for t, ref, new in self.samples:
            if t >= since and ref and new is not None and new >= fraction * ref:
                return t - since
        return None


def run_restart(args, out_dir: Path, block_size: int, tokenizer) -> dict:
    """The restart phase, on the running cache_aware cluster whose `tandem up` logged to out_dir."""
    log = (out_dir / "tandem-up.log").read_text()
    redis_url = re.search(r"embedded Redis \(valkey-server\) at (\S+)", log)
    registry = re.search(r"registry at ([^;\s]+)", log)
    if redis_url is None or registry is None:
        raise RuntimeError("could not find the embedded Redis URL and the registry address in tandem up's log")
    scenario = make_scenario(args, args.seed + 1).with_overrides(duration_s=args.restart_duration,
                                                                 rate=args.restart_rate)
    prefix_lens = group_prefix_lens(scenario, tokenizer)
    router = RouterProcess(registry.group(1), redis_url.group(1), args, out_dir / "router-restart.log")
    times: dict[str, float] = {}
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            times["kill_s"] = time.monotonic() - times["t0"]
            router.kill()
            times["started"] = time.monotonic()
            router.start()
            router.wait_serving(args.restart_http_port, args.start_timeout_s)
            times["serving_s"] = time.monotonic() - times["t0"]
            print(f"[restart] router killed at {times['kill_s']:.1f} s, serving again at {times['serving_s']:.1f} s",
                  flush=True)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    timer = threading.Timer(args.restart_at_s, restart)

    def on_start(total) -> None:
        times["t0"] = time.monotonic()
        timer.start()

    router.start()
    sampler = IndexSampler(args.http_port, args.restart_http_port)
    sampler.start()
    try:
        router.wait_serving(args.restart_http_port, args.start_timeout_s)
        target = f"127.0.0.1:{args.restart_grpc_port}"
        load = asyncio.run(drive(scenario, tokenizer, target=target, on_start=on_start))
        result = build_result(scenario, load, target=target)
        write_outputs(result, load, scenario, out_dir / "restart")
        timer.cancel()  # not started yet: the run was shorter than --restart-at-s
        if timer.is_alive():
            timer.join()  # the restart is under way: let it finish before stopping the router
    finally:
        sampler.done.set()
        router.stop()
    records = result["requests"]
    if errors:
        raise RuntimeError(f"restarting the router failed: {errors[0]}") from errors[0]
    if "serving_s" not in times:
        raise RuntimeError("the run ended before the restarted router served again: raise --restart-duration or "
                           "lower --restart-at-s")
    kill_s, serving_s = times["kill_s"], times["serving_s"]
    before, n_before = hit_rate(records, prefix_lens, block_size, max(0.0, kill_s - 30), kill_s, records)
    # The client's channel reconnects with gRPC's backoff (up to seconds after a long outage): the window starts at
    # the first request the new router served, not at the moment it listened.
    first_ok_s = min((r["send_s"] for r in records if r["send_s"] >= kill_s and r["status"] == "OK"), default=None)
    after, n_after = (None, 0) if first_ok_s is None else hit_rate(records, prefix_lens, block_size, first_ok_s,
                                                                   first_ok_s + 10, records)
    bins = []
    for start in range(0, int(math.ceil(max(r["send_s"] for r in records))) + 1, 5):
        rate, n = hit_rate(records, prefix_lens, block_size, start, start + 5, records)
        bins.append({"from_s": start, "hit_rate": rate, "requests": n})
    started, t0 = times["started"], times["t0"]
    kill_ref = [ref for t, ref, _ in sampler.samples if t <= t0 + kill_s and ref is not None]
    index = {"blocks_at_kill_reference": kill_ref[-1] if kill_ref else None,
             "full_again_s_from_start": sampler.full_again_s(started),
             "full_again_s_from_serving": sampler.full_again_s(t0 + serving_s),
             "samples": [(round(t - t0, 2), ref, new) for t, ref, new in sampler.samples if t >= started - 1]}
    return {"kill_s": kill_s, "serving_again_s": serving_s, "down_s": serving_s - kill_s, "first_ok_s": first_ok_s,
            "index": index,
            "hit_rate_30s_before": before, "requests_before": n_before,
            "hit_rate_first_10s_after": after, "requests_after": n_after,
            "recovered": before is not None and after is not None and after >= 0.9 * before,
            "failed_requests": sum(1 for r in records if r["status"] != "OK"), "bins_5s": bins,
            "result": str(out_dir / "restart" / "result.json")}


def run_worker_kill(args, out_dir: Path, tokenizer) -> dict:
    """The worker-kill phase, on the running cache_aware cluster: a new run of the scenario (seed + 2) through the
    cluster's own router; --kill-worker-at-s into it, a prefill worker's process gets SIGKILL (tandem up replaces
    it). Reported: when its blocks left the router's prefix index (the router's log line) against the workers'
    snapshot interval, and, over the run, the cached prompt tokens the router predicted against those the workers
    reported (its counters' growth during the run)."""
    import grpc

    from tandem.v1 import worker_pb2, worker_pb2_grpc
    from workers.server import WorkerConfig  # its kv_events_interval_s: tandem up's workers keep the default

    scenario = make_scenario(args, args.seed + 2).with_overrides(duration_s=args.kill_duration)
    with grpc.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        status = worker_pb2_grpc.ClusterStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=10)
    victim = next(w.info for w in status.workers if w.info.role == "prefill")
    killed: dict[str, float] = {}

    def kill() -> None:
        killed["wall"] = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        print(f"[worker kill] prefill worker {victim.worker_id} (pid {victim.pid}) killed", flush=True)

    timer = threading.Timer(args.kill_worker_at_s, kill)
    before = router_counters(args.http_port)
    target = f"127.0.0.1:{args.grpc_port}"
    load = asyncio.run(drive(scenario, tokenizer, target=target, on_start=lambda total: timer.start()))
    timer.cancel()
    time.sleep(1)
    after = router_counters(args.http_port)
    result = build_result(scenario, load, target=target)
    write_outputs(result, load, scenario, out_dir / "worker-kill")
    if "wall" not in killed:
        raise RuntimeError("the run ended before the worker kill: raise --kill-duration or lower --kill-worker-at-s")
    left_s = None
    pattern = re.compile(r"^(\S+ \S+),(\d+) .*prefix index: worker " + re.escape(victim.worker_id)
                         + r" .*leave the index")
    for line in (out_dir / "tandem-up.log").read_text().splitlines():
        m = pattern.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            if t >= killed["wall"] - 1:
                left_s = t - killed["wall"]
                break
    grown = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    predicted = grown.get("tandem_router_prefix_cache_predicted_tokens_total", 0)
    cached = grown.get("tandem_router_prefix_cache_cached_tokens_total", 0)
    return {"victim": victim.worker_id, "kill_s": args.kill_worker_at_s, "left_index_s": left_s,
            "snapshot_interval_s": WorkerConfig.kv_events_interval_s, "completed": result["completed"],
            "failed": result["failed"], "predicted_tokens": predicted, "cached_tokens": cached,
            "predicted_vs_cached": (predicted - cached) / cached if cached else None,
            "result": str(out_dir / "worker-kill" / "result.json")}


def markdown(rows: list[dict]) -> str:
    lines = ["| policy | completed | failed | TTFT p50 (ms) | TTFT p99 (ms) | cached tokens | ideal | cached/ideal |",
             "|" + "---|" * 8]
    for r in rows:
        frac = "-" if r["cached_of_ideal"] is None else f"{r['cached_of_ideal']:.2f}"
        lines.append(f"| {r['phase']} | {r['completed']} | {r['failed']} | {r['median_ttft_ms']:.0f} "
                     f"| {r['p99_ttft_ms']:.0f} | {r['cached_tokens']} | {r['ideal_cached_tokens']} | {frac} |")
    by = {r["phase"]: r for r in rows}
    if {"load", "cache_aware"} <= by.keys():
        ratio = by["cache_aware"]["median_ttft_ms"] / by["load"]["median_ttft_ms"]
        lines.append(f"\nTTFT p50 cache_aware / load: {ratio:.2f} (target <= 0.2)")
    for r in rows:
        lines.append(f"{r['phase']}: working set {r['working_set_tokens']} tokens, one worker's KV cache "
                     f"{r['kv_capacity_tokens']} tokens; router counters {json.dumps(r['router'])}")
        restart = r.get("restart")
        if restart:
            lines.append(f"\nrouter restart: down {restart['down_s']:.1f} s; hit rate {restart['hit_rate_30s_before']} "
                         f"({restart['requests_before']} requests) in the 30 s before the kill, "
                         f"{restart['hit_rate_first_10s_after']} ({restart['requests_after']} requests) in the first "
                         f"10 s from the first request served after it: "
                         f"{'recovered' if restart['recovered'] else 'NOT recovered'} (target >= 90%); "
                         f"{restart['failed_requests']} requests failed (most while it was down)")
            index = restart["index"]
            lines.append(f"\nrestarted router's prefix index at 99% of the never-restarted router's: "
                         f"{index['full_again_s_from_start']} s after its process started, "
                         f"{index['full_again_s_from_serving']} s after it served again (target: within 10 s)")
        kill = r.get("worker_kill")
        if kill:
            lines.append(f"\nworker kill: {kill['victim']} killed at {kill['kill_s']} s; its blocks left the index "
                         f"{kill['left_index_s']} s later (snapshot interval {kill['snapshot_interval_s']} s); over "
                         f"the run the router predicted {kill['predicted_tokens']:.0f} cached tokens, the workers "
                         f"reported {kill['cached_tokens']:.0f} ({kill['predicted_vs_cached']}; target within 5%); "
                         f"{kill['completed']} completed, {kill['failed']} failed")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["load", "cache_aware"], choices=["load", "cache_aware"])
    p.add_argument("--num-groups", type=int, default=8, help="shared-prefix groups (rag.yaml has 4)")
    p.add_argument("--rate", type=float, default=0.5, help="requests/s, Poisson (rag.yaml's)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity-ratio", type=float, default=1.5,
                   help="working set / one worker's KV cache; must be in (1, 2] (default %(default)s)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="override the computed size")
    p.add_argument("--kv-offload", default="off", choices=["auto", "on", "off"],
                   help="the remote KV tier (tandem up --kv-offload); off by default: it would hand `load` some of "
                        "the hits that routing is measured on here (the tier has its own benchmark, bench_kv_tier)")
    p.add_argument("--max-local-prefill-length", type=int, default=None,
                   help="tandem up's (and the restarted router's) conditional-disaggregation threshold: a prompt "
                        "whose uncached part is shorter is prefilled on the decode worker (default: the router's)")
    p.add_argument("--no-restart", action="store_true", help="skip the router-restart phase")
    p.add_argument("--kill-worker-at-s", type=float, default=None,
                   help="run the worker-kill phase (after the restart phase), killing a prefill worker this far in")
    p.add_argument("--kill-duration", type=float, default=120.0, help="seconds of the worker-kill phase's run")
    p.add_argument("--restart-at-s", type=float, default=60.0, help="into the restart phase's run")
    p.add_argument("--restart-duration", type=float, default=120.0, help="seconds of the restart phase's run")
    p.add_argument("--restart-rate", type=float, default=1.0,
                   help="requests/s in the restart phase (more requests in its 10 s window)")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="for the cluster and the routers to serve")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--restart-http-port", type=int, default=8001)
    p.add_argument("--restart-grpc-port", type=int, default=50052)
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if not 1 < args.capacity_ratio <= 2:
        p.error(f"--capacity-ratio: must be in (1, 2], got {args.capacity_ratio}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.output_dir or REPO / "bench-results" / "routing" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer()
    scenario = make_scenario(args, args.seed)
    prefix_lens = group_prefix_lens(scenario, tokenizer)
    working_set = sum(prefix_lens.values())
    kv_bytes = args.kv_cache_memory_bytes or int(working_set / args.capacity_ratio) * kv_bytes_per_token(None)
    print(f"{len(prefix_lens)} groups, working set {working_set} prompt tokens; --kv-cache-memory-bytes {kv_bytes}",
          flush=True)
    rows = [run_policy(policy, args, kv_bytes, prefix_lens, working_set, out_dir, tokenizer)
            for policy in args.policies]
    report(rows, out_dir, markdown(rows) if args.markdown else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
