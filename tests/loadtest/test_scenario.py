"""Scenario YAML: the shipped scenarios load and fit the model, bad fields get messages that name them."""
from __future__ import annotations

import pytest

from loadtest.scenario import Scenario, load_scenario, scenario_from_dict, scenario_names

# The context the cluster's workers are sized for by default with the default model.
MAX_MODEL_LEN = 2048

BASE = {"arrival": {"process": "poisson", "rate": 1.0}, "duration_s": 10, "prompt_len": 64, "output_len": 32}


def test_every_shipped_scenario_loads_and_fits_the_context():
    names = scenario_names()
    assert {"chat", "rag", "long-context", "burst", "ramp", "mixed"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name
        assert scenario.max_total_len < MAX_MODEL_LEN, name
        assert scenario.slo.ttft_ms and scenario.slo.tpot_ms, f"{name} has no SLOs: goodput would mean nothing"


def test_shipped_scenarios_have_their_shape():
    assert load_scenario("rag").shared_prefix.prefix_len.min >= 1024
    assert load_scenario("burst").arrival.burstiness < 1
    ramp = load_scenario("ramp").arrival
    assert ramp.process == "ramp" and ramp.end_rate > ramp.start_rate
    mixed = load_scenario("mixed")
    kinds = {c.name: c for c in mixed.requests}
    assert kinds["long-prompt"].prompt_len.min >= 1000 and kinds["decode-heavy"].output_len.min >= 128


@pytest.mark.parametrize("change, message", [
    ({"arrival": {"process": "zipf", "rate": 1}},
     "arrival.process: must be one of poisson, gamma, constant, ramp, concurrency, got 'zipf'"),
    ({"arrival": {"process": "poisson"}}, "arrival.rate: required for process 'poisson'"),
    ({"arrival": {"process": "gamma", "rate": 1, "burstiness": -1}}, "arrival.burstiness: must be > 0"),
    ({"arrival": {"process": "poisson", "rate": "fast"}}, "arrival.rate: must be a number, got 'fast'"),
    ({"arrival": {"process": "poisson", "rat": 1}}, "arrival.rat: unknown field; allowed: process, rate"),
    ({"arrival": {"process": "concurrency", "concurrency": 0}}, "arrival.concurrency: must be >= 1"),
    ({"prompt_len": {"dist": "uniform", "min": 100, "max": 10}}, "requests[0].prompt_len.min: must be <= max (10)"),
    ({"output_len": {"dist": "lognormal"}}, "requests[0].output_len.dist: must be one of fixed, uniform, normal, choice"),
    ({"output_len": {"dist": "choice", "values": [8, 16], "weights": [1]}}, "requests[0].output_len.weights: must be 2"),
    ({"slo": {"ttft_ms": 0}}, "slo.ttft_ms: must be > 0 ms"),
    ({"duration_s": None}, "duration_s, num_requests: give at least one"),
    ({"sed": 3}, "sed: unknown field"),
])
def test_bad_fields_are_named_with_allowed_values(change, message):
    with pytest.raises(ValueError) as e:
        scenario_from_dict({**BASE, **change})
    assert message in str(e.value)


def test_overrides_replace_what_the_cli_sets():
    chat = load_scenario("chat")
    s = chat.with_overrides(duration_s=5, rate=7, seed=3)
    assert (s.duration_s, s.num_requests, s.arrival.process, s.arrival.rate, s.seed) == (5, None, "poisson", 7, 3)
    s = chat.with_overrides(num_requests=20, concurrency=4)
    assert (s.duration_s, s.num_requests, s.arrival.process, s.arrival.concurrency) == (None, 20, "concurrency", 4)
    assert load_scenario("burst").with_overrides(rate=2).arrival.burstiness == 0.25
    with pytest.raises(ValueError, match="--rate: a ramp scenario"):
        load_scenario("ramp").with_overrides(rate=2)


def test_unknown_scenario_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="neither a shipped scenario .*chat"):
        load_scenario("nope")


def test_a_yaml_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("arrival: {process: constant, rate: 2}\nnum_requests: 5\nprompt_len: 16\noutput_len: 8\n")
    scenario = load_scenario(path)
    assert isinstance(scenario, Scenario) and scenario.name == "mine" and scenario.num_requests == 5
