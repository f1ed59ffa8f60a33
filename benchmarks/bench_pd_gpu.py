"""Prefill/decode disaggregation on one device: greedy equality with colocated, and what the KV hand-off adds to TTFT.

Two real WorkerServers, each in its own process on the same device (cuda_ipc needs two processes): a prefill-role
and a decode-role worker, driven over gRPC with the worker protocol (Prefill, then Decode with its KVHandle), no
router. By default a llama-3-8B-shaped model with dummy weights in float32 on CUDA, KV over cuda_ipc.

  equality   N prompts (seeded random token ids, ragged lengths up to --max-prompt-len, one at exactly it), greedy,
             --max-tokens each, ignore_eos, one at a time: disaggregated (the prefill worker's first token, then the
             decode worker's tokens after it imports the KV over --kv-transport) against colocated (Decode without
             KV on the decode worker, which prefills the prompt itself). Prefix caching is off on both workers
             (--prefix-caching turns it on), so that the decode worker never reuses blocks it computed itself.
  ttft       one --ttft-prompt-len prompt, --repeats times after --warmup rounds, colocated and disaggregated in
             turn, client-side wall times (medians):
               ttft_colocated_ms   Decode without KV: until its first message (the first token)
               ttft_disagg_ms      the Prefill call: until its response (the first token, which a router streams at
                                   once; it includes the prefill worker staging the KV for the hand-off)
               t2_*_ms             until the second token: colocated, the Decode stream's second token; disaggregated,
                                   the Prefill call plus the Decode call until its first message
               handoff_ms          t2_disagg - t2_colocated: all the hand-off adds (staging, the Decode call, the KV
                                   pull, the import into the decode worker's cache); its share of ttft_colocated_ms
                                   is `handoff_frac_of_ttft`, checked against --max-handoff-frac (5%)
               kv_transfer_ms      DecodeResponse.kv_transfer_ms of the first message: the decode worker's pull of
                                   the KV (its fetch calls, thread hop included), with kv_transfer_bytes: GB/s and TB/s
             Why t2: a router sends the prefill's first token on as soon as the Prefill call returns, so the pull and
             import delay the second token; the staging delays the first. handoff_ms counts both.

    python benchmarks/bench_pd_gpu.py                          # CUDA, llama-3-8b dummy, float32, cuda_ipc
    python benchmarks/bench_pd_gpu.py --layers 16              # the same shape with 16 of its 32 layers
    python benchmarks/bench_pd_gpu.py --device cpu --kv-transport shm --tiny   # CPU smoke run, a 2-layer toy
    python benchmarks/bench_pd_gpu.py --markdown               # also print the rows as markdown

float32 KV of a 2048-token prompt is 512 MiB for the full llama-3-8B (32 layers) and 256 MiB with --layers 16, the
size of the full model's bfloat16 hand-off. The TTFT and the KV both scale with the layers, so the hand-off's share
of TTFT is about the same at 16 layers as at 32. float32 prefill (no TF32) is several times slower than bfloat16, so
the 5% check is easier in float32: --dtype bfloat16 --skip-equality measures the serving case.

Results go to a JSON file (--output) with the command line, the machine and the date, rewritten after each phase, so
a run cut short keeps what it measured. The exit status is 1 when the outputs differ (or a phase failed), else 0;
the timing check is in the JSON's `checks`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

# Run as a script from anywhere: make the repository's packages importable without installing them.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

READY = "PD_WORKER_READY "
TOKEN_MARGIN = 100  # prompt ids away from both ends of the vocabulary, where special and byte tokens live
MIB = 1 << 20
# What the ttft numbers mean (client-side wall times in this process; medians over the measured rounds).
DEFINITIONS = {
    "ttft_colocated_ms": "Decode without KV on the decode worker (it prefills): until its first message",
    "ttft_disagg_ms": "the Prefill call until its response (the first token; it includes staging the KV)",
    "t2_colocated_ms": "the colocated Decode call until its second token",
    "t2_disagg_ms": "the Prefill call plus the Decode call with its KVHandle until its first message (second token)",
    "handoff_ms": "t2_disagg_ms - t2_colocated_ms: staging, the Decode call, the KV pull and its import",
    "handoff_frac_of_ttft": "handoff_ms / ttft_colocated_ms (checked against max_handoff_frac)",
    "kv_transfer_ms": "DecodeResponse.kv_transfer_ms: the decode worker's pull of the KV (fetch calls, thread hop)",
    "kv_transfer_gb_s": "kv_transfer_bytes / kv_transfer_ms, 10^9 bytes/s",
    "worker_prefill_ms_*": "the workers' own prefill_ms (first scheduled to first token), colocated and disaggregated",
}
CONFIGS_DIR = Path(_REPO_ROOT) / "workers" / "model" / "configs"
# --tiny: a llama small enough for a CPU smoke run (dummy weights, no tokenizer needed).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=4096, max_position_embeddings=8192)


# --- the worker processes ------------------------------------------------------------------------------------------


def worker_main(role: str, spec: dict) -> int:
    """Child process: one WorkerServer; prints READY + its facts as one line on stdout, serves until stdin closes."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[{role}] %(levelname)s %(name)s: %(message)s")
    import torch

    from workers.server import WorkerConfig, WorkerServer

    t0 = time.perf_counter()
    server = WorkerServer(WorkerConfig(role=role, engine=spec["engine"], kv_transport=spec["kv_transport"],
                                       torch_threads=spec["torch_threads"], metrics_port=-1, kv_lease_s=300.0,
                                       kv_fetch_timeout_s=120.0))
    info = server.start()
    engine = server.engine
    mc = engine.model_config
    ready = {
        "role": role, "address": info.address, "pid": os.getpid(), "load_s": time.perf_counter() - t0,
        "model": engine.model_name, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
        "num_hidden_layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size, "vocab_size": mc.vocab_size,
        "num_key_value_heads": mc.num_key_value_heads, "head_dim": mc.head_dim,
        "num_params": sum(p.numel() for p in engine.executor.runner.model.parameters()),
        "kv_bytes_per_token": engine.kv_bytes_per_block // engine.block_size, "block_size": engine.block_size,
        "kv_transport": server.transport.name,
        "transport_takes_device_payloads": bool(getattr(server.transport, "takes_device_payloads", False)),
        "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
    }
    print(READY + json.dumps(ready), flush=True)
    try:
        sys.stdin.read()  # the parent closes it (or dies)
    finally:
        server.stop()
    return 0


class WorkerProcess:
    """A worker in a child process (this script with --worker ROLE); `ready` holds its READY facts once up."""

    def __init__(self, role: str, spec: dict):
        self.role = role
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--worker-spec", json.dumps(spec)]
        # stderr passes through (the part's log); stdout carries the READY line.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=_REPO_ROOT)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready: dict | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, deadline: float) -> dict:
        while self.ready is None:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"{self.role} worker: not serving within the start timeout") from None
            if line is None:
                raise RuntimeError(f"{self.role} worker exited with {self.proc.wait()} before serving (its stderr is "
                                   "above)")
            if line.startswith(READY):
                self.ready = json.loads(line[len(READY):])
            else:
                print(f"[{self.role}] {line.rstrip()}", file=sys.stderr)
        return self.ready

    def stop(self, timeout_s: float = 30.0) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- requests ---------------------------------------------------------------------------------------------------


def engine_request(request_id: str, prompt: list[int], max_tokens: int):
    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import worker_pb2 as wpb

    return wpb.EngineRequest(request_id=request_id, prompt_token_ids=prompt,
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def run_colocated(decode_stub, request_id: str, prompt: list[int], max_tokens: int, timeout_s: float) -> dict:
    """Decode without KV on the decode worker (it prefills here): the tokens and each one's time from the call."""
    from tandem.v1 import worker_pb2 as wpb

    req = engine_request(request_id, prompt, max_tokens)
    tokens, times, worker_prefill_ms = [], [], None
    t0 = time.perf_counter()
    for msg in decode_stub.Decode(wpb.DecodeRequest(request=req), timeout=timeout_s):
        now = (time.perf_counter() - t0) * 1e3
        if worker_prefill_ms is None:
            worker_prefill_ms = msg.prefill_ms
        tokens += msg.token_ids
        times += [now] * len(msg.token_ids)
    return {"tokens": tokens, "token_ms": times, "worker_prefill_ms": worker_prefill_ms}


def run_disaggregated(prefill_stub, decode_stub, request_id: str, prompt: list[int], max_tokens: int,
                      timeout_s: float) -> dict:
    """Prefill on the prefill worker, then Decode with its KVHandle on the decode worker."""
    from tandem.v1 import worker_pb2 as wpb

    req = engine_request(request_id, prompt, max_tokens)
    t0 = time.perf_counter()
    first = prefill_stub.Prefill(wpb.PrefillRequest(request=req), timeout=timeout_s)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    tokens, times = list(first.token_ids), [prefill_ms] * len(first.token_ids)
    out = {"prefill_call_ms": prefill_ms, "prefill_worker_ms": first.prefill_ms, "kv_num_bytes": first.kv.num_bytes,
           "kv_transfer_ms": None, "kv_transfer_bytes": None, "decode_first_msg_ms": None}
    if first.HasField("kv"):
        t1 = time.perf_counter()
        for msg in decode_stub.Decode(wpb.DecodeRequest(request=req, kv=first.kv), timeout=timeout_s):
            now = time.perf_counter()
            if out["decode_first_msg_ms"] is None:
                out["decode_first_msg_ms"] = (now - t1) * 1e3
                out["kv_transfer_ms"], out["kv_transfer_bytes"] = msg.kv_transfer_ms, msg.kv_transfer_bytes
            tokens += msg.token_ids
            times += [(now - t0) * 1e3] * len(msg.token_ids)
    return {**out, "tokens": tokens, "token_ms": times}


def prompt_of(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN) for _ in range(length)]


def prompt_lens(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    """n ragged lengths in [lo, hi]: the first exactly hi, the rest drawn (so partial blocks come up)."""
    return [hi] + [rng.randint(lo, hi) for _ in range(n - 1)]


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- the phases -------------------------------------------------------------------------------------------------


def phase_equality(stubs, args, vocab_size: int) -> dict:
    prefill, decode = stubs
    rng = random.Random(args.seed)
    lens = prompt_lens(rng, args.num_prompts, args.min_prompt_len, args.max_prompt_len)
    rows = []
    for i, n in enumerate(lens):
        prompt = prompt_of(rng, n, vocab_size)
        col = run_colocated(decode, f"eq-{i}-colocated", prompt, args.max_tokens, args.request_timeout_s)
        dis = run_disaggregated(prefill, decode, f"eq-{i}-disagg", prompt, args.max_tokens, args.request_timeout_s)
        at = first_mismatch(col["tokens"], dis["tokens"])
        rows.append({"prompt": i, "prompt_len": n, "equal": at is None, "num_tokens": len(dis["tokens"]),
                     "first_mismatch_at": at, "kv_bytes": dis["kv_num_bytes"], "kv_transfer_ms": dis["kv_transfer_ms"],
                     **({"colocated": col["tokens"], "disaggregated": dis["tokens"]} if at is not None else {})})
        print(f"[bench] equality {i + 1}/{len(lens)}: {n} tokens, {'equal' if at is None else f'DIFFER at {at}'}",
              file=sys.stderr)
    mismatches = [r for r in rows if not r["equal"]]
    first = mismatches[0] if mismatches else None
    return {
        "equal": not mismatches and all(r["num_tokens"] == args.max_tokens for r in rows),
        "num_prompts": len(rows), "prompt_lens": lens, "max_tokens": args.max_tokens, "seed": args.seed,
        "num_mismatched": len(mismatches),
        "first_mismatch": first and {"prompt": first["prompt"], "prompt_len": first["prompt_len"],
                                     "token_index": first["first_mismatch_at"],
                                     "colocated": first["colocated"][first["first_mismatch_at"]:][:8],
                                     "disaggregated": first["disaggregated"][first["first_mismatch_at"]:][:8]},
        "rows": rows,
    }


def phase_ttft(stubs, args, vocab_size: int) -> dict:
    prefill, decode = stubs
    prompt = prompt_of(random.Random(args.seed + 1), args.ttft_prompt_len, vocab_size)
    col_runs, dis_runs = [], []
    for r in range(args.warmup + args.repeats):
        # The same prompt every round: prefix caching is off, so each is computed in full.
        col = run_colocated(decode, f"ttft-{r}-colocated", prompt, args.ttft_max_tokens, args.request_timeout_s)
        dis = run_disaggregated(prefill, decode, f"ttft-{r}-disagg", prompt, args.ttft_max_tokens,
                                args.request_timeout_s)
        if r >= args.warmup:
            col_runs.append(col)
            dis_runs.append(dis)
        print(f"[bench] ttft round {r + 1}/{args.warmup + args.repeats}{' (warm-up)' if r < args.warmup else ''}: "
              f"colocated {col['token_ms'][0]:.1f} ms, prefill call {dis['prefill_call_ms']:.1f} ms, "
              f"kv pull {dis['kv_transfer_ms'] or 0:.2f} ms", file=sys.stderr)
    return summarize_ttft(col_runs, dis_runs, args.ttft_prompt_len, args.max_handoff_frac)


def summarize_ttft(col_runs: list[dict], dis_runs: list[dict], prompt_len: int, max_handoff_frac: float) -> dict:
    """Medians over the measured rounds, and the hand-off's share of the colocated TTFT (see the module docstring)."""
    def second(run):  # time of the second token, None when there is none
        return run["token_ms"][1] if len(run["token_ms"]) > 1 else None

    def itl(run):  # median gap between the tokens after the second
        gaps = [b - a for a, b in zip(run["token_ms"][1:], run["token_ms"][2:])]
        return _median(gaps)

    ttft_col = _median([r["token_ms"][0] for r in col_runs])
    ttft_dis = _median([r["prefill_call_ms"] for r in dis_runs])
    t2_col, t2_dis = _median([second(r) for r in col_runs]), _median([second(r) for r in dis_runs])
    kv_ms = _median([r["kv_transfer_ms"] for r in dis_runs])
    kv_bytes = _median([r["kv_transfer_bytes"] for r in dis_runs])
    handoff_ms = t2_dis - t2_col if t2_dis is not None and t2_col is not None else None
    frac = handoff_ms / ttft_col if handoff_ms is not None and ttft_col else None
    gb_s = kv_bytes / (kv_ms * 1e-3) / 1e9 if kv_ms and kv_bytes else None
    return {
        "prompt_len": prompt_len, "repeats": len(col_runs),
        "ttft_colocated_ms": ttft_col,
        "ttft_disagg_ms": ttft_dis,
        "ttft_disagg_minus_colocated_ms": (ttft_dis - ttft_col
                                           if ttft_dis is not None and ttft_col is not None else None),
        "t2_colocated_ms": t2_col, "t2_disagg_ms": t2_dis,
        "decode_first_msg_ms": _median([r["decode_first_msg_ms"] for r in dis_runs]),
        "itl_colocated_ms": _median([itl(r) for r in col_runs]),
        "itl_disagg_ms": _median([itl(r) for r in dis_runs]),
        "handoff_ms": handoff_ms,
        "handoff_frac_of_ttft": frac,
        "max_handoff_frac": max_handoff_frac,
        "kv_transfer_ms": kv_ms,
        "kv_transfer_frac_of_ttft": kv_ms / ttft_col if kv_ms is not None and ttft_col else None,
        "kv_transfer_bytes": int(kv_bytes) if kv_bytes is not None else None,
        "kv_transfer_mib": kv_bytes / MIB if kv_bytes is not None else None,
        "kv_transfer_gb_s": gb_s,
        "kv_transfer_tb_s": gb_s / 1e3 if gb_s is not None else None,
        "worker_prefill_ms_colocated": _median([r["worker_prefill_ms"] for r in col_runs]),
        "worker_prefill_ms_disagg": _median([r["prefill_worker_ms"] for r in dis_runs]),
        "definitions": DEFINITIONS,
        "rounds": {
            "colocated_token_ms": [r["token_ms"] for r in col_runs],
            "disagg_token_ms": [r["token_ms"] for r in dis_runs],
            "disagg_prefill_call_ms": [r["prefill_call_ms"] for r in dis_runs],
            "disagg_decode_first_msg_ms": [r["decode_first_msg_ms"] for r in dis_runs],
            "kv_transfer_ms": [r["kv_transfer_ms"] for r in dis_runs],
        },
    }


def worker_stats(stub) -> dict:
    from tandem.v1 import worker_pb2 as wpb

    s = stub.GetStats(wpb.GetStatsRequest(), timeout=30)
    out = {k: getattr(s, k) for k in ("num_kv_held", "kv_transfers", "kv_transfer_bytes", "kv_transfer_seconds",
                                      "kv_leases_expired", "num_prompt_tokens", "num_generation_tokens",
                                      "num_preemptions", "num_blocks")}
    # Newer workers also report the time inside the transport's fetch calls alone.
    out["kv_fetch_seconds"] = getattr(s, "kv_fetch_seconds", None)
    out["num_requests_finished"] = dict(s.num_requests_finished)
    return out


# --- model and setup --------------------------------------------------------------------------------------------


def model_source(args, folder: Path) -> tuple[str, str, dict]:
    """(model, load_format, facts): --tiny and --layers write a config.json for dummy weights into `folder`."""
    if args.tiny or args.layers is not None:
        if args.tiny:
            base = json.loads((CONFIGS_DIR / "llama-3-8b.json").read_text())
            base.update(TINY)
            name = "tiny-llama"
        else:
            if args.load_format != "dummy" or not (CONFIGS_DIR / f"{args.model}.json").is_file():
                raise SystemExit(f"--layers: needs --load-format dummy and a shipped architecture "
                                 f"({', '.join(p.stem for p in sorted(CONFIGS_DIR.glob('*.json')))}), got "
                                 f"{args.model!r} with {args.load_format!r}")
            base = json.loads((CONFIGS_DIR / f"{args.model}.json").read_text())
            name = f"{args.model}-{args.layers}l"
        full_layers = base["num_hidden_layers"]
        if args.layers is not None:
            base["num_hidden_layers"] = args.layers
        path = folder / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(base, indent=2) + "\n")
        return str(path), "dummy", {"arch": name, "full_num_hidden_layers": full_layers,
                                    "num_hidden_layers": base["num_hidden_layers"]}
    return args.model, args.load_format, {"arch": args.model}


def engine_options(args, model: str, load_format: str) -> dict:
    opts = dict(model=model, load_format=load_format, dtype=args.dtype, device=args.device, seed=0,
                max_model_len=args.max_model_len, kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.prefix_caching)
    if args.enforce_eager:
        opts["enforce_eager"] = True
    elif args.device == "cuda" and args.cudagraph_capture_sizes:
        opts["cudagraph_capture_sizes"] = args.cudagraph_capture_sizes
    return opts


def machine_info() -> dict:
    """This process's view (no CUDA context here: the workers report their device)."""
    return {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def run(args, command: str) -> tuple[dict, bool]:
    """Everything the benchmark measures; (results, ok). Writes args.output after each phase."""
    import grpc

    from tandem.v1 import worker_pb2_grpc

    results: dict = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
                     "machine": machine_info(),
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "phases_s": {}, "errors": []}
    t_start = time.perf_counter()

    def save() -> None:  # with the checks of what is measured so far
        eq, ttft = results.get("equality"), results.get("ttft")
        results["equal"] = eq["equal"] if eq else None
        results["checks"] = {"equal": results["equal"]}
        if ttft and ttft["handoff_frac_of_ttft"] is not None:
            results["checks"]["handoff_within_max_frac"] = ttft["handoff_frac_of_ttft"] <= args.max_handoff_frac
        results["wall_s"] = time.perf_counter() - t_start
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=2) + "\n")

    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-pd-") as folder:
        model, load_format, facts = model_source(args, Path(folder))
        engine = engine_options(args, model, load_format)
        results["engine_options"] = {**engine, "model": facts["arch"]}
        results["kv_transport"] = args.kv_transport
        spec = {"engine": engine, "kv_transport": args.kv_transport, "torch_threads": args.torch_threads}
        t0 = time.perf_counter()
        workers = [WorkerProcess(role, spec) for role in ("prefill", "decode")]  # they load at the same time
        channels = []
        try:
            deadline = time.monotonic() + args.start_timeout_s
            try:
                ready = {w.role: w.wait_ready(deadline) for w in workers}
            except (TimeoutError, RuntimeError) as e:
                results["errors"].append(f"start: {e}")
                save()
                return results, False
            results["phases_s"]["start"] = time.perf_counter() - t0
            d = ready["decode"]
            results["workers"] = ready
            results["model"] = {
                **facts, "name": d["model"], "dtype": d["dtype"], "device": d["device"], "gpu": d["gpu"],
                "num_params": d["num_params"], "hidden_size": d["hidden_size"], "vocab_size": d["vocab_size"],
                "num_key_value_heads": d["num_key_value_heads"], "head_dim": d["head_dim"],
                "kv_bytes_per_token": d["kv_bytes_per_token"],
                "kv_mib_of_ttft_prompt": d["kv_bytes_per_token"] * args.ttft_prompt_len / MIB,
                "dummy_weights": load_format == "dummy",
            }
            if facts.get("full_num_hidden_layers", d["num_hidden_layers"]) != d["num_hidden_layers"]:
                results["model"]["note"] = (f"{facts['arch']}: {d['num_hidden_layers']} of the architecture's "
                                            f"{facts['full_num_hidden_layers']} layers (--layers), for time")
            print(f"[bench] workers up in {results['phases_s']['start']:.1f} s: {d['model']} {d['dtype']} on "
                  f"{d['device']}, KV {d['kv_bytes_per_token'] * args.ttft_prompt_len / MIB:.2f} MiB per "
                  f"{args.ttft_prompt_len} tokens, transport {d['kv_transport']}", file=sys.stderr)
            save()
            channels = [grpc.insecure_channel(ready[r]["address"]) for r in ("prefill", "decode")]
            stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
            vocab_size = d["vocab_size"]

            phases = ([] if args.skip_equality else [("equality", phase_equality)]) + [("ttft", phase_ttft)]
            for name, phase in phases:
                t0 = time.perf_counter()
                try:
                    results[name] = phase(stubs, args, vocab_size)
                except Exception as e:  # noqa: BLE001 - report it, go on with the next phase
                    ok = False
                    results["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                results["phases_s"][name] = time.perf_counter() - t0
                save()
            try:
                results["stats"] = {role: worker_stats(stub) for role, stub in zip(("prefill", "decode"), stubs)}
            except Exception as e:  # noqa: BLE001 - a worker that died says so in the phases' errors too
                results["errors"].append(f"stats: {type(e).__name__}: {e}")
                ok = False
        finally:
            for c in channels:
                c.close()
            for w in workers:
                w.stop()

    save()
    if results["equal"] is False:
        ok = False
    return results, ok


# --- report -----------------------------------------------------------------------------------------------------


def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(frac) -> str:
    return "-" if frac is None else f"{100 * frac:.2f}%"


def format_table(r: dict) -> str:
    m, t, eq = r.get("model", {}), r.get("ttft"), r.get("equality")
    lines = [f"{m.get('name')} ({m.get('num_hidden_layers', '?')} layers, {m.get('dtype')}) on {m.get('device')} "
             f"{m.get('gpu') or ''}, KV over {r.get('kv_transport')}"]
    if eq:
        lines.append(f"equality: {'EQUAL' if eq['equal'] else 'DIFFERENT'} over {eq['num_prompts']} prompts "
                     f"(lengths {min(eq['prompt_lens'])}-{max(eq['prompt_lens'])}, {eq['max_tokens']} tokens each)"
                     + (f"; first mismatch {eq['first_mismatch']}" if eq["first_mismatch"] else ""))
    if t:
        lines += [
            f"TTFT of a {t['prompt_len']}-token prompt (median of {t['repeats']}):",
            f"  colocated {_f(t['ttft_colocated_ms'])} ms, disaggregated (Prefill call) {_f(t['ttft_disagg_ms'])} ms",
            f"  2nd token: colocated {_f(t['t2_colocated_ms'])} ms, disaggregated {_f(t['t2_disagg_ms'])} ms",
            f"  hand-off adds {_f(t['handoff_ms'], '.2f')} ms = {_pct(t['handoff_frac_of_ttft'])} "
            f"of TTFT (max {100 * t['max_handoff_frac']:.0f}%)",
            f"  KV pull {_f(t['kv_transfer_ms'], '.2f')} ms for {_f(t['kv_transfer_mib'], '.2f')} MiB: "
            f"{_f(t['kv_transfer_gb_s'], '.1f')} GB/s ({_f(t['kv_transfer_tb_s'], '.3f')} TB/s)",
        ]
    for e in r.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def format_markdown(r: dict) -> str:
    m, t, eq = r.get("model", {}), r.get("ttft") or {}, r.get("equality") or {}
    head = ("| model | transport | equal | TTFT coloc (ms) | TTFT disagg (ms) | hand-off (ms) | hand-off / TTFT "
            "| KV (MiB) | KV pull (ms) | GB/s |")
    row = (f"| {m.get('name')} {m.get('num_hidden_layers')}L {m.get('dtype')} | {r.get('kv_transport')} "
           f"| {eq.get('equal', '-')} | {_f(t.get('ttft_colocated_ms'))} | {_f(t.get('ttft_disagg_ms'))} "
           f"| {_f(t.get('handoff_ms'), '.2f')} | {_pct(t.get('handoff_frac_of_ttft'))} "
           f"| {_f(t.get('kv_transfer_mib'), '.2f')} | {_f(t.get('kv_transfer_ms'), '.2f')} "
           f"| {_f(t.get('kv_transfer_gb_s'), '.1f')} |")
    return "\n".join([head, "|" + "---|" * 10, row])


# --- command line -----------------------------------------------------------------------------------------------


def _int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="dummy arch, HF folder or .gguf file (default: llama-3-8b)")
    p.add_argument("--load-format", default="dummy", choices=("auto", "safetensors", "gguf", "dummy"))
    p.add_argument("--layers", type=int, default=None,
                   help="a shipped dummy arch with only this many layers (for time; the hand-off's share of TTFT "
                        "stays about the same)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy llama with dummy weights (smoke runs)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--kv-transport", default=None,
                   help="KV transport of both workers (default: cuda_ipc on cuda, shm on cpu)")
    p.add_argument("--num-prompts", type=int, default=8, help="equality: prompts")
    p.add_argument("--min-prompt-len", type=int, default=16)
    p.add_argument("--max-prompt-len", type=int, default=2048, help="equality: the longest prompt (one is this long)")
    p.add_argument("--max-tokens", type=int, default=32, help="equality: tokens per prompt (ignore_eos)")
    p.add_argument("--skip-equality", action="store_true", help="only the TTFT phase")
    p.add_argument("--ttft-prompt-len", type=int, default=2048)
    p.add_argument("--ttft-max-tokens", type=int, default=8, help="tokens per TTFT round (>= 2: the second is timed)")
    p.add_argument("--repeats", type=int, default=5, help="measured TTFT rounds (each: colocated, disaggregated)")
    p.add_argument("--warmup", type=int, default=2, help="TTFT rounds before the measured ones")
    p.add_argument("--max-handoff-frac", type=float, default=0.05, help="the check on handoff_frac_of_ttft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="each worker's KV cache (default: 4 on cuda, 0.0625 on cpu; fixed, as the two workers share "
                        "a device)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="2048: a 2048-token prompt is one prefill step")
    p.add_argument("--prefix-caching", action="store_true",
                   help="leave prefix caching on (off by default: the decode worker must not reuse its own blocks)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--cudagraph-capture-sizes", type=_int_list, default=[1],
                   help="decode batch sizes captured (default 1: the requests run one at a time)")
    p.add_argument("--torch-threads", type=int, default=None, help="per worker (default: 1 on cpu, torch's on cuda)")
    p.add_argument("--start-timeout-s", type=float, default=240.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench-results/pd-gpu-<date>.json)")
    p.add_argument("--markdown", action="store_true", help="also print a markdown row")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # child process: serve this role
    p.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    if args.tiny and args.layers is not None:
        p.error("--tiny and --layers: pick one")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if args.kv_transport is None:
        args.kv_transport = "cuda_ipc" if args.device == "cuda" else "shm"
    if args.kv_cache_gib is None:
        args.kv_cache_gib = 4.0 if args.device == "cuda" else 1 / 16
    if args.torch_threads is None and args.device == "cpu":
        args.torch_threads = 1
    if not 1 <= args.min_prompt_len <= args.max_prompt_len:
        p.error("--min-prompt-len must be in [1, --max-prompt-len]")
    if args.num_prompts < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--num-prompts and --repeats must be >= 1, --warmup >= 0")
    if args.ttft_max_tokens < 2:
        p.error("--ttft-max-tokens must be >= 2 (the second token is timed)")
    if max(args.max_prompt_len, args.ttft_prompt_len) + max(args.max_tokens, args.ttft_max_tokens) > args.max_model_len:
        p.error("--max-model-len must hold the longest prompt and its tokens")
    if args.output is None:
        args.output = Path("bench-results") / f"pd-gpu-{datetime.now():%Y-%m-%d-%H%M%S}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker, json.loads(args.worker_spec))
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/bench_pd_gpu.py", *argv])
    results, ok = run(args, command)
    print(format_table(results))
    if args.markdown:
        print("\n" + format_markdown(results))
    print(f"\n[bench] wrote {args.output} ({results['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
