"""`tandem loadtest`: run a scenario against a cluster, sweep its rate, or compare two results.

    tandem loadtest SCENARIO [--rate R | --concurrency N] [--duration S | --num-requests N] ...
    tandem loadtest sweep SCENARIO [--start-rate R] [--factor F] [--max-rate R] [--duration S per step]
    tandem loadtest --compare A.json B.json

SCENARIO is a shipped scenario's name (chat, rag, long-context, burst, ramp, mixed) or a YAML file.
`add_parser(subparsers)` hooks this into another argparse CLI; `python -m loadtest ...` runs it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tandem.tls import add_client_arguments, client_from_args

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_OUTPUT_ROOT = Path("bench-results") / "loadtest"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `loadtest` command to an argparse subparsers object; dispatch it to `run(args)`."""
    p = subparsers.add_parser("loadtest", help="drive a running cluster with a load-test scenario",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="*", metavar="[sweep] SCENARIO",
                   help="a scenario name or YAML file; 'sweep SCENARIO' raises its rate until goodput falls")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the deltas between two result.json files")
    p.add_argument("--target", default=DEFAULT_TARGET, help="router host:port (default %(default)s)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help=f"where results go (default {DEFAULT_OUTPUT_ROOT}/<scenario>-<UTC timestamp>/)")
    p.add_argument("--tokenizer", default=None,
                   help="a .gguf file or a Hugging Face tokenizer folder (default: the default model's)")
    p.add_argument("--model", default=None, help="the model name sent with each request (default: the scenario's)")
    p.add_argument("--duration", type=float, default=None, help="seconds to send for (a sweep: per step)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="open-loop req/s (Poisson unless the scenario is gamma)")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop: requests kept in flight")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    add_client_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stdout is not a TTY)")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--start-rate", type=float, default=0.5)
    sweep.add_argument("--factor", type=float, default=1.5)
    sweep.add_argument("--max-rate", type=float, default=16.0)
    sweep.add_argument("--min-attainment", type=float, default=0.9,
                       help="stop when fewer requests meet the SLOs (default %(default)s)")
    sweep.add_argument("--drop-margin", type=float, default=0.1,
                       help="stop when goodput falls this fraction below the best (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            return _compare(args)
        words = list(args.words)
        is_sweep = bool(words) and words[0] == "sweep"
        if is_sweep:
            words = words[1:]
        if len(words) != 1:
            from loadtest.scenario import scenario_names

            raise ValueError(f"give one scenario ({', '.join(scenario_names())} or a YAML file), "
                             f"'sweep SCENARIO', or --compare A B; got {' '.join(args.words) or 'none'}")
        return _sweep(args, words[0]) if is_sweep else _run(args, words[0])
    except (ValueError, ConnectionError) as e:
        print(f"tandem loadtest: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


def _scenario(args, name: str, *, sweep: bool):
    from loadtest.scenario import load_scenario

    scenario = load_scenario(name)
    overrides = dict(seed=args.seed, model=args.model)
    if not sweep:
        overrides.update(duration_s=args.duration, num_requests=args.num_requests, rate=args.rate,
                         concurrency=args.concurrency)
    scenario = scenario.with_overrides(**overrides)
    if args.timeout is not None:
        scenario = dataclasses.replace(scenario, timeout_s=args.timeout)
    return scenario


def _output_dir(args, label: str) -> Path:
    from loadtest.report import utc_stamp

    return args.output_dir or DEFAULT_OUTPUT_ROOT / f"{label}-{utc_stamp()}"


def _load_tokenizer(args):
    from loadtest.prompts import load_tokenizer

    print(f"tandem loadtest: loading the tokenizer ({args.tokenizer or 'the default model'})", file=sys.stderr)
    return load_tokenizer(args.tokenizer)


def _progress(args, label: str):
    from loadtest.progress import RunProgress

    return RunProgress(enabled=not args.no_progress and sys.stdout.isatty(), label=label)


def _run(args, name: str) -> int:
    from loadtest.report import markdown_summary
    from loadtest.runner import run_scenario

    scenario = _scenario(args, name, sweep=False)
    out = _output_dir(args, scenario.name)
    tokenizer = _load_tokenizer(args)
    try:
        with _progress(args, scenario.name) as progress:
            result = run_scenario(scenario, tokenizer, target=args.target, output_dir=out, progress=progress,
                                  tls=client_from_args(args))
    except KeyboardInterrupt:
        print(f"tandem loadtest: interrupted; the requests that ended are in {out}/", file=sys.stderr)
        return 130
    print(markdown_summary(result))
    print(f"tandem loadtest: wrote {out}/ (result.json, summary.md, latency_cdf.png, timeline.png)", file=sys.stderr)
    return 0 if result["completed"] else 1


def _sweep(args, name: str) -> int:
    from loadtest.sweep import SweepConfig, markdown_sweep, run_sweep

    if args.rate is not None or args.concurrency is not None or args.num_requests is not None:
        raise ValueError("--rate, --concurrency, --num-requests: a sweep sets the rate itself; use --start-rate, "
                         "--factor, --max-rate and --duration (per step)")
    scenario = _scenario(args, name, sweep=True)
    config = SweepConfig(start_rate=args.start_rate, factor=args.factor, max_rate=args.max_rate,
                         step_duration_s=args.duration or 30.0, min_attainment=args.min_attainment,
                         drop_margin=args.drop_margin)
    out = _output_dir(args, f"{scenario.name}-sweep")
    tokenizer = _load_tokenizer(args)
    try:
        with _progress(args, scenario.name) as progress:
            sweep = run_sweep(scenario, tokenizer, target=args.target, output_dir=out, config=config,
                              progress=progress, tls=client_from_args(args))
    except KeyboardInterrupt:
        print(f"tandem loadtest: interrupted; the steps run so far are in {out}/rate-*/", file=sys.stderr)
        return 130
    print(markdown_sweep(sweep))
    print(f"tandem loadtest: wrote {out}/ (sweep.json, summary.md, goodput_vs_rate.png, rate-*/)", file=sys.stderr)
    return 0


def _compare(args) -> int:
    from loadtest.report import load_result, markdown_compare

    a, b = (load_result(p) for p in args.compare)
    print(markdown_compare(a, b, Path(args.compare[0]).parent.name or "a", Path(args.compare[1]).parent.name or "b"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))
