"""`python -m workers "prompt"`: generate with the default model (or --model) and print the text."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Write a haiku about GPUs.")
    parser.add_argument("--model", default=None, help="HF folder, .gguf file, or dummy arch (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO shows the KV cache capacity)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from workers import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, tensor_parallel_size=args.tensor_parallel_size)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.raw:
        out = llm.generate([args.prompt], params)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    t2 = time.perf_counter()
    print(out.text)
    print(
        f"\n[{len(out.token_ids)} tokens in {t2 - t1:.2f} s ({len(out.token_ids) / (t2 - t1):.1f} tok/s), "
        f"finish_reason={out.finish_reason}, model loaded in {t1 - t0:.1f} s]",
        file=sys.stderr,
    )
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
