"""Profile decode-only engine steps with torch.profiler: where one step's time goes, on the host and on the GPU.

For each batch size B: B requests with short random prompts are added and stepped until every one is past its
prefill; a few warm-up steps follow (a CUDA graph captured lazily is captured there), then --steps decode steps
are timed without the profiler (wall ms per step) and --steps more run under it. From the profile:

  gpu_busy_ms_per_step     union of the CUDA kernel intervals (overlapping kernels count once), per step
  kernels_per_step         kernels the GPU executed, graph replays included
  host_launches_per_step   launch calls the host made (cudaLaunchKernel, cuLaunchKernel, cudaLaunchKernelExC,
                           cuLaunchKernelEx, cudaGraphLaunch): a graph replay is one, plus whatever runs eagerly
  top_cpu_ops              the 15 host-side ops with the most self time

    python benchmarks/profile_decode.py                            # CUDA: llama-3-8b dummy weights, bfloat16
    python benchmarks/profile_decode.py --batch-size 1,64 --enforce-eager
    python benchmarks/profile_decode.py --device cpu --model PATH  # smoke run: GPU fields are null

Results go to a JSON file (--output).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from benchmarks.bench_engine import (  # noqa: E402
    _int_list, _sync, effective_engine_options, exact_len_params, machine_info, random_prompt,
)
from workers import LLM  # noqa: E402

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
NUM_TOP_OPS = 15


# --- trace arithmetic ----------------------------------------------------------------------------------


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals, overlaps counted once."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize_trace(trace: dict, num_steps: int) -> dict:
    """Per-step GPU numbers from a Chrome trace (torch.profiler's export). Null GPU fields when no kernel ran
    and no launch was made: a CPU run."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    memcpys = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    launches = Counter(e["name"] for e in events if e.get("name") in LAUNCH_CALLS)
    if not kernels and not launches:
        return {"gpu_busy_ms_per_step": None, "gpu_memcpy_ms_per_step": None, "kernels_per_step": None,
                "host_launches_per_step": None, "launch_calls": {}, "top_kernels": []}
    by_kernel: dict[str, list[float]] = {}
    for e in kernels:
        by_kernel.setdefault(e["name"], []).append(e["dur"])
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:NUM_TOP_OPS]
    return {
        "gpu_busy_ms_per_step": union_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / 1e3 / num_steps,
        "gpu_memcpy_ms_per_step": union_us([(e["ts"], e["ts"] + e["dur"]) for e in memcpys]) / 1e3 / num_steps,
        "kernels_per_step": len(kernels) / num_steps,
        "host_launches_per_step": sum(launches.values()) / num_steps,
        "launch_calls": dict(launches),
        "top_kernels": [{"name": name[:200], "count": len(durs), "total_ms": sum(durs) / 1e3,
                         "ms_per_step": sum(durs) / 1e3 / num_steps} for name, durs in top],
    }


def top_cpu_ops(prof, num_steps: int) -> list[dict]:
    """Host-side ops (CUDA runtime calls included) with the most self time."""
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:NUM_TOP_OPS]
    return [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / num_steps} for e in rows]


# --- the engine ----------------------------------------------------------------------------------------


def _decode_step(llm: LLM) -> int:
    """One engine step; the number of tokens it produced (batch_size when it was decode-only for the batch)."""
    return sum(len(ev.new_token_ids) for ev in llm.engine.step())


def profile_batch(llm: LLM, batch_size: int, num_steps: int, num_warmup_steps: int, prompt_len: int,
                  rng: random.Random) -> dict:
    engine = llm.engine
    vocab_size = engine.model_config.vocab_size
    num_tokens = 1 + num_warmup_steps + 2 * num_steps + 2  # never finishes while measured
    params = exact_len_params(num_tokens)
    req_ids = [engine.add_request(random_prompt(rng, prompt_len, vocab_size), params) for _ in range(batch_size)]
    waiting_first_token = set(req_ids)
    while waiting_first_token:
        for ev in engine.step():
            if ev.new_token_ids:
                waiting_first_token.discard(ev.req_id)
    for _ in range(num_warmup_steps):
        _decode_step(llm)

    _sync(engine.device)
    t0 = time.perf_counter()
    tokens = [_decode_step(llm) for _ in range(num_steps)]
    _sync(engine.device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / num_steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        tokens += [_decode_step(llm) for _ in range(num_steps)]
        _sync(engine.device)
        profiled_wall_ms = (time.perf_counter() - t0) * 1e3 / num_steps
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())
    gpu = summarize_trace(trace, num_steps)

    for req_id in req_ids:
        engine.abort_request(req_id)
    busy = gpu["gpu_busy_ms_per_step"]
    return {
        "batch_size": batch_size,
        "decode_only": all(n == batch_size for n in tokens),
        "wall_ms_per_step": wall_ms,
        "tok_s": batch_size * 1e3 / wall_ms,
        "profiled_wall_ms_per_step": profiled_wall_ms,
        **gpu,
        "gpu_busy_frac": busy / profiled_wall_ms if busy is not None else None,
        "top_cpu_ops": top_cpu_ops(prof, num_steps),
    }


# --- CLI -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="HF folder, .gguf file or dummy arch (default: llama-3-8b)")
    p.add_argument("--load-format", default=None, choices=("auto", "safetensors", "gguf", "dummy"),
                   help="default: dummy for a named arch on CUDA, else auto")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=_int_list, default=[1], help="comma-separated: each is profiled in turn")
    p.add_argument("--steps", type=int, default=10, help="decode steps timed, then as many profiled")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest --batch-size, at least 64")
    p.add_argument("--attention-backend", default=None, choices=("auto", "triton", "sdpa"))
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--cudagraph-capture-sizes", type=_int_list, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench-results/profile-<date>.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or not args.batch_size or min(args.batch_size) < 1:
        p.error("--steps and each --batch-size must be >= 1, --warmup-steps >= 0")
    return args


def engine_options(args: argparse.Namespace) -> dict:
    on_cuda = args.device == "cuda"
    load_format = args.load_format or ("dummy" if on_cuda and not Path(args.model).exists() else "auto")
    opts = {"device": args.device, "dtype": args.dtype or ("bfloat16" if on_cuda else "float32"),
            "load_format": load_format, "seed": args.seed,
            "max_num_seqs": args.max_num_seqs or max(64, *args.batch_size)}
    if args.kv_cache_memory_bytes is not None:
        opts["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    # Only when given: an engine without these options refuses them.
    if args.attention_backend is not None:
        opts["attention_backend"] = args.attention_backend
    if args.enforce_eager:
        opts["enforce_eager"] = True
    if args.cudagraph_capture_sizes:
        opts["cudagraph_capture_sizes"] = args.cudagraph_capture_sizes
    return opts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/profile_decode.py", *argv])
    opts = engine_options(args)
    t0 = time.perf_counter()
    llm = LLM(args.model, **opts)
    load_s = time.perf_counter() - t0
    rng = random.Random(args.seed)
    results = []
    for batch_size in args.batch_size:
        print(f"[profile] batch {batch_size}: {args.steps} timed + {args.steps} profiled decode steps", file=sys.stderr)
        results.append(profile_batch(llm, batch_size, args.steps, args.warmup_steps, args.prompt_len, rng))
    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(llm.engine.device),
        "model": {"name": llm.engine.model_name, "dtype": str(llm.engine.dtype).removeprefix("torch."),
                  "device": str(llm.engine.device), "engine_load_s": load_s},
        "config": {"batch_sizes": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
                   "prompt_len": args.prompt_len, "requested": opts, **effective_engine_options(llm.engine.config)},
        "results": results,
    }
    llm.shutdown()
    output = args.output or Path("bench-results") / f"profile-{datetime.now():%Y-%m-%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        busy = "-" if r["gpu_busy_ms_per_step"] is None else f"{r['gpu_busy_ms_per_step']:.2f}"
        print(f"batch {r['batch_size']:>4}: wall {r['wall_ms_per_step']:.2f} ms/step, GPU busy {busy} ms, "
              f"kernels {r['kernels_per_step']}, host launches {r['host_launches_per_step']} per step")
    print(f"[profile] wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
