#!/usr/bin/env bash
# The CUDA check: on a machine with an NVIDIA GPU and `make install TORCH=torch` done (a CUDA build
# of torch), build the default model and the 7B-shaped synthetic model on the GPU, the default model
# on the CPU too, and write reports/gpu.{md,json} (wall time per stage, peak GPU memory, removed
# blocks against the CPU run). About 15 minutes on one GPU, most of it writing the 7B model.
#
#   benchmarks/gpu_check.sh            # both models
#   benchmarks/gpu_check.sh --skip-7b  # the default model only (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch: run this on a GPU machine with a CUDA build of torch')"
exec "$PY" benchmarks/gpu_check.py "$@"
