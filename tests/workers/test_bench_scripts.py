"""The prepared GPU check (benchmarks/gpu_check.sh and the scripts it runs) in its CPU smoke mode: it runs only
when a GPU is lent, for minutes, so it must work the first time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_pd_gpu import first_mismatch, summarize_ttft
from benchmarks.profile_decode import summarize_trace, union_us

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# engine and profile are the same scripts as engine-eager and profile-eager without --enforce-eager: left out to
# keep this test short.
SMOKE_PARTS = ("env", "gpu-tests", "engine-eager", "profile-eager", "attention", "hf")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_gpu_busy_time_counts_overlapping_kernels_once():
    assert union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert union_us([]) == 0


def test_trace_summary_counts_kernels_launches_and_busy_time_per_step():
    kernel = {"ph": "X", "cat": "kernel", "name": "gemm"}
    trace = {"traceEvents": [
        {**kernel, "ts": 0, "dur": 100}, {**kernel, "ts": 50, "dur": 100}, {**kernel, "ts": 400, "dur": 100},
        {**kernel, "ts": 1000, "dur": 200},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 990, "dur": 5},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 995, "dur": 5},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 1300, "dur": 5},
    ]}
    got = summarize_trace(trace, num_steps=2)
    assert got["gpu_busy_ms_per_step"] == pytest.approx((150 + 100 + 200) / 1e3 / 2)
    assert got["kernels_per_step"] == 2
    assert got["host_launches_per_step"] == 1.5  # one graph replay and two eager launches over two steps
    assert got["top_kernels"][0]["count"] == 4


def test_a_cpu_trace_has_null_gpu_fields():
    got = summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9}]}, 2)
    assert got["gpu_busy_ms_per_step"] is None and got["host_launches_per_step"] is None



def test_pd_bench_finds_the_first_differing_token():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2], [1, 2, 3]) == 2


def test_pd_bench_counts_what_the_hand_off_adds_until_the_second_token():
    col = [{"token_ms": [100.0, 110.0, 120.0, 130.0], "worker_prefill_ms": 95.0}]
    dis = [{"token_ms": [101.0, 114.0, 124.0, 134.0], "prefill_call_ms": 101.0, "prefill_worker_ms": 96.0,
            "decode_first_msg_ms": 13.0, "kv_transfer_ms": 0.5, "kv_transfer_bytes": 256 << 20}]
    t = summarize_ttft(col, dis, 2048, 0.05)
    assert t["ttft_colocated_ms"] == 100.0 and t["ttft_disagg_ms"] == 101.0
    assert t["handoff_ms"] == pytest.approx(4.0) and t["handoff_frac_of_ttft"] == pytest.approx(0.04)
    assert t["itl_colocated_ms"] == t["itl_disagg_ms"] == pytest.approx(10.0)
    assert t["kv_transfer_gb_s"] == pytest.approx((256 << 20) / 0.5e-3 / 1e9)
    assert t["kv_transfer_mib"] == 256 and t["kv_transfer_frac_of_ttft"] == pytest.approx(0.005)


@pytest.fixture(scope="module")
def smoke_out(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_MODEL": str(tiny_checkpoint("llama")),
           "PYTHON": sys.executable, "GPU_CHECK_PARTS": ",".join(SMOKE_PARTS)}
    subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=env, check=True, timeout=240)
    return out


def test_smoke_run_completes_every_part_and_summarizes(smoke_out):
    summary = json.loads((smoke_out / "summary.json").read_text())
    parts = summary["parts"]
    assert set(parts) >= set(SMOKE_PARTS)
    assert {name: p["rc"] for name, p in parts.items() if p["rc"] not in (0, "skipped")} == {}
    assert parts["engine-eager"]["rc"] == 0 and parts["hf"]["rc"] == 0
    assert parts["gpu-tests"]["tests"]["failures"] == 0
    env = parts["env"]["result"]
    assert env["torch"] and "cuda_available" in env


def test_smoke_engine_bench_records_the_engine_options(smoke_out):
    engine = json.loads((smoke_out / "engine-eager.json").read_text())
    assert engine["engine_options"]["enforce_eager"] is True
    assert [d["batch_size"] for d in engine["decode"]] == [1, 2]


def test_smoke_profile_writes_per_step_numbers(smoke_out):
    profile = json.loads((smoke_out / "profile-eager.json").read_text())
    assert profile["config"]["enforce_eager"] is True and profile["config"]["attention_backend"]
    for r in profile["results"]:
        assert r["decode_only"] and r["wall_ms_per_step"] > 0
        assert r["gpu_busy_ms_per_step"] is None and r["host_launches_per_step"] is None  # CPU: no GPU
        assert 0 < len(r["top_cpu_ops"]) <= 15 and r["top_cpu_ops"][0]["self_cpu_ms"] > 0


def test_smoke_hf_bench_measures_eager_and_static(smoke_out):
    hf = json.loads((smoke_out / "hf.json").read_text())
    runs = {(r["mode"], r["batch_size"]): r for r in hf["results"]}
    assert set(runs) == {("eager", 1), ("eager", 2), ("static", 1)}
    assert all(r["error"] is None and r["tok_s"] > 0 for r in runs.values())


def test_the_kv_cuda_ipc_part_runs_only_where_torch_sees_a_gpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_MODEL": "unused", "PYTHON": sys.executable,
           "GPU_CHECK_PARTS": "kv-cuda-ipc"}
    subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=REPO, env=env, check=True, timeout=120,
                   capture_output=True)
    part = json.loads((tmp_path / "summary.json").read_text())["parts"]["kv-cuda-ipc"]
    if torch.cuda.is_available():  # a smoke run on a GPU: one 4 MiB transfer
        assert part["rc"] == 0, part["log_tail"]
        assert [row["transport"] for row in part["result"]["rows"]] == ["cuda_ipc"]
    else:
        assert part["rc"] == "skipped" and "no CUDA device" in part["log_tail"][0]


def test_the_pd_part_hands_kv_between_two_worker_processes_and_matches_colocated(tmp_path):
    """pd-cuda-ipc in a smoke run: bench_pd_gpu.py with a toy model, a prefill and a decode WorkerServer in two
    processes (on CPU over shm; on a GPU over cuda_ipc)."""
    env = {**os.environ, "GPU_CHECK_SMOKE": "1", "GPU_CHECK_MODEL": "unused", "PYTHON": sys.executable,
           "GPU_CHECK_PARTS": "pd-cuda-ipc"}
    subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=REPO, env=env, check=True, timeout=120,
                   capture_output=True)
    part = json.loads((tmp_path / "summary.json").read_text())["parts"]["pd-cuda-ipc"]
    assert part["rc"] == 0, part["log_tail"]
    result = part["result"]
    assert result["kv_transport"] == ("cuda_ipc" if torch.cuda.is_available() else "shm")
    assert result["errors"] == [] and result["equal"] is True and result["checks"]["equal"] is True
    eq = result["equality"]
    assert eq["num_prompts"] == 3 and eq["first_mismatch"] is None and max(eq["prompt_lens"]) == 200
    assert all(r["equal"] and r["num_tokens"] == 8 and r["kv_bytes"] > 0 for r in eq["rows"])
    ttft = result["ttft"]
    assert ttft["prompt_len"] == 256 and ttft["repeats"] == 2
    for key in ("ttft_colocated_ms", "ttft_disagg_ms", "t2_colocated_ms", "t2_disagg_ms", "kv_transfer_ms",
                "kv_transfer_gb_s"):
        assert ttft[key] > 0, key
    assert ttft["handoff_ms"] == pytest.approx(ttft["t2_disagg_ms"] - ttft["t2_colocated_ms"])
    assert ttft["handoff_frac_of_ttft"] == pytest.approx(ttft["handoff_ms"] / ttft["ttft_colocated_ms"])
    # The toy's KV: 2 layers x K and V x 2 heads x 16 dims x 4 bytes per token.
    assert ttft["kv_transfer_bytes"] == 256 * result["model"]["kv_bytes_per_token"] == 256 * 512
    assert "handoff_within_max_frac" in result["checks"]
    decode = result["stats"]["decode"]
    assert decode["kv_transfers"] == 3 + 3  # the equality prompts, the warm-up round and the 2 measured ones
