#!/usr/bin/env bash
# The CUDA check: on a machine with an NVIDIA GPU and `make install TORCH=torch` done (a CUDA build
# of torch), build the default model and the 7B-shaped synthetic model (default calibration size,
# 16 x 256) on the GPU, the default model on the CPU too, and write reports/gpu.{md,json} (wall time
# per stage and where it went, block-forwards, peak GPU memory, removed blocks against the CPU run).
#
#   benchmarks/gpu_check.sh                                   # both models
#   benchmarks/gpu_check.sh --skip-7b                         # the default model only (minutes)
#   benchmarks/gpu_check.sh --device cpu --shape 0.3b --out out/gpu-check/cpu   # the script itself, without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ " $* " != *" --device cpu "* ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch: run this on a GPU machine with a CUDA build of torch (or pass --device cpu)')"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
