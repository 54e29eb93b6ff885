#!/usr/bin/env bash
# Correctness + timing check of hf_turbo's attention kernels on a CUDA box (about 5 minutes).
#   benchmarks/gpu_check.sh [--sweep] [--e2e]
# --e2e also runs tests/test_gpu.py and tests/test_layer_split.py (accelerated generate() and the Engine on CUDA
# against stock generate()), the CUDA graph tests (tests/test_graphs.py and tests/test_graph_sampler.py -m gpu:
# graph == eager bit for bit per bucket, the sampler in the graph, one host sync per decode step), a quick
# `hf-turbo bench` on the GPU and benchmarks/gpu_e2e.py (random-weight llama3.1-8b and llama3.2-1b in bf16: stock, transformers' CB, hf_turbo
# with graphs on and off, decode at batch 1/16/64 with 1k context and 256 offline requests, one table). Uses ${PYTHON:-python3} (torch/triton/transformers installed
# system-wide); installs nothing, needs no network. Exit status 1 if any check fails.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
E2E=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--e2e" ]]; then E2E=1; else ARGS+=("$a"); fi
done
"$PY" "${REPO}/benchmarks/gpu_check.py" "${ARGS[@]}"
rc=$?
if [[ $E2E == 1 ]]; then
  echo; echo "== end to end on CUDA: tests/test_gpu.py"
  (cd "$REPO" && "$PY" -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py tests/test_layer_split.py 2>&1 \
    | grep -E "rows:|plain forward|seeded request|tokens before|passed|failed|Error|error|FAILED|assert") || rc=1
  echo; echo "== CUDA graphs: tests/test_graphs.py tests/test_graph_sampler.py tests/test_sliding_release.py tests/test_lookahead.py -m gpu"
  (cd "$REPO" && "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_graphs.py tests/test_graph_sampler.py \
    tests/test_sliding_release.py tests/test_lookahead.py 2>&1 | tail -5) || rc=1
  echo; echo "== hf-turbo bench --quick on CUDA (fixture model, bf16)"
  (cd "$REPO" && "$PY" -m hf_turbo.cli bench --quick --device cuda --dtype bfloat16) || rc=1
  echo; echo "== benchmarks/gpu_e2e.py: 8B and 1B shapes, bf16"
  (cd "$REPO" && "$PY" benchmarks/gpu_e2e.py 2>&1 | grep -v Warning) || rc=1
fi
exit $rc
