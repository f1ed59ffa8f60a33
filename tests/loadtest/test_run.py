"""Runs against a fake Generation server whose timing and failures are scripted: the numbers in result.json
must be the ones the server scripted."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from loadtest.cli import main
from loadtest.client import LoadDriver, RequestRecord
from loadtest.metrics import summarize
from loadtest.prompts import RequestFactory
from loadtest.runner import drive
from loadtest.scenario import SLO, scenario_from_dict

VLLM_KEYS = ["completed", "failed", "request_throughput", "request_goodput", "output_throughput",
             "total_token_throughput", "total_input_tokens", "total_output_tokens", "duration"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p50", "p90", "p95", "p99")]


def _write_scenario(tmp_path, **fields) -> str:
    data = {"name": "fake", "arrival": {"process": "constant", "rate": 10.0}, "num_requests": 10,
            "prompt_len": 48, "output_len": 10, "slo": {"ttft_ms": 1000, "tpot_ms": 200}, **fields}
    path = tmp_path / "fake.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def test_a_run_writes_vllm_keys_summary_and_plots_with_the_scripted_numbers(tmp_path, fake_server, capsys):
    server = fake_server(ttft_s=0.08, token_delay_s=0.02, cached_tokens=5,
                         fail=lambda n: grpc.StatusCode.RESOURCE_EXHAUSTED if n % 4 == 3 else None)
    out = tmp_path / "run"
    rc = main([_write_scenario(tmp_path), "--target", server.address, "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert set(VLLM_KEYS) <= result.keys()
    assert (result["completed"], result["failed"], result["errors"]) == (8, 2, {"RESOURCE_EXHAUSTED": 2})
    assert (result["total_input_tokens"], result["total_output_tokens"], result["total_cached_tokens"]) == (384, 80, 40)
    # Scripted: first token after 80 ms, then one token every 20 ms; generous bounds for a loaded 2-core box.
    assert 75 <= result["median_ttft_ms"] <= 250
    assert 18 <= result["median_tpot_ms"] <= 60 and 18 <= result["median_itl_ms"] <= 60
    assert 250 <= result["median_e2el_ms"] <= 700
    assert result["p99_ttft_ms"] >= result["p50_ttft_ms"] == pytest.approx(result["median_ttft_ms"])
    # Every request is in the JSON, failures included, with what the server said.
    requests = result["requests"]
    assert len(requests) == 10 and [r["status"] for r in requests].count("RESOURCE_EXHAUSTED") == 2
    assert all(r["finish_reason"] == "length" and len(r["itl_ms"]) == 9 for r in requests if r["status"] == "OK")
    assert result["scenario"]["arrival"]["rate"] == 10.0
    # Goodput: the 8 successes meet the SLOs, over the same duration as the throughput.
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["slo_attainment"] == pytest.approx(0.8)
    summary = (out / "summary.md").read_text()
    assert "| completed | 8 |" in summary and "| RESOURCE_EXHAUSTED | 2 |" in summary
    assert summary in capsys.readouterr().out
    for png in ("latency_cdf.png", "timeline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_token_chunks_count_as_vllm_counts_them(tokenizer, fake_server):
    server = fake_server(ttft_s=0.02, token_delay_s=0.01, tokens_per_chunk=4)
    scenario = scenario_from_dict({"arrival": {"process": "constant", "rate": 20.0}, "num_requests": 4,
                                   "prompt_len": 16, "output_len": 10})
    load = asyncio.run(drive(scenario, tokenizer, target=server.address))
    for r in load.records:
        # 10 tokens in chunks of 4, 4, 2: one ITL per gap between chunks, TPOT per token.
        assert r.output_tokens == 10 and r.chunk_tokens == (4, 4, 2) and len(r.itl_ms) == 2
        assert r.itl_ms[0] > 2 * r.tpot_ms


def test_closed_loop_keeps_concurrency_requests_in_flight(tokenizer, fake_server):
    server = fake_server(ttft_s=0.05, token_delay_s=0.005)
    scenario = scenario_from_dict({"arrival": {"process": "concurrency", "concurrency": 3}, "num_requests": 9,
                                   "prompt_len": 16, "output_len": 8})
    load = asyncio.run(drive(scenario, tokenizer, target=server.address))
    assert [r.index for r in load.records] == list(range(9)) and all(r.ok for r in load.records)
    assert server.max_in_flight == 3
    assert all(r.scheduled_s is None for r in load.records)


def test_a_request_past_its_deadline_is_recorded_not_lost(tokenizer, fake_server):
    server = fake_server(ttft_s=10.0)
    scenario = scenario_from_dict({"arrival": {"process": "constant", "rate": 10.0}, "num_requests": 2,
                                   "prompt_len": 16, "output_len": 4, "timeout_s": 0.3})
    load = asyncio.run(drive(scenario, tokenizer, target=server.address))
    assert [r.status for r in load.records] == ["DEADLINE_EXCEEDED"] * 2
    summary = summarize(load.records, load.duration_s, scenario.slo)
    assert (summary["completed"], summary["failed"], summary["errors"]) == (0, 2, {"DEADLINE_EXCEEDED": 2})
    assert summary["mean_ttft_ms"] is None


def test_an_unreachable_target_is_a_clear_error(tokenizer):
    scenario = scenario_from_dict({"arrival": {"process": "constant", "rate": 1.0}, "num_requests": 1,
                                   "prompt_len": 16, "output_len": 4})
    factory = RequestFactory(scenario, tokenizer)
    driver = LoadDriver("127.0.0.1:9", model=None, timeout_s=1.0)
    with pytest.raises(ConnectionError, match="no gRPC server answered at 127.0.0.1:9"):
        asyncio.run(driver.run_open_loop([factory.make(0, 0.0)], connect_timeout_s=0.5))


def _record(index: int, *, ttft_ms: float, e2el_ms: float, output_tokens: int, status: str = "OK") -> RequestRecord:
    return RequestRecord(index=index, kind="default", group=None, scheduled_s=None, send_s=float(index),
                         status=status, error="", prompt_tokens=100, max_tokens=output_tokens,
                         output_tokens=output_tokens, cached_tokens=0, finish_reason="length" if status == "OK" else "",
                         ttft_ms=ttft_ms, e2el_ms=e2el_ms, itl_ms=(), chunk_tokens=())


def test_goodput_counts_requests_meeting_every_slo():
    records = [
        _record(0, ttft_ms=100, e2el_ms=1090, output_tokens=100),  # TPOT 10: good
        _record(1, ttft_ms=600, e2el_ms=1000, output_tokens=100),  # TTFT over 500
        _record(2, ttft_ms=100, e2el_ms=3070, output_tokens=100),  # TPOT 30 over 20
        _record(3, ttft_ms=100, e2el_ms=100, output_tokens=1),  # one token: no TPOT, good
        _record(4, ttft_ms=100, e2el_ms=1000, output_tokens=100, status="UNAVAILABLE"),  # failed
    ]
    summary = summarize(records, duration_s=10.0, slo=SLO(ttft_ms=500, tpot_ms=20))
    assert summary["request_goodput"] == pytest.approx(0.2)  # 2 good in 10 s
    assert summary["request_throughput"] == pytest.approx(0.4)
    assert summary["slo_attainment"] == pytest.approx(0.4)
    assert summary["errors"] == {"UNAVAILABLE": 1}
    assert summary["mean_tpot_ms"] == pytest.approx((10 + 400 / 99 + 30) / 3)
    assert summarize(records, 10.0, SLO())["request_goodput"] == pytest.approx(0.4)  # no SLO: every success


def test_compare_prints_absolute_and_relative_deltas(tmp_path, capsys):
    base = {"completed": 10, "failed": 0, "request_goodput": 2.0, "p99_ttft_ms": 100.0, "p99_tpot_ms": 50.0}
    for name, changes in (("colocated", {}), ("disagg", {"p99_tpot_ms": 40.0, "request_goodput": 3.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps({**base, **changes}))
    rc = main(["--compare", str(tmp_path / "colocated/result.json"), str(tmp_path / "disagg/result.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| metric | colocated | disagg | delta | delta % |" in out
    assert "| p99 TPOT (ms) | 50.00 ms | 40.00 ms | -10.00 | -20.0% |" in out
    assert "| request goodput (req/s) | 2.00 req/s | 3.00 req/s | +1.00 | +50.0% |" in out
    assert "| completed | 10 | 10 | +0 | +0.0% |" in out


def test_cli_errors_name_the_problem(capsys, tmp_path):
    assert main(["no-such-scenario"]) == 2
    assert "neither a shipped scenario" in capsys.readouterr().err
    assert main(["chat", "--rate", "1", "--concurrency", "2"]) == 2
    assert "--rate, --concurrency: give one" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_ctrl_c_keeps_the_requests_that_ended(tmp_path, fake_server):
    """Nothing is lost: an interrupted run still writes result.json (marked interrupted) with what finished."""
    import signal
    import subprocess
    import sys
    import time

    server = fake_server(ttft_s=0.02, token_delay_s=0.01)
    out = tmp_path / "run"
    # 2 req/s for 60 s; interrupted once a few requests have ended.
    scenario = _write_scenario(tmp_path, arrival={"process": "constant", "rate": 2.0}, num_requests=120)
    proc = subprocess.Popen([sys.executable, "-m", "loadtest", scenario, "--target", server.address,
                             "--output-dir", str(out), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(server.requests) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert len(server.requests) >= 4, proc.stderr.read() if proc.poll() is not None else "no requests arrived"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    result = json.loads((out / "result.json").read_text())
    assert result["interrupted"] is True
    assert 3 <= result["completed"] < 120 and result["failed"] == 0
    assert len(result["requests"]) == result["completed"]
    assert (out / "summary.md").exists() and (out / "latency_cdf.png").exists()
