"""Engine benchmark: workload throughput and decode speed against Hugging Face transformers and the memory bound.

One run measures, on the same process and threads:

  workload  N requests (prompt and output lengths drawn with a fixed seed), all submitted at once to the engine,
            against HF `generate` in static left-padded batches; every request produces exactly its output length.
  decode    tok/s after prefill for B requests with short prompts (B=1 on CPU; 1 and 64 on CUDA), against HF at
            batch 1 (CPU only) and against the memory-bandwidth bound: a decode step reads every weight once,
            so it can run at most bandwidth / weight_bytes times a second.

    python benchmarks/bench_engine.py                  # CPU: default SmolLM2-135M GGUF in float32, HF baseline
    python benchmarks/bench_engine.py --gpu            # CUDA: llama-3-8b dummy weights in bfloat16, no HF
    python benchmarks/bench_engine.py --markdown       # also print the rows for docs/benchmarks.md
    python benchmarks/bench_engine.py --gpu --enforce-eager   # CUDA without graphs, to compare with the default

--attention-backend, --enforce-eager and --cudagraph-capture-sizes reach the engine only when given, so a run
without them measures the engine's defaults.

Results go to a JSON file (--output) with the command line, the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

# Run as a script from anywhere: make the repository's packages importable without installing them.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from workers import LLM, SamplingParams  # noqa: E402
from workers.model.loader import resolve_model  # noqa: E402
from workers.model_runner import resolve_device, resolve_dtype  # noqa: E402

# Prompt tokens are drawn away from both ends of the vocabulary, where special and byte tokens live.
TOKEN_MARGIN = 100
GIB = 1024**3

# --- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    prompt_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class Throughput:
    time_s: float
    num_prompt_tokens: int
    num_output_tokens: int  # useful tokens only: HF's padding-batch overrun is not counted
    output_tok_s: float
    total_tok_s: float  # prompt + output tokens per second


@dataclass(frozen=True)
class Decode:
    batch_size: int
    prompt_len: int
    num_tokens: int  # per request, including the token sampled at prefill
    num_decode_tokens: int  # tokens produced after every prefill finished
    time_s: float
    tok_s: float


@dataclass(frozen=True)
class Bandwidth:
    device: str
    num_bytes: int  # size of one buffer; each copy reads and writes it
    num_reps: int
    time_s: float  # best single copy
    bytes_per_s: float


# --- workload ------------------------------------------------------------------------------------------


def make_workload(num_requests: int, prompt_len_range: tuple[int, int], output_len_range: tuple[int, int],
                  vocab_size: int, seed: int) -> list[WorkItem]:
    """Requests with uniform prompt and output lengths (inclusive ranges) and random ordinary prompt tokens."""
    rng = random.Random(seed)
    items = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*prompt_len_range)
        output_len = rng.randint(*output_len_range)
        items.append(WorkItem(random_prompt(rng, prompt_len, vocab_size), output_len))
    return items


def random_prompt(rng: random.Random, prompt_len: int, vocab_size: int) -> list[int]:
    return [rng.randrange(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN) for _ in range(prompt_len)]


def exact_len_params(output_len: int) -> SamplingParams:
    """Greedy, and never stopping early: every request produces exactly output_len tokens."""
    return SamplingParams(temperature=0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(time_s: float, num_prompt_tokens: int, num_output_tokens: int) -> Throughput:
    return Throughput(time_s, num_prompt_tokens, num_output_tokens, num_output_tokens / time_s,
                      (num_prompt_tokens + num_output_tokens) / time_s)


def bench_engine_workload(llm: LLM, workload: list[WorkItem]) -> Throughput:
    """Submit the whole workload in one `generate` call (continuous batching decides the rest)."""
    device = llm.engine.device
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([w.prompt_ids for w in workload], [exact_len_params(w.output_len) for w in workload])
    _sync(device)
    elapsed = time.perf_counter() - t0
    for i, (w, out) in enumerate(zip(workload, outs)):
        if len(out.token_ids) != w.output_len:
            raise RuntimeError(f"request {i}: engine produced {len(out.token_ids)} tokens, expected {w.output_len}")
    return _throughput(elapsed, sum(len(w.prompt_ids) for w in workload), sum(w.output_len for w in workload))


def warm_up_engine(llm: LLM, vocab_size: int, seed: int) -> None:
    rng = random.Random(seed + 1000)
    prompts = [random_prompt(rng, n, vocab_size) for n in (24, 40)]
    llm.generate(prompts, exact_len_params(8))


# --- Hugging Face baseline -----------------------------------------------------------------------------


def load_hf_model(model: str | None, dtype: torch.dtype):
    """The same checkpoint through transformers (GGUF dequantized by transformers itself); None for dummy weights."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(model)
    if source.kind == "dummy":
        return None
    if source.kind == "gguf":
        hf = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    return hf.eval()


def _hf_eos_id(hf_model) -> int:
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        eos = hf_model.config.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else int(eos)


def hf_generate(hf_model, prompts: list[list[int]], num_new_tokens: int) -> torch.Tensor:
    """Greedy HF generate of exactly num_new_tokens per row, prompts left-padded to one length."""
    from transformers import GenerationConfig

    eos = _hf_eos_id(hf_model)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])  # [batch, width]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(do_sample=False, max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
                              pad_token_id=eos, eos_token_id=eos)
    with torch.inference_mode():
        return hf_model.generate(input_ids, attention_mask=attention_mask, generation_config=config)


def bench_hf_workload(hf_model, workload: list[WorkItem], batch_size: int) -> Throughput:
    """Static batches in request order; each runs to its longest output, but only each request's own length counts."""
    t0 = time.perf_counter()
    for start in range(0, len(workload), batch_size):
        batch = workload[start : start + batch_size]
        hf_generate(hf_model, [w.prompt_ids for w in batch], max(w.output_len for w in batch))
    elapsed = time.perf_counter() - t0
    return _throughput(elapsed, sum(len(w.prompt_ids) for w in workload), sum(w.output_len for w in workload))


def warm_up_hf(hf_model, vocab_size: int, seed: int) -> None:
    rng = random.Random(seed + 1000)
    hf_generate(hf_model, [random_prompt(rng, n, vocab_size) for n in (24, 40)], 8)


def bench_hf_decode(hf_model, prompt_ids: list[int], num_tokens: int) -> Decode:
    """Batch-1 decode: generate(N) minus generate(1) removes the prefill and the first token."""
    t0 = time.perf_counter()
    hf_generate(hf_model, [prompt_ids], 1)
    t1 = time.perf_counter()
    hf_generate(hf_model, [prompt_ids], num_tokens)
    t2 = time.perf_counter()
    decode_s = (t2 - t1) - (t1 - t0)
    return Decode(1, len(prompt_ids), num_tokens, num_tokens - 1, decode_s, (num_tokens - 1) / decode_s)


# --- decode and the memory bound -----------------------------------------------------------------------


def bench_engine_decode(llm: LLM, prompts: list[list[int]], num_tokens: int) -> Decode:
    """Decode tok/s of len(prompts) requests run together: the clock starts once every prefill is done, and
    counts only the tokens produced after that."""
    engine = llm.engine
    req_ids = [engine.add_request(p, exact_len_params(num_tokens)) for p in prompts]
    waiting_first_token = set(req_ids)
    while waiting_first_token:
        for ev in engine.step():
            if ev.new_token_ids:
                waiting_first_token.discard(ev.req_id)
    _sync(engine.device)
    t0 = time.perf_counter()
    num_decode_tokens = 0
    while engine.has_unfinished_requests():
        num_decode_tokens += sum(len(ev.new_token_ids) for ev in engine.step())
    _sync(engine.device)
    elapsed = time.perf_counter() - t0
    return Decode(len(prompts), len(prompts[0]), num_tokens, num_decode_tokens, elapsed, num_decode_tokens / elapsed)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decode step reads: every layer, the final norm and lm_head. The embedding
    table counts only through lm_head (a decode step gathers one row of it); tied tensors count once."""
    seen: dict[int, int] = {}
    for part in (model.layers, model.norm, model.lm_head):
        for p in part.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def measure_copy_bandwidth(device: torch.device, num_bytes: int = GIB, num_reps: int = 5) -> Bandwidth:
    """Memory bandwidth from `dst.copy_(src)` of a large float32 buffer: read + write = 2 * num_bytes per copy."""
    numel = num_bytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)  # ones, not empty: fault every page in first
    dst = torch.zeros(numel, dtype=torch.float32, device=device)
    dst.copy_(src)
    best_s = float("inf")
    for _ in range(num_reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best_s = min(best_s, time.perf_counter() - t0)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Bandwidth(str(device), numel * 4, num_reps, best_s, 2 * numel * 4 / best_s)


# --- machine and report --------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    info = {
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU numbers badly (torch's threads spin-wait on busy cores).
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(x: float | None, spec: str = ",.1f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def summary_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(metric, tandem, HF, tandem/HF, target) rows shared by the console table and the markdown."""
    rows = []
    wl = results["workload"]
    eng, hf = wl["engine"], wl.get("hf")
    label = (f"Workload output tok/s ({wl['num_requests']} requests, prompt {wl['prompt_len_range'][0]}-"
             f"{wl['prompt_len_range'][1]}, output {wl['output_len_range'][0]}-{wl['output_len_range'][1]})")
    rows.append((label, _fmt(eng["output_tok_s"]), _fmt(hf and hf["output_tok_s"]),
                 _fmt(wl["output_tok_s_ratio"], ".2f", "x"), ">= 3x" if hf else ""))
    rows.append(("Workload total tok/s (prompt + output)", _fmt(eng["total_tok_s"]), _fmt(hf and hf["total_tok_s"]),
                 _fmt(_ratio(eng["total_tok_s"], hf and hf["total_tok_s"]), ".2f", "x"), ""))
    bw = results["bandwidth"]["bytes_per_s"]
    for d in results["decode"]:
        e, h = d["engine"], d.get("hf")
        rows.append((f"Decode tok/s, batch {d['batch_size']} ({d['prompt_len']}-token prompt, {d['num_tokens']} tokens)",
                     _fmt(e["tok_s"]), _fmt(h and h["tok_s"]), _fmt(d["ratio"], ".2f", "x"),
                     ">= 1.0x" if h else ""))
        rows.append((f"Decode batch {d['batch_size']}, share of the bandwidth bound "
                     f"({d['bound_tok_s']:,.0f} tok/s at {bw / 1e9:,.1f} GB/s)",
                     _fmt(100 * d["frac_of_bound"], ".1f", "%"), "", "", ""))
    return rows


def _hf_note(results: dict) -> str:
    if results["workload"]["hf"] is None:
        return "; no HF baseline"
    return f"; HF workload in static batches of {results['workload']['hf_batch_size']}"


def format_table(results: dict) -> str:
    m = results["model"]
    head = (f"{m['name']} ({m['num_params'] / 1e6:,.0f}M params, {m['dtype']} on {m['device']}, "
            f"{results['machine']['torch_num_threads']} threads); weights read per decode step "
            f"{m['decode_weight_bytes'] / 1e6:,.1f} MB; copy bandwidth {results['bandwidth']['bytes_per_s'] / 1e9:,.1f} GB/s"
            f"{_hf_note(results)}")
    header = ("Metric", "tandem", "HF transformers", "tandem / HF", "Target")
    rows = [header, *summary_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [head, ""]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """The rows to paste into docs/benchmarks.md, with the line saying how they were recorded."""
    m, mach = results["model"], results["machine"]
    cpu = mach["cpu_model"] or mach["processor"] or "unknown CPU"
    where = mach.get("gpu") or f"{cpu}, {mach['cpu_count']} CPUs, {mach['torch_num_threads']} torch threads"
    lines = [
        f"Recorded {results['date']} on {where}, torch {mach['torch']}, {m['name']} in {m['dtype']} on "
        f"{m['device']}{_hf_note(results)}:",
        f"`{results['command']}`",
        "",
        "| Metric | tandem | HF transformers | tandem / HF | Target |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in summary_rows(results) if r[0]]
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder, .gguf file or dummy arch (default: SmolLM2-135M GGUF)")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", action="store_true",
                   help="shortcut: --device cuda --model llama-3-8b --load-format dummy --dtype bfloat16 (no HF)")
    p.add_argument("--skip-hf", action="store_true", help="engine only (always so on CUDA or with dummy weights)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-prompt-len", type=int, default=32)
    p.add_argument("--max-prompt-len", type=int, default=512)
    p.add_argument("--min-output-len", type=int, default=16)
    p.add_argument("--max-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of the HF baseline")
    p.add_argument("--decode-tokens", type=int, default=256, help="tokens per request in the decode runs")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--batch-sizes", type=_int_list, default=None,
                   help="decode batch sizes, comma-separated (default: 1 on CPU, 1,64 on CUDA)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--attention-backend", default=None, choices=("auto", "triton", "sdpa"),
                   help="engine option attention_backend (default: the engine's)")
    p.add_argument("--enforce-eager", action="store_true", help="engine option enforce_eager: no CUDA graphs")
    p.add_argument("--cudagraph-capture-sizes", type=_int_list, default=None,
                   help="engine option cudagraph_capture_sizes, comma-separated (default: the engine's)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="engine option kv_cache_memory_bytes (default: the engine's share of free memory)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth-test buffer")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench-results/engine-<date>.json)")
    p.add_argument("--markdown", action="store_true", help="print the rows for docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.gpu:
        args.device, args.load_format, args.dtype = "cuda", "dummy", "bfloat16"
        args.model = args.model or "llama-3-8b"
    if args.min_prompt_len < 1 or args.min_prompt_len > args.max_prompt_len:
        p.error("--min-prompt-len must be in [1, --max-prompt-len]")
    if args.min_output_len < 1 or args.min_output_len > args.max_output_len:
        p.error("--min-output-len must be in [1, --max-output-len]")
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (decode speed counts the tokens after the first)")
    return args


def graph_options(args: argparse.Namespace) -> dict:
    """The attention, CUDA-graph and KV-size engine options given on the command line, and only those."""
    opts = {}
    if args.attention_backend is not None:
        opts["attention_backend"] = args.attention_backend
    if args.enforce_eager:
        opts["enforce_eager"] = True
    if args.kv_cache_memory_bytes is not None:
        opts["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.cudagraph_capture_sizes:
        opts["cudagraph_capture_sizes"] = args.cudagraph_capture_sizes
    return opts


def effective_engine_options(config) -> dict:
    """What the engine ran with, read back from its config (None where this engine has no such option)."""
    sizes = getattr(config, "cudagraph_capture_sizes", None)
    return {"attention_backend": getattr(config, "attention_backend", None),
            "enforce_eager": getattr(config, "enforce_eager", None),
            "cudagraph_capture_sizes": list(sizes) if sizes is not None else None}


def run(args: argparse.Namespace, command: str) -> dict:
    """Everything the benchmark measures, as one JSON-ready dict."""
    device = resolve_device(args.device)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"[bench] warning: load average {load:.1f} on {os.cpu_count()} CPUs before starting; "
              "other work on this machine will skew the numbers", file=sys.stderr)
    engine_opts = {"dtype": args.dtype, "device": args.device, "load_format": args.load_format, "seed": args.seed}
    if args.max_num_seqs is not None:
        engine_opts["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_opts["max_num_batched_tokens"] = args.max_num_batched_tokens
    engine_opts.update(graph_options(args))
    batch_sizes = args.batch_sizes or ([1, 64] if device.type == "cuda" else [1])

    # Before the engine sizes its KV cache from the free memory, so the two buffers always fit.
    print(f"[bench] measuring copy bandwidth ({args.copy_gib:g} GiB on {device})", file=sys.stderr)
    bandwidth = measure_copy_bandwidth(device, int(args.copy_gib * GIB))

    t0 = time.perf_counter()
    llm = LLM(args.model, **engine_opts)
    max_num_seqs = llm.engine.config.scheduler.max_num_seqs
    if max(batch_sizes) > max_num_seqs:
        raise ValueError(f"--batch-sizes: {max(batch_sizes)} exceeds max_num_seqs={max_num_seqs}; raise --max-num-seqs")
    engine_load_s = time.perf_counter() - t0
    mc = llm.engine.model_config
    model = llm.engine.executor.runner.model
    weight_bytes = decode_weight_bytes(model)
    kv_bytes_per_token = llm.engine.kv_bytes_per_block // llm.engine.block_size

    hf_model, hf_load_s = None, None
    if not (args.skip_hf or device.type == "cuda" or args.load_format == "dummy"):
        t0 = time.perf_counter()
        hf_model = load_hf_model(args.model, resolve_dtype(args.dtype, device))
        hf_load_s = time.perf_counter() - t0

    workload = make_workload(args.num_requests, (args.min_prompt_len, args.max_prompt_len),
                             (args.min_output_len, args.max_output_len), mc.vocab_size, args.seed)
    print(f"[bench] workload: {len(workload)} requests on the engine", file=sys.stderr)
    warm_up_engine(llm, mc.vocab_size, args.seed)
    engine_wl = bench_engine_workload(llm, workload)
    hf_wl = None
    if hf_model is not None:
        print(f"[bench] workload: HF in static batches of {args.hf_batch_size}", file=sys.stderr)
        warm_up_hf(hf_model, mc.vocab_size, args.seed)
        hf_wl = bench_hf_workload(hf_model, workload, args.hf_batch_size)

    decode_rng = random.Random(args.seed + 1)
    decode = []
    for batch_size in batch_sizes:
        print(f"[bench] decode: batch {batch_size}, {args.decode_tokens} tokens", file=sys.stderr)
        prompts = [random_prompt(decode_rng, args.decode_prompt_len, mc.vocab_size) for _ in range(batch_size)]
        eng = bench_engine_decode(llm, prompts, args.decode_tokens)
        hf = bench_hf_decode(hf_model, prompts[0], args.decode_tokens) if hf_model is not None and batch_size == 1 else None
        # A decode step reads the weights once for the whole batch; the bound ignores KV reads, which are listed.
        bound_tok_s = batch_size * bandwidth.bytes_per_s / weight_bytes
        mean_context_len = args.decode_prompt_len + args.decode_tokens / 2
        kv_bytes_per_step = int(batch_size * mean_context_len * kv_bytes_per_token)
        decode.append({
            "batch_size": batch_size, "prompt_len": args.decode_prompt_len, "num_tokens": args.decode_tokens,
            "engine": asdict(eng), "hf": hf and asdict(hf), "ratio": _ratio(eng.tok_s, hf and hf.tok_s),
            "bound_tok_s": bound_tok_s, "frac_of_bound": eng.tok_s / bound_tok_s,
            "mean_kv_bytes_per_step": kv_bytes_per_step,
            "bound_with_kv_tok_s": batch_size * bandwidth.bytes_per_s / (weight_bytes + kv_bytes_per_step),
        })
    llm.shutdown()

    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "engine_options": {**engine_opts, **effective_engine_options(llm.engine.config)},
        "model": {
            "name": llm.engine.model_name, "dtype": str(llm.engine.dtype).removeprefix("torch."),
            "device": str(llm.engine.device), "num_params": sum(p.numel() for p in model.parameters()),
            "hidden_size": mc.hidden_size, "num_hidden_layers": mc.num_hidden_layers, "vocab_size": mc.vocab_size,
            "decode_weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
            "engine_load_s": engine_load_s, "hf_load_s": hf_load_s,
        },
        "bandwidth": asdict(bandwidth),
        "workload": {
            "num_requests": len(workload), "seed": args.seed,
            "prompt_len_range": [args.min_prompt_len, args.max_prompt_len],
            "output_len_range": [args.min_output_len, args.max_output_len],
            "hf_batch_size": args.hf_batch_size,
            "engine": asdict(engine_wl), "hf": hf_wl and asdict(hf_wl),
            "output_tok_s_ratio": _ratio(engine_wl.output_tok_s, hf_wl and hf_wl.output_tok_s),
        },
        "decode": decode,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/bench_engine.py", *argv])
    t0 = time.perf_counter()
    results = run(args, command)
    results["wall_s"] = time.perf_counter() - t0
    output = args.output or Path("bench-results") / f"engine-{datetime.now():%Y-%m-%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    if args.markdown:
        print("\n" + format_markdown(results))
    print(f"\n[bench] wrote {output} ({results['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
