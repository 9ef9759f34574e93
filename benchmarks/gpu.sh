#!/usr/bin/env bash
# benchmarks/gpu.sh — qwenkit on vLLM against raw `vllm serve`, on one machine with an NVIDIA GPU (issue 17).
#
# 1. makes a venv of its own (vLLM pins its CUDA torch) and installs qwenkit[vllm,test,cpu] from this
#    checkout (cpu: the test helpers import the llama.cpp engine; it builds from source, a few minutes);
# 2. writes a random-weight demo checkpoint with real Qwen3 shapes (--size 0.5b: 14 heads, 2 KV heads);
# 3. serves it with `qwenkit serve --engine vllm` and runs the server's protocol tests against it over HTTP
#    (tests/test_served_contract.py via QWENKIT_TEST_URL) plus the adapter tests on vLLM's real types;
# 4. serves the same checkpoint with raw `vllm serve` beside it (each at GPU_UTIL of the GPU) and measures
#    both, alternating, at 16 and 64 streams with `qwenkit bench --compare`;
# 5. writes $OUT/gpu-summary.json: output tok/s of each and qwenkit/vLLM (goal: >= 0.95 at both levels).
# Usage: benchmarks/gpu.sh            (env: WORK, OUT, DEMO_SIZE, GPU_UTIL, NUM_REQUESTS, PYTHON)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/qwenkit-gpu}"
OUT="${OUT:-$WORK/results}"
DEMO_SIZE="${DEMO_SIZE:-0.5b}"
GPU_UTIL="${GPU_UTIL:-0.4}"
NUM_REQUESTS="${NUM_REQUESTS:-256}"
PYTHON="${PYTHON:-python3}"
QK_PORT=8100
VLLM_PORT=8200
CTX=2048
SEQS=64

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi lists none); run it on a machine with one" >&2
    exit 2
fi
mkdir -p "$WORK" "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"

# 1. Install (a venv of its own; pip caches the wheels between runs).
if [ ! -x "$WORK/venv/bin/qwenkit" ]; then
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install --upgrade pip
    "$WORK/venv/bin/pip" install -e "${ROOT}[vllm,test,cpu]"
fi
# shellcheck source=/dev/null
. "$WORK/venv/bin/activate"
python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$OUT/versions.txt"

# 2. The demo checkpoint (random weights, the real Qwen3 vocabulary and chat template).
DEMO="$WORK/demo-qwen3-$DEMO_SIZE"
[ -f "$DEMO/config.json" ] || qwenkit demo create --arch qwen3 --size "$DEMO_SIZE" --out "$DEMO"

PIDS=()
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_up() {  # wait_up URL NAME PID: until URL answers 200, or the server died, or 15 minutes passed
    local url=$1 name=$2 pid=$3
    for _ in $(seq 1 900); do
        if curl -fsS "$url" >/dev/null 2>&1; then
            echo "$name is up"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "gpu.sh: $name exited before answering; see $OUT/$name.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "gpu.sh: $name did not answer $url in 15 minutes" >&2
    exit 1
}

# 3. qwenkit on vLLM, and the protocol tests against it.
qwenkit serve --engine vllm --model "$DEMO" --port "$QK_PORT" --max-seqs "$SEQS" --ctx $((CTX * SEQS)) \
    --gpu-memory-utilization "$GPU_UTIL" >"$OUT/qwenkit-vllm.log" 2>&1 &
PIDS+=("$!")
wait_up "http://127.0.0.1:$QK_PORT/health" qwenkit-vllm "${PIDS[0]}"

cd "$ROOT"
set +e  # a failing test is reported, and the benchmark still runs
QWENKIT_TEST_URL="http://127.0.0.1:$QK_PORT" python -m pytest -p no:cacheprovider -q -m "slow or not slow" \
    tests/test_served_contract.py tests/test_vllm_engine.py 2>&1 | tee "$OUT/protocol-tests.txt"
PROTOCOL_RC=${PIPESTATUS[0]}
set -e

# 4. Raw vLLM on the same checkpoint, beside it; then both measured, alternating.
vllm serve "$DEMO" --port "$VLLM_PORT" --max-model-len "$CTX" --max-num-seqs "$SEQS" \
    --gpu-memory-utilization "$GPU_UTIL" --reasoning-parser qwen3 >"$OUT/vllm.log" 2>&1 &
PIDS+=("$!")
wait_up "http://127.0.0.1:$VLLM_PORT/health" vllm "${PIDS[1]}"

qwenkit bench --base-url "http://127.0.0.1:$QK_PORT" --compare "http://127.0.0.1:$VLLM_PORT" \
    --label qwenkit-vllm --label vllm --concurrency 16,64 --num-requests "$NUM_REQUESTS" \
    --input-len 256 --output-len 256 --endpoint completions --rounds 2 --out "$OUT/bench"

# 5. The ratio at each level.
python - "$OUT" "$PROTOCOL_RC" <<'PY'
import json
import sys
from pathlib import Path

from qwenkit.bench.run import BenchReport

out, protocol_rc = Path(sys.argv[1]), int(sys.argv[2])
report = BenchReport.model_validate_json((out / "bench" / "results.json").read_text())
rows = {}
for streams in (16, 64):
    ours = report.level("qwenkit-vllm", concurrency=streams)
    raw = report.level("vllm", concurrency=streams)
    rows[streams] = {
        "qwenkit_vllm_tok_s": ours.output_tok_s,
        "vllm_tok_s": raw.output_tok_s,
        "ratio": ours.output_tok_s / raw.output_tok_s,
        "failed": {"qwenkit_vllm": ours.failed, "vllm": raw.failed},
    }
summary = {"protocol_tests_rc": protocol_rc, "streams": rows, "goal": "ratio >= 0.95 at 16 and 64 streams"}
(out / "gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
echo "gpu.sh: results in $OUT (protocol tests rc=$PROTOCOL_RC)"
exit "$PROTOCOL_RC"
