#!/usr/bin/env bash
# The prepared GPU check: run at once whenever a GPU machine is lent (under 8 minutes).
# Installs the project if needed, then measures training throughput per backbone at the
# reference shape for fp32 / bf16 / bf16 + channels-last / + torch.compile, and prints tables.
# Results land in ${OUT:-benchmarks/results}/gpu_compute.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if ! python -c "import monai, zarr, pycox" 2>/dev/null; then
    python -m pip install --quiet -e . 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
timeout 460 python -m benchmarks.compute --device cuda --batch 64 --steps 5 --warmup 2 \
    --modes fp32 bf16 bf16_cl bf16_cl_compile --budget-s 380 --out "$out/gpu_compute.md"
