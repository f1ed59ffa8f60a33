"""Find the most goodput a cluster gives: raise the open-loop rate step by step until goodput falls.

A step's goodput is the rate of requests meeting every SLO. The sweep stops at the first step whose SLO
attainment is below `min_attainment` (DistServe's 90%) or whose goodput is more than `drop_margin` below the
best so far; the headline is the best goodput and the rate it was reached at.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loadtest.plots import plot_goodput_vs_rate
from loadtest.report import fmt_value, write_json
from loadtest.runner import run_scenario
from loadtest.scenario import Arrival, Scenario

# What each step keeps in sweep.json besides its rate (its own result.json holds the rest).
STEP_KEYS = ("completed", "failed", "errors", "duration", "request_throughput", "request_goodput",
             "slo_attainment", "output_throughput", "p99_ttft_ms", "p99_tpot_ms", "p99_itl_ms", "p99_e2el_ms")


@dataclass(frozen=True)
class SweepConfig:
    start_rate: float = 0.5  # req/s
    factor: float = 1.5  # each step's rate is the previous one's times this
    max_rate: float = 16.0  # no step above this
    step_duration_s: float = 30.0
    min_attainment: float = 0.9
    drop_margin: float = 0.1  # stop when goodput < best * (1 - drop_margin)

    def __post_init__(self):
        if not self.start_rate > 0:
            raise ValueError(f"start_rate: must be > 0 req/s, got {self.start_rate!r}")
        if not self.factor > 1:
            raise ValueError(f"factor: must be > 1, got {self.factor!r}")
        if not self.max_rate >= self.start_rate:
            raise ValueError(f"max_rate: must be >= start_rate ({self.start_rate:g}), got {self.max_rate!r}")
        if not self.step_duration_s > 0:
            raise ValueError(f"step_duration_s: must be > 0, got {self.step_duration_s!r}")
        if not 0 <= self.min_attainment <= 1:
            raise ValueError(f"min_attainment: must be in [0, 1], got {self.min_attainment!r}")
        if not 0 <= self.drop_margin < 1:
            raise ValueError(f"drop_margin: must be in [0, 1), got {self.drop_margin!r}")

    @property
    def rates(self) -> list[float]:
        rates = [self.start_rate]
        while rates[-1] * self.factor <= self.max_rate * (1 + 1e-9):
            rates.append(rates[-1] * self.factor)
        return rates


def step_scenario(scenario: Scenario, rate: float, duration_s: float, step: int) -> Scenario:
    """The scenario at one open-loop rate: gamma keeps its burstiness, any other process becomes Poisson. Each
    step gets its own seed, so that no step's prompts hit the prefix cache left by the one before."""
    gamma = scenario.arrival.process == "gamma"
    arrival = Arrival(process="gamma" if gamma else "poisson", rate=rate,
                      burstiness=scenario.arrival.burstiness if gamma else 1.0)
    return dataclasses.replace(scenario, arrival=arrival, duration_s=duration_s, num_requests=None,
                               seed=scenario.seed + step)


def run_sweep(scenario: Scenario, tokenizer, *, target: str, output_dir: Path, config: SweepConfig,
              progress=None, tls=None) -> dict:
    """Run steps of rising rate; write each step's run under output_dir/rate-R/ and sweep.json, summary.md and
    goodput_vs_rate.png in output_dir. Returns the sweep result."""
    steps: list[dict] = []
    stop_reason = f"reached max_rate {config.max_rate:g} req/s"
    for k, rate in enumerate(config.rates):
        if progress is not None:
            progress.label = f"{scenario.name} @ {rate:.3g} req/s"
        result = run_scenario(step_scenario(scenario, rate, config.step_duration_s, k), tokenizer, target=target,
                              output_dir=output_dir / f"rate-{rate:.3g}", progress=progress, tls=tls)
        steps.append({"rate": rate, **{key: result[key] for key in STEP_KEYS}})
        best = max(s["request_goodput"] for s in steps)
        attainment = result["slo_attainment"] or 0.0
        if attainment < config.min_attainment:
            stop_reason = f"SLO attainment {attainment:.0%} < {config.min_attainment:.0%} at {rate:.3g} req/s"
            break
        if result["request_goodput"] < best * (1 - config.drop_margin):
            stop_reason = (f"goodput {result['request_goodput']:.3g} req/s fell more than "
                           f"{config.drop_margin:.0%} below the best ({best:.3g}) at {rate:.3g} req/s")
            break
    best_step = max(steps, key=lambda s: s["request_goodput"])
    in_slo = [s["rate"] for s in steps if (s["slo_attainment"] or 0.0) >= config.min_attainment]
    sweep = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scenario_name": scenario.name,
        "target": target,
        "max_goodput": best_step["request_goodput"],
        "rate_at_max_goodput": best_step["rate"],
        # DistServe's goodput: the highest rate served with at least min_attainment of requests in SLO.
        "max_rate_in_slo": max(in_slo) if in_slo else None,
        "stop_reason": stop_reason,
        "sweep": dataclasses.asdict(config),
        "steps": steps,
        "scenario": dataclasses.asdict(scenario),
    }
    write_json(output_dir / "sweep.json", sweep)
    (output_dir / "summary.md").write_text(markdown_sweep(sweep))
    plot_goodput_vs_rate(steps, output_dir / "goodput_vs_rate.png")
    return sweep


def markdown_sweep(sweep: dict) -> str:
    slo = ", ".join(f"{k} <= {v:g}" for k, v in sweep["scenario"]["slo"].items() if v is not None) or "none"
    lines = [f"## tandem loadtest sweep: {sweep['scenario_name']}", "",
             f"**max goodput {sweep['max_goodput']:.3g} req/s at {sweep['rate_at_max_goodput']:.3g} req/s** "
             f"(SLO {slo}; target {sweep['target']}, {sweep['date']}); stopped: {sweep['stop_reason']}", "",
             f"highest rate with >= {sweep['sweep']['min_attainment']:.0%} of requests in SLO: "
             f"{fmt_value(sweep['max_rate_in_slo'], 'req/s')}", "",
             "| rate (req/s) | throughput (req/s) | goodput (req/s) | SLO attainment | p99 TTFT (ms) | p99 TPOT (ms) "
             "| failed |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sweep["steps"]:
        cells = (f"{s['rate']:.3g}", fmt_value(s["request_throughput"]), fmt_value(s["request_goodput"]),
                 fmt_value(s["slo_attainment"], "%"), fmt_value(s["p99_ttft_ms"]), fmt_value(s["p99_tpot_ms"]),
                 str(s["failed"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
