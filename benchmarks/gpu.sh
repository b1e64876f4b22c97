#!/usr/bin/env bash
# The prepared GPU check: run at once whenever a GPU machine is lent (typically under 8 minutes;
# the timeouts below cap it at 9 plus the install).
# Installs the project if needed, runs the GPU-only tests, then measures training throughput per backbone at the
# reference shape for fp32 / bf16 / bf16 + channels-last / + torch.compile, and prints tables;
# then the loader on the GPU (volumes on the device vs pinned host copies, and the share of training
# time the GPU computes), then a short demo study with 4 trials packed at 0.25 GPU each.
# Results land in ${OUT:-benchmarks/results}/gpu_compute.md, gpu_loader.md and gpu_study.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if ! python -c "import monai, zarr, pycox, pytest" 2>/dev/null; then
    python -m pip install --quiet -e ".[dev]" 2>&1 | tail -2
fi
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
# The GPU-only tests (volumes on the device vs pinned host staging), under a minute.
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_trainables_fold.py -k gpu 2>&1 | tail -3 || true
# The demo cohort for the study below is built on the CPUs while the GPU benchmark runs.
python -c "from study.demo import demo_store; demo_store(workers=6)" > "$out/demo_build.log" 2>&1 &
demo_build=$!
timeout 220 python -m benchmarks.compute --device cuda --batch 64 --steps 5 --warmup 2 \
    --modes fp32 bf16 bf16_cl bf16_cl_compile --budget-s 180 --out "$out/gpu_compute.md" || true
timeout 90 python -m benchmarks.loader --n 12 --workers 8 --device cuda --train-width 1.0 --train-batch 16 \
    --train-steps 8 --out "$out/gpu_loader.md" || true
wait "$demo_build" || true
timeout 150 python -m benchmarks.gpu_study --gpus-per-trial 0.25 --trials 4 --timeout 140 --out "$out/gpu_study.md"
