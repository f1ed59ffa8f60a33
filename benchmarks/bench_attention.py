"""Paged decode attention benchmark: the Triton kernel against gather + torch SDPA, as KV bandwidth.

At llama-3-8b per-layer shapes (32 query heads, 8 kv heads, head_dim 128, bfloat16, block 16) and one context
length for every sequence, for each batch size:

  triton      paged_decode_attention with choose_num_splits (and, for reference, with one split)
  sdpa        gather each sequence's blocks through its block table, then torch SDPA (what TorchSDPABackend does)

Each is timed with CUDA events, after warm-up, with L2 flushed before every timed call; the median is reported,
and KV bytes read (every key and value of every sequence once) / time as TB/s.

    python benchmarks/bench_attention.py --output OUT/attention.json     # CUDA, well under a minute on an H200
    python benchmarks/bench_attention.py --device cpu                     # tiny smoke through Triton's interpreter
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script from anywhere: make the repository's packages importable without installing them.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from workers.model.backends import triton_kernels as tk  # noqa: E402  (before triton: sets the CPU interpreter)

import triton  # noqa: E402


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


LLAMA3_8B = Shape(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16)
# The CPU smoke only checks that the script runs end to end: the interpreter takes seconds per call.
CPU_SMOKE = Shape(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
L2_FLUSH_BYTES = 256 * 1024**2  # more than any GPU's L2, so every timed call reads the KV cache from memory


@dataclass(frozen=True)
class Result:
    batch_size: int
    context_len: int
    num_splits: int
    kv_bytes: int
    triton_ms: float
    triton_tb_s: float
    triton_one_split_ms: float
    sdpa_ms: float
    sdpa_tb_s: float
    speedup: float
    max_abs_diff: float  # triton against sdpa, a sanity check


def make_inputs(shape: Shape, batch_size: int, context_len: int, device: torch.device, seed: int = 0):
    """A cache holding exactly the batch's blocks, in shuffled order, and a query per sequence."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = -(-context_len // shape.block_size)
    num_blocks = batch_size * blocks_per_seq
    cache_shape = (num_blocks * shape.block_size, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    block_tables = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    block_tables = block_tables.view(batch_size, blocks_per_seq)
    seq_lens = torch.full((batch_size,), context_len, dtype=torch.int32, device=device)
    q = torch.randn(batch_size, shape.num_heads, shape.head_dim, generator=gen, device=device).to(shape.dtype)
    return q, k_cache, v_cache, block_tables, seq_lens


def sdpa_decode(q, k_cache, v_cache, block_tables, context_len: int, block_size: int, scale: float) -> torch.Tensor:
    """Baseline: gather whole blocks into a padded [batch, kv_heads, len, head_dim] batch, then SDPA (every
    sequence here has the same length, so no mask)."""
    batch, max_blocks = block_tables.shape
    _, num_kv_heads, head_dim = k_cache.shape
    flat = block_tables.view(-1).long()

    def gather(cache):
        blocks = cache.view(-1, block_size * num_kv_heads * head_dim).index_select(0, flat)
        return blocks.view(batch, max_blocks * block_size, num_kv_heads, head_dim)[:, :context_len].transpose(1, 2)

    out = F.scaled_dot_product_attention(q.unsqueeze(2), gather(k_cache), gather(v_cache), scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def time_ms(fn: Callable[[], object], device: torch.device, num_warmup: int, num_iters: int) -> float:
    """Median time of one call in milliseconds (CUDA events on CUDA, wall clock on CPU)."""
    for _ in range(num_warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(num_iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_iters)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bench_one(shape: Shape, batch_size: int, context_len: int, device: torch.device, num_sms: int,
              num_warmup: int, num_iters: int) -> Result:
    q, k_cache, v_cache, block_tables, seq_lens = make_inputs(shape, batch_size, context_len, device)
    scale = shape.head_dim**-0.5
    num_splits = tk.choose_num_splits(batch_size, shape.num_kv_heads, block_tables.shape[1], num_sms)
    out = torch.empty_like(q)

    def triton_call(splits: int) -> Callable[[], object]:
        return lambda: tk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, shape.block_size,
                                                 scale, splits, out=out)

    def sdpa_call():
        return sdpa_decode(q, k_cache, v_cache, block_tables, context_len, shape.block_size, scale)

    triton_ms = time_ms(triton_call(num_splits), device, num_warmup, num_iters)
    one_split_ms = triton_ms if num_splits == 1 else time_ms(triton_call(1), device, num_warmup, num_iters)
    sdpa_ms = time_ms(sdpa_call, device, num_warmup, num_iters)

    triton_call(num_splits)()
    max_abs_diff = (out.float() - sdpa_call().float()).abs().max().item()
    kv_bytes = 2 * batch_size * context_len * shape.num_kv_heads * shape.head_dim * k_cache.element_size()
    return Result(
        batch_size=batch_size, context_len=context_len, num_splits=num_splits, kv_bytes=kv_bytes,
        triton_ms=triton_ms, triton_tb_s=kv_bytes / triton_ms / 1e9, triton_one_split_ms=one_split_ms,
        sdpa_ms=sdpa_ms, sdpa_tb_s=kv_bytes / sdpa_ms / 1e9, speedup=sdpa_ms / triton_ms,
        max_abs_diff=max_abs_diff,
    )


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreter": bool(triton.knobs.runtime.interpret),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, num_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def format_table(results: list[Result]) -> str:
    lines = [f"{'batch':>5} {'ctx':>6} {'splits':>6} {'triton ms':>10} {'TB/s':>6} {'1-split ms':>10} "
             f"{'sdpa ms':>9} {'TB/s':>6} {'speedup':>7} {'max diff':>9}"]
    for r in results:
        lines.append(f"{r.batch_size:>5} {r.context_len:>6} {r.num_splits:>6} {r.triton_ms:>10.3f} "
                     f"{r.triton_tb_s:>6.2f} {r.triton_one_split_ms:>10.3f} {r.sdpa_ms:>9.3f} {r.sdpa_tb_s:>6.2f} "
                     f"{r.speedup:>7.2f} {r.max_abs_diff:>9.2e}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated (default 1,64,256 on CUDA, 1,2 on CPU)")
    p.add_argument("--context-len", type=int, default=None, help="keys per sequence (default 2048; 80 on CPU)")
    p.add_argument("--num-iters", type=int, default=None, help="timed calls per measurement (default 30; 2 on CPU)")
    p.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/bench_attention.py", *argv])
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and triton.knobs.runtime.interpret:
        raise SystemExit("CUDA requested but Triton runs its interpreter (TRITON_INTERPRET=1)")
    shape = LLAMA3_8B if on_cuda else CPU_SMOKE
    batch_sizes = args.batch_sizes or ([1, 64, 256] if on_cuda else [1, 2])
    context_len = args.context_len or (2048 if on_cuda else 80)
    num_iters = args.num_iters or (30 if on_cuda else 2)
    num_warmup = 5 if on_cuda else 1
    # choose_num_splits sizes for the GPU; on CPU any count exercises the split path.
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if on_cuda else 4

    t0 = time.perf_counter()
    results = [bench_one(shape, b, context_len, device, num_sms, num_warmup, num_iters) for b in batch_sizes]
    report = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "shape": {**asdict(shape), "dtype": str(shape.dtype)},
        "num_warmup": num_warmup,
        "num_iters": num_iters,
        "results": [asdict(r) for r in results],
        "wall_s": time.perf_counter() - t0,
    }
    print(format_table(results))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[bench] wrote {args.output} ({report['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
