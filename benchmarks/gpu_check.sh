#!/usr/bin/env bash
# The prepared GPU check (issue "GPU engine"): one run, under 5 minutes, everything written to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh OUT_DIR                      # from the repository root, on the GPU machine
#   GPU_CHECK_SMOKE=1 GPU_CHECK_MODEL=PATH bash benchmarks/gpu_check.sh OUT_DIR   # CPU smoke run, tiny sizes
#
# Parts, in order, each under its own `timeout` and all under one deadline (GPU_CHECK_BUDGET_S, default 290 s;
# a part never gets more than is left, and one with under 5 s left is skipped). GPU_CHECK_PARTS=engine,hf runs
# only the parts named (a rerun with what is left of a lease); GPU_CHECK_TESTS_S, _ENGINE_S, _EAGER_S,
# _PROFILE_S, _PROFILE_EAGER_S, _ATTENTION_S, _KV_CUDA_IPC_S, _PD_CUDA_IPC_S, _PD_BF16_S, _HF_S, _HF_STATIC_S
# override each part's cap (seconds, the default in brackets below). A failing part doesn't stop the rest. Each
# writes OUT_DIR/<part>.log, and its results:
#   env            env.json: date, nvidia-smi, python, torch/triton/transformers/gguf versions, git commit [30]
#   gpu-tests      pytest -m gpu over the test files that mark gpu tests; gpu-tests.xml (junit) [90]
#   pd-cuda-ipc    bench_pd_gpu.py: a prefill and a decode WorkerServer, two processes on the one GPU, KV over
#                  cuda_ipc, llama-3-8B shape with dummy weights in float32, GPU_CHECK_PD_LAYERS (16) of its 32 layers
#                  (16: a 2048-token prompt's float32 KV is 256 MiB, the full model's bfloat16 hand-off): greedy output
#                  of 8 prompts disaggregated against colocated (`equal`), and what the hand-off adds to the TTFT of a
#                  2048-token prompt (`ttft.handoff_frac_of_ttft`, checked against 5%); its rc is 1 when the outputs
#                  differ or a phase fails. Without a GPU: skipped, except in a smoke run, which runs a toy model on
#                  CPU over shm (a smoke run on a GPU: the toy over cuda_ipc). Before the engine parts, so that the
#                  default budget reaches it; pd-cuda-ipc.json [90]
#   pd-bf16        only with GPU_CHECK_PD_BF16=1: the same TTFT measure, full llama-3-8B in bfloat16 (the serving
#                  case), no equality; pd-bf16.json [60]
#   engine         bench_engine.py --gpu, batch 1,64,256; engine.json [90]
#   engine-eager   the same with --enforce-eager at batch 1,64 (CUDA graphs against eager); engine-eager.json [45]
#   profile        profile_decode.py, batch 1 and 64 with CUDA graphs; profile.json [25]
#   profile-eager  profile_decode.py --enforce-eager, batch 1; profile-eager.json [15]
#   attention      bench_attention.py, if it exists; attention.json [20]
#   kv-cuda-ipc    bench_kv_transfer.py --transports cuda_ipc at 256 MiB (a llama-3-8B 2048-token hand-off, GPU to
#                  GPU between two processes: fetch GB/s and TB/s against a device-to-device copy); skipped where
#                  torch sees no GPU (so in a CPU smoke run; a smoke run on a GPU moves 4 MiB once);
#                  kv-cuda-ipc.json [30]
#   hf             bench_hf_gpu.py: transformers eager at batch 1,64,256; hf.json [45]
#   hf-static      only with GPU_CHECK_HF_STATIC=1: transformers static cache, compiled, batch 1; hf-static.json [60]
# and last OUT_DIR/summary.json: per part its rc ("skipped" or a number; 124/137 = timed out), seconds, the
# time it was allowed, its results inlined and the tail of its log, so that summary.json alone tells the story.
#
# Assumes: bash, coreutils `timeout`, and python (or python3; or $PYTHON) with torch, triton, transformers and
# pytest installed system-wide; run from a plain copy of the working tree (no venv, no `pip install -e`: the
# bench scripts put the repository on sys.path, pytest runs from the root). The engine imports `gguf`
# (workers/model/loader.py): where it is missing, carry its wheel in .whl/ (/work/.library/device/README.md);
# any .whl/*.whl is installed into /tmp/gpu-check-site and put on PYTHONPATH first. bench_hf_gpu.py does not
# need gguf. The gpu tests' tiny_checkpoint fixture needs the default model's tokenizer, and the SmolLM2 GGUF
# (98 MB) is too big to carry: save the tokenizer alone into .whl/tokenizer (2 MB) before the run,
#   .venv/bin/python -c "from transformers import AutoTokenizer; from workers.model.loader import find_default_model as f; p = f(); AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained('.whl/tokenizer')"
# and this script points TANDEM_TEST_TOKENIZER at it (tests/conftest.py). pytest runs without -x, and with
# --continue-on-collection-errors, so that one broken test module does not hide the others.
#
# The GPU machine returns at most 8 files from $OUT: bundle the folder, e.g.
#   bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/summary.json "$OUT"/; tar -C /tmp -czf "$OUT"/gc.tar.gz gc
set -u

OUT_DIR=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-290}
T_START=$(date +%s)
PARTS_TSV="$OUT_DIR/parts.tsv"
: >"$PARTS_TSV"

if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
        .whl/*.whl >"$OUT_DIR/wheels.log" 2>&1 && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [ -f .whl/tokenizer/tokenizer.json ]; then
    export TANDEM_TEST_TOKENIZER=$PWD/.whl/tokenizer
fi

# run_part NAME CAP_S COMMAND...: COMMAND under `timeout min(CAP_S, time left)`, output to NAME.log.
run_part() {
    local name=$1 cap=$2 left allowed t0 rc
    shift 2
    if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ ",$GPU_CHECK_PARTS," != *",$name,"* ]]; then
        skip_part "$name" "not in GPU_CHECK_PARTS=$GPU_CHECK_PARTS"
        return
    fi
    left=$((BUDGET_S - ($(date +%s) - T_START)))
    allowed=$((cap < left ? cap : left))
    t0=$(date +%s.%N)
    if [ "$allowed" -lt 5 ]; then
        echo "skipped: ${left}s left of the ${BUDGET_S}s budget" >"$OUT_DIR/$name.log"
        rc=skipped
    else
        echo "+ timeout ${allowed}s $*" >"$OUT_DIR/$name.log"
        timeout -k 5 "$allowed" "$@" >>"$OUT_DIR/$name.log" 2>&1
        rc=$?
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$t0" "$(date +%s.%N)" "$allowed" >>"$PARTS_TSV"
    echo "[gpu_check] $name: rc=$rc ($(($(date +%s) - T_START))s elapsed)" >&2
}

skip_part() {  # NAME REASON
    echo "skipped: $2" >"$OUT_DIR/$1.log"
    printf '%s\tskipped\t%s\t%s\t0\n' "$1" "$(date +%s.%N)" "$(date +%s.%N)" >>"$PARTS_TSV"
}

# Read into a variable (not a shell function) so that `timeout` can run it.
read -r -d '' ENV_PY <<'EOF'
import importlib, json, platform, subprocess, sys
from datetime import datetime

def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

env = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "python": sys.version,
       "platform": platform.platform(), "executable": sys.executable, "nvidia_smi": sh("nvidia-smi"),
       "nvidia_smi_query": sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                              "clocks.mem,temperature.gpu,power.draw", "--format=csv"),
       "git_commit": sh("git", "rev-parse", "HEAD"), "cpu_count": __import__("os").cpu_count()}
for name in ("torch", "triton", "transformers", "gguf", "pytest", "numpy", "safetensors"):
    try:
        env[name] = importlib.import_module(name).__version__
    except Exception as exc:
        env[name] = f"missing: {type(exc).__name__}: {exc}"
try:
    import torch
    env["cuda_available"] = torch.cuda.is_available()
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_free_total_bytes"] = list(torch.cuda.mem_get_info(0))
except Exception as exc:
    env["cuda_error"] = repr(exc)
open(sys.argv[1], "w").write(json.dumps(env, indent=2) + "\n")
EOF

write_summary() {
    "$PY" - "$OUT_DIR" "$SMOKE" "$BUDGET_S" <<'EOF'
import json, sys
from pathlib import Path

out, smoke, budget_s = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, t0, t1, allowed = line.split("\t")
    log = out / f"{name}.log"
    result = out / f"{name}.json"
    part = {"rc": rc if rc == "skipped" else int(rc), "seconds": round(float(t1) - float(t0), 2),
            "timeout_s": int(allowed), "timed_out": rc in ("124", "137"),
            "log_tail": log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []}
    if result.exists():
        try:
            part["result"] = json.loads(result.read_text())
        except ValueError as exc:
            part["result_error"] = repr(exc)
    junit = out / f"{name}.xml"
    if junit.exists():
        try:
            import xml.etree.ElementTree as ET
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            part["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            part["tests"]["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {c[0].tag}"
                                           for c in suite.iter("testcase") if len(c) and c[0].tag != "properties"]
        except Exception as exc:
            part["tests_error"] = repr(exc)
    parts[name] = part
ran = [p for p in parts.values() if p["rc"] != "skipped"]
summary = {"smoke": smoke, "budget_s": budget_s, "total_s": round(sum(p["seconds"] for p in parts.values()), 2),
           "ok": all(p["rc"] == 0 for p in ran), "parts": parts}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(" ".join(f"{k}={v['rc']}({v['seconds']:.0f}s)" for k, v in parts.items()))
EOF
}

# --- the parts -----------------------------------------------------------------------------------------

if [ "$SMOKE" = 1 ]; then
    MODEL=${GPU_CHECK_MODEL:?GPU_CHECK_SMOKE=1 needs GPU_CHECK_MODEL, a small checkpoint folder}
    ENGINE=(--device cpu --model "$MODEL" --skip-hf --num-requests 3 --min-prompt-len 4 --max-prompt-len 12
            --min-output-len 2 --max-output-len 4 --decode-tokens 4 --max-num-seqs 4 --max-num-batched-tokens 64
            --copy-gib 0.01 --kv-cache-memory-bytes 16777216)
    ENGINE_BATCHES=1,2; EAGER_BATCHES=1,2
    PROFILE=(--device cpu --model "$MODEL" --steps 2 --warmup-steps 1 --prompt-len 8 --max-num-seqs 4
             --kv-cache-memory-bytes 16777216)
    PROFILE_BATCHES=1,2; PROFILE_SIZES=()
    HF=(--device cpu --tiny --decode-tokens 4 --static); HF_BATCHES=1,2  # static: no compile on CPU
    KV_CUDA_IPC=(--sizes-mib 4 --repeats 1)
    PD=(--tiny --num-prompts 3 --max-prompt-len 200 --max-tokens 8 --ttft-prompt-len 256 --repeats 2 --warmup 1)
else
    ENGINE=(--gpu --max-num-seqs 256 --max-num-batched-tokens 8192)
    ENGINE_BATCHES=1,64,256; EAGER_BATCHES=1,64
    PROFILE=()
    PROFILE_BATCHES=1,64; PROFILE_SIZES=(--cudagraph-capture-sizes 1,64)  # capture only what is profiled
    HF=(--decode-tokens 128); HF_BATCHES=1,64,256
    KV_CUDA_IPC=(--sizes-mib 256 --repeats 5)  # 256 MiB: llama-3-8B's KV for 2048 tokens
    PD=(--layers "${GPU_CHECK_PD_LAYERS:-16}")
fi
HAS_CUDA=0
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && HAS_CUDA=1

run_part env 30 "$PY" -c "$ENV_PY" "$OUT_DIR/env.json"
mapfile -t GPU_TEST_FILES < <(grep -rl --include='test_*.py' -e 'mark\.gpu' tests | sort)
if [ "${#GPU_TEST_FILES[@]}" -eq 0 ]; then
    skip_part gpu-tests "no test file under tests/ marks a gpu test"
else
    run_part gpu-tests "${GPU_CHECK_TESTS_S:-90}" "$PY" -m pytest -m gpu "${GPU_TEST_FILES[@]}" -q -rA \
        -p no:cacheprovider --continue-on-collection-errors --junitxml "$OUT_DIR/gpu-tests.xml"
fi
if [ "$HAS_CUDA" = 1 ]; then
    run_part pd-cuda-ipc "${GPU_CHECK_PD_CUDA_IPC_S:-90}" "$PY" benchmarks/bench_pd_gpu.py "${PD[@]}" \
        --output "$OUT_DIR/pd-cuda-ipc.json"
elif [ "$SMOKE" = 1 ]; then  # the same script and part on CPU: a toy model, KV over shm
    run_part pd-cuda-ipc "${GPU_CHECK_PD_CUDA_IPC_S:-90}" "$PY" benchmarks/bench_pd_gpu.py "${PD[@]}" \
        --device cpu --output "$OUT_DIR/pd-cuda-ipc.json"
elif [ -n "${GPU_CHECK_PARTS:-}" ] && [[ ",$GPU_CHECK_PARTS," != *",pd-cuda-ipc,"* ]]; then
    skip_part pd-cuda-ipc "not in GPU_CHECK_PARTS=$GPU_CHECK_PARTS"
else
    skip_part pd-cuda-ipc "torch sees no CUDA device: cuda_ipc moves KV between GPUs"
fi
if [ "${GPU_CHECK_PD_BF16:-0}" = 1 ] && [ "$HAS_CUDA" = 1 ] && [ "$SMOKE" != 1 ]; then
    run_part pd-bf16 "${GPU_CHECK_PD_BF16_S:-60}" "$PY" benchmarks/bench_pd_gpu.py --dtype bfloat16 --skip-equality \
        --output "$OUT_DIR/pd-bf16.json"
fi
run_part engine "${GPU_CHECK_ENGINE_S:-90}" "$PY" benchmarks/bench_engine.py "${ENGINE[@]}" \
    --batch-sizes "$ENGINE_BATCHES" --output "$OUT_DIR/engine.json"
run_part engine-eager "${GPU_CHECK_EAGER_S:-45}" "$PY" benchmarks/bench_engine.py "${ENGINE[@]}" --enforce-eager \
    --batch-sizes "$EAGER_BATCHES" --output "$OUT_DIR/engine-eager.json"
run_part profile "${GPU_CHECK_PROFILE_S:-25}" "$PY" benchmarks/profile_decode.py ${PROFILE[@]+"${PROFILE[@]}"} \
    ${PROFILE_SIZES[@]+"${PROFILE_SIZES[@]}"} --batch-size "$PROFILE_BATCHES" --output "$OUT_DIR/profile.json"
run_part profile-eager "${GPU_CHECK_PROFILE_EAGER_S:-15}" "$PY" benchmarks/profile_decode.py \
    ${PROFILE[@]+"${PROFILE[@]}"} --enforce-eager --batch-size 1 --output "$OUT_DIR/profile-eager.json"
if [ "$SMOKE" = 1 ]; then
    skip_part attention "smoke run"
elif [ -f benchmarks/bench_attention.py ]; then
    run_part attention "${GPU_CHECK_ATTENTION_S:-20}" "$PY" benchmarks/bench_attention.py \
        --output "$OUT_DIR/attention.json"
else
    skip_part attention "benchmarks/bench_attention.py does not exist"
fi
if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ ",$GPU_CHECK_PARTS," != *",kv-cuda-ipc,"* ]]; then
    skip_part kv-cuda-ipc "not in GPU_CHECK_PARTS=$GPU_CHECK_PARTS"
elif [ "$HAS_CUDA" != 1 ]; then
    skip_part kv-cuda-ipc "torch sees no CUDA device: cuda_ipc moves KV between GPUs"
else
    run_part kv-cuda-ipc "${GPU_CHECK_KV_CUDA_IPC_S:-30}" "$PY" benchmarks/bench_kv_transfer.py \
        --transports cuda_ipc "${KV_CUDA_IPC[@]}" --output "$OUT_DIR/kv-cuda-ipc.json"
fi
run_part hf "${GPU_CHECK_HF_S:-45}" "$PY" benchmarks/bench_hf_gpu.py "${HF[@]}" --batch-sizes "$HF_BATCHES" \
    --output "$OUT_DIR/hf.json"
if [ "${GPU_CHECK_HF_STATIC:-0}" = 1 ]; then
    run_part hf-static "${GPU_CHECK_HF_STATIC_S:-60}" "$PY" benchmarks/bench_hf_gpu.py "${HF[@]}" --static \
        --skip-eager --output "$OUT_DIR/hf-static.json"
fi
write_summary
