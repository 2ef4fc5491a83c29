#!/usr/bin/env bash
# Issue 5's GPU experiment: the optimal denoiser memorizes all 50,000 CIFAR-10 training
# images. The data (147 MiB) is over one device call's carry limit (64 MiB), so it travels
# in three parts over three consecutive calls (the machine keeps data-cache/ only while it
# stays warm, 30 s after a call). Prepare once, here:
#
#     python bench/carry_data.py split ../shared/data/cifar10-train.npz --parts 3
#
# then make three device calls at once, one after the other, each with this command and one part:
#
#     run(command="bash bench/gpu_optimal_full.sh", carry=["carry/cifar10-train.part1of3.npz"], timeout_s=300)
#     run(..., carry=["carry/cifar10-train.part2of3.npz"], timeout_s=120)
#     run(..., carry=["carry/cifar10-train.part3of3.npz"], timeout_s=600)
#
# Every call stashes its part in data-cache/ (bench/carry_data.py gather) and builds the
# extension if it is not built yet (CPU kernels only: the op's CUDA kernel is Python,
# diffmem/optimal_stream.py). The call that completes the set joins and verifies it, then
# samples SAMPLES images (default 1,024, seeds 0..1023, Heun 18 steps, batch 512) with the
# CUDA kernel (DIFFMEM_CUDA_OPTIMAL=1, float32 queries) and scores them against all 50,000.
# Record: $OUT/optimal-memorization-<gpu>-50k.json and .png; copy both into bench/results/.
#
# Knobs: SAMPLES (1024), RUN_LIMIT_S (480, the experiment's own timeout), PYTHON (python3).

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_optimal_full.log") 2>&1

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
"$PYTHON" bench/carry_data.py gather || exit 1

if ! "$PYTHON" -c "import diffmem._C" 2>/dev/null; then
    echo "=== build (CPU kernels; the optimal denoiser's CUDA kernel needs none)"
    MAX_JOBS=16 DIFFMEM_BUILD_CUDA=0 timeout 240 "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
        || { echo "build failed: see build.log"; tail -20 "$OUT/build.log"; exit 1; }
fi
"$PYTHON" -c "import diffmem._native as n; print('native extension:', n.AVAILABLE, n.LOAD_ERROR or '')"

DATA="data-cache/cifar10-train.npz"
if [ ! -f "$DATA" ]; then
    echo "not all parts are here yet: make the next call with the next part (see the header)"
    exit 0
fi
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
echo "=== optimal denoiser on all of CIFAR-10, ${SAMPLES:-1024} samples, $GPU"
DIFFMEM_CUDA_OPTIMAL=1 timeout -k 10 "${RUN_LIMIT_S:-480}" "$PYTHON" bench/optimal_memorization.py \
    --device cuda --precision float32 --data "$DATA" --size 50000 --samples "${SAMPLES:-1024}" \
    --sample-batch 512 --tikhonov 0 --held-out "" --json "$OUT/optimal-memorization-$GPU-50k.json"
echo "exit code $?"
