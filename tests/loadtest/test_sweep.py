"""A sweep against a fake server that slows down with load finds its maximum goodput at a finite rate."""
from __future__ import annotations

import json

import pytest

from loadtest.scenario import scenario_from_dict
from loadtest.sweep import SweepConfig, run_sweep


def test_sweep_stops_where_goodput_falls_and_reports_the_best_rate(tokenizer, fake_server, tmp_path):
    # Every token takes 2 ms plus 4 ms per request in flight: past ~30 req/s the queue feeds on itself.
    server = fake_server(ttft_s=0.01, token_delay_s=0.002, delay_per_inflight_s=0.004)
    # Nearly regular arrivals (gamma, burstiness 16) keep short steps from being decided by Poisson luck.
    scenario = scenario_from_dict({"name": "fake", "arrival": {"process": "gamma", "rate": 1.0, "burstiness": 16},
                                   "duration_s": 60, "prompt_len": 16, "output_len": 8,
                                   "slo": {"ttft_ms": 500, "tpot_ms": 20}})
    config = SweepConfig(start_rate=4, factor=2, max_rate=512, step_duration_s=1.5)
    sweep = run_sweep(scenario, tokenizer, target=server.address, output_dir=tmp_path, config=config)

    rates = [s["rate"] for s in sweep["steps"]]
    assert rates[:2] == [4, 8] and rates[-1] < 512, "the sweep should stop before max_rate"
    assert "SLO attainment" in sweep["stop_reason"] or "fell" in sweep["stop_reason"]
    assert sweep["max_goodput"] == max(s["request_goodput"] for s in sweep["steps"]) > 2
    assert sweep["rate_at_max_goodput"] in rates and sweep["rate_at_max_goodput"] < rates[-1]
    last = sweep["steps"][-1]
    assert last["slo_attainment"] < 0.9 or last["request_goodput"] < 0.9 * sweep["max_goodput"]
    # The highest rate that still kept 90% of requests in SLO comes before the step that stopped the sweep.
    assert sweep["max_rate_in_slo"] is not None and sweep["max_rate_in_slo"] < rates[-1]
    # Each step ran with its own seed (no prefix-cache reuse between steps) and left its own result.
    seeds = {json.loads((tmp_path / f"rate-{r:.3g}" / "result.json").read_text())["scenario"]["seed"] for r in rates}
    assert len(seeds) == len(rates)
    assert json.loads((tmp_path / "rate-8" / "result.json").read_text())["burstiness"] == 16
    assert json.loads((tmp_path / "sweep.json").read_text())["rate_at_max_goodput"] == sweep["rate_at_max_goodput"]
    assert (tmp_path / "goodput_vs_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert "**max goodput" in (tmp_path / "summary.md").read_text()


def test_sweep_config_names_bad_values():
    with pytest.raises(ValueError, match="factor: must be > 1"):
        SweepConfig(factor=1.0)
    assert SweepConfig(start_rate=1, factor=2, max_rate=10).rates == [1, 2, 4, 8]
