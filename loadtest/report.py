"""What a run leaves behind: result.json (summary keys at the top level, as `vllm bench serve` writes them, plus
the scenario and every request), summary.md, and the comparison of two results."""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from loadtest.client import LoadResult
from loadtest.metrics import summarize
from loadtest.scenario import Scenario

# (key, label, unit) in the order tables show them.
MAIN_KEYS = (
    ("completed", "completed", ""),
    ("failed", "failed", ""),
    ("duration", "duration", "s"),
    ("request_throughput", "request throughput", "req/s"),
    ("request_goodput", "request goodput", "req/s"),
    ("slo_attainment", "SLO attainment", "%"),
    ("output_throughput", "output throughput", "tok/s"),
    ("total_token_throughput", "total token throughput", "tok/s"),
    ("total_input_tokens", "input tokens", ""),
    ("total_output_tokens", "output tokens", ""),
    ("total_cached_tokens", "cached tokens", ""),
    *((f"{stat}_{name}_ms", f"{stat} {name.upper()}", "ms")
      for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p90", "p99")),
    ("max_goodput", "max goodput (sweep)", "req/s"),
    ("rate_at_max_goodput", "rate at max goodput (sweep)", "req/s"),
    ("max_rate_in_slo", "max rate in SLO (sweep)", "req/s"),
)


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def build_result(scenario: Scenario, load: LoadResult, *, target: str) -> dict:
    summary = summarize(load.records, load.duration_s, scenario.slo)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario_name": scenario.name,
        "target": target,
        "model_id": scenario.model,
        "request_rate": scenario.arrival.mean_rate,
        "burstiness": scenario.arrival.burstiness,
        "max_concurrency": scenario.arrival.concurrency,
        **summary,
        "scenario": dataclasses.asdict(scenario),
        "requests": [dataclasses.asdict(r) for r in load.records],
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_jsonable, allow_nan=False) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def fmt_value(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    if unit == "%":
        return f"{value:.1%}"
    return f"{value:.2f} {unit}".rstrip()


def markdown_summary(result: dict) -> str:
    """The run as a markdown table: the main keys, then errors by status."""
    sc = result["scenario"]
    slo = ", ".join(f"{k} <= {v:g}" for k, v in sc["slo"].items() if v is not None) or "none"
    arrival = {k: v for k, v in sc["arrival"].items() if v is not None}
    lines = [f"## tandem loadtest: {result['scenario_name']}", "",
             f"target {result['target']}, {result['date']}; arrival {arrival}; SLO {slo}; seed {sc['seed']}", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {label} | {fmt_value(result[key], unit)} |" for key, label, unit in MAIN_KEYS if key in result]
    if result.get("errors"):
        lines += ["", "| status | requests |", "|---|---:|"]
        lines += [f"| {code} | {n} |" for code, n in result["errors"].items()]
    return "\n".join(lines) + "\n"


def markdown_compare(a: dict, b: dict, name_a: str = "a", name_b: str = "b") -> str:
    """The main keys of two results side by side, with b - a absolute and in percent of a."""
    lines = [f"| metric | {name_a} | {name_b} | delta | delta % |", "|---|---:|---:|---:|---:|"]
    for key, label, unit in MAIN_KEYS:
        if key not in a and key not in b:
            continue
        va, vb = a.get(key), b.get(key)
        delta = pct = "-"
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            delta = f"{vb - va:+.2f}" if isinstance(vb - va, float) else f"{vb - va:+d}"
            pct = f"{(vb - va) / abs(va):+.1%}" if va else "-"
        name = f"{label} ({unit})" if unit else label
        lines.append(f"| {name} | {fmt_value(va, unit)} | {fmt_value(vb, unit)} | {delta} | {pct} |")
    return "\n".join(lines) + "\n"


def load_result(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare: cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--compare: {str(path)!r} is not a loadtest result (a JSON object)")
    return data
