"""Hugging Face transformers decode speed on the engine's GPU benchmark config, for a side-by-side.

The model is transformers' LlamaForCausalLM built from tandem's own dummy config (workers/model/configs/), with
random weights created directly on the device in bfloat16. Each batch gets random prompts of --prompt-len tokens
and greedy `generate` of exactly --decode-tokens tokens (min_new_tokens = max_new_tokens, so EOS never stops it).
Decode tok/s counts the tokens after the first, as bench_engine.py does: generate(N) minus generate(1) removes
the prefill and the first token, over batch * (N - 1) tokens.

    python benchmarks/bench_hf_gpu.py                          # eager (dynamic cache) at batch 1, 64 and 256
    python benchmarks/bench_hf_gpu.py --static                 # also a static cache, compiled, at batch 1
    python benchmarks/bench_hf_gpu.py --device cpu --tiny      # smoke run

It does not import tandem (no `gguf` needed). Each (mode, batch) runs in its own try, so an out-of-memory or an
API difference records an error and the rest still runs. Results go to a JSON file (--output).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import torch

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "workers" / "model" / "configs"
TOKEN_MARGIN = 100  # prompt tokens away from both ends of the vocabulary, as bench_engine.py
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)


def make_config(arch: str, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(**TINY)
    # from_dict reads the file as a checkpoint's config.json (rope_theta and rope_scaling included).
    return LlamaConfig.from_dict(json.loads((CONFIGS_DIR / f"{arch}.json").read_text()))


def make_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights allocated and initialized on the device: no CPU copy of an 8B model."""
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, input_ids: torch.Tensor, num_new_tokens: int, cache_implementation: str | None) -> None:
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    config = GenerationConfig(do_sample=False, max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens,
                              pad_token_id=eos, eos_token_id=eos)
    if cache_implementation is not None:
        config.cache_implementation = cache_implementation
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    if out.shape[1] != input_ids.shape[1] + num_new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - input_ids.shape[1]} tokens, expected {num_new_tokens}")


def _timed_generate(model, input_ids, num_new_tokens, cache_implementation) -> float:
    _sync(input_ids.device)
    t0 = time.perf_counter()
    _generate(model, input_ids, num_new_tokens, cache_implementation)
    _sync(input_ids.device)
    return time.perf_counter() - t0


def bench_decode(model, mode: str, batch_size: int, prompt_len: int, num_tokens: int, num_warmups: int,
                 rng: random.Random) -> dict:
    """Decode tok/s of one batch: warm-ups (a compiled mode compiles there), then generate(1) and generate(N)."""
    vocab_size = model.config.vocab_size
    prompts = [[rng.randrange(TOKEN_MARGIN, vocab_size - TOKEN_MARGIN) for _ in range(prompt_len)]
               for _ in range(batch_size)]
    input_ids = torch.tensor(prompts, device=model.device)  # [batch, prompt_len], all one length: no padding
    cache = "static" if mode == "static" else None
    t0 = time.perf_counter()
    # A compiled decode records its CUDA graphs over the first calls: two warm-ups at least.
    for _ in range(max(num_warmups, 2) if cache else num_warmups):
        _generate(model, input_ids, num_tokens, cache)
    warmup_s = time.perf_counter() - t0
    first_s = _timed_generate(model, input_ids, 1, cache)
    total_s = _timed_generate(model, input_ids, num_tokens, cache)
    decode_s = total_s - first_s
    num_decode_tokens = batch_size * (num_tokens - 1)
    return {"mode": mode, "batch_size": batch_size, "prompt_len": prompt_len, "num_tokens": num_tokens,
            "num_decode_tokens": num_decode_tokens, "warmup_s": warmup_s, "first_token_s": first_s,
            "time_s": decode_s, "tok_s": num_decode_tokens / decode_s if decode_s > 0 else None, "error": None}


def run_one(model, mode: str, batch_size: int, args: argparse.Namespace, rng: random.Random) -> dict:
    try:
        return bench_decode(model, mode, batch_size, args.prompt_len, args.decode_tokens, args.warmups, rng)
    except Exception as exc:  # an OOM or an API difference: record it and go on
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"mode": mode, "batch_size": batch_size, "prompt_len": args.prompt_len,
                "num_tokens": args.decode_tokens, "tok_s": None, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama-3-8b", help="a config in workers/model/configs/ (default: llama-3-8b)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model instead, for smoke runs")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 64, 256], help="eager batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per request, the first included")
    p.add_argument("--warmups", type=int, default=1, help="untimed generate calls per batch before timing")
    p.add_argument("--static", action="store_true",
                   help="also cache_implementation='static' at batch 1 (transformers compiles its decode on CUDA)")
    p.add_argument("--skip-eager", action="store_true", help="only the static run (with --static)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench-results/hf-<date>.json)")
    args = p.parse_args(argv)
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (decode speed counts the tokens after the first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/bench_hf_gpu.py", *argv])
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    config = make_config(args.arch, args.tiny)
    t0 = time.perf_counter()
    model = make_model(config, device, dtype)
    _sync(device)
    init_s = time.perf_counter() - t0

    runs = [] if args.skip_eager else [("eager", b) for b in args.batch_sizes]
    runs += [("static", 1)] if args.static else []
    results = []
    for mode, batch_size in runs:
        print(f"[hf] {mode} batch {batch_size}: {args.decode_tokens} tokens", file=sys.stderr)
        results.append(run_one(model, mode, batch_size, args, rng))
        r = results[-1]
        print(f"[hf] {mode} batch {batch_size}: " + (f"{r['tok_s']:,.1f} tok/s" if r["tok_s"] else r["error"] or "-"),
              file=sys.stderr)

    report = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(device),
        "model": {"arch": "tiny" if args.tiny else args.arch, "dtype": str(dtype).removeprefix("torch."),
                  "device": str(device), "num_params": sum(p.numel() for p in model.parameters()),
                  "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "vocab_size": config.vocab_size, "init_s": init_s},
        "results": results,
    }
    output = args.output or Path("bench-results") / f"hf-{datetime.now():%Y-%m-%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[hf] wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
