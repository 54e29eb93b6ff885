#!/usr/bin/env bash
# Correctness + timing check of hf_turbo's attention kernels on a CUDA box.
# Uses the `python` on PATH (torch/triton installed system-wide); installs nothing, needs no network.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
exec python "${REPO}/benchmarks/gpu_check.py" "$@"
