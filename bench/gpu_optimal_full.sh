#!/usr/bin/env bash
# Issue 5's GPU experiment: the optimal denoiser memorizes all 50,000 CIFAR-10 training
# images. The data (147 MiB) is over one device call's carry limit (64 MiB), so it travels
# in three parts over three consecutive calls (the machine keeps data-cache/ only while it
# stays warm, 30 s after a call). Prepare once, here:
#
#     python bench/carry_data.py split ../shared/data/cifar10-train.npz --parts 3
#
# then make three device calls, each at once after the last, each with one part and one stage:
#
#     run(command="bash bench/gpu_optimal_full.sh tests", carry=["carry/cifar10-train.part1of3.npz"], timeout_s=420)
#     run(command="bash bench/gpu_optimal_full.sh bench", carry=["carry/cifar10-train.part2of3.npz"], timeout_s=300)
#     run(command="bash bench/gpu_optimal_full.sh full",  carry=["carry/cifar10-train.part3of3.npz"], timeout_s=600)
#
# Every call stashes its part in data-cache/ (bench/carry_data.py gather) and builds the
# extension if it is not built yet (CPU kernels only: the op's CUDA kernel is Python,
# diffmem/optimal_stream.py), then runs its stage, so the calls that wait for data do the
# kernel's checks meanwhile:
#   tests  pytest tests/test_optimal_cuda.py (the CUDA kernel forced on in its cases)
#   bench  DIFFMEM_CUDA_OPTIMAL=1 bench/optimal.py --device cuda (B=512, N=50,000, random rows,
#          4 sigmas, the float16 floor; as gpu_check.sh's bench_optimal)
#   full   joins and verifies the parts, samples SAMPLES images (default 10,000, seeds 0..9999,
#          Heun 18 steps, batch 512) with the CUDA kernel (float32 queries) and scores them
#          against all 50,000 training images
# Records in $OUT: optimal-*.json (bench), optimal-memorization-<gpu>-50k.{json,png} (full);
# copy them into bench/results/.
#
# Knobs: SAMPLES (10000), RUN_LIMIT_S (480, the stage's own timeout), PYTHON (python3).

set -u
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
exec > >(tee -a "$OUT/gpu_optimal_full.log") 2>&1

gpu_line
"$PYTHON" bench/carry_data.py gather || exit 1

if ! "$PYTHON" -c "import diffmem._C" 2>/dev/null && [ -f carry/prebuilt/stamp.json ]; then
    "$PYTHON" bench/prebuilt.py install  # a carried build (bench/prebuilt.py), where it fits
fi
if ! "$PYTHON" -c "import diffmem._C" 2>/dev/null; then
    echo "=== build (CPU kernels; the optimal denoiser's CUDA kernel needs none)"
    MAX_JOBS=16 DIFFMEM_BUILD_CUDA=0 timeout 240 "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
        || { echo "build failed: see build.log"; tail -20 "$OUT/build.log"; exit 1; }
fi
"$PYTHON" -c "import diffmem._native as n; print('native extension:', n.AVAILABLE, n.LOAD_ERROR or '')"
STAGE="${1:-full}"
LIMIT="${RUN_LIMIT_S:-480}"
case "$STAGE" in
    tests)
        timeout -k 10 "$LIMIT" "$PYTHON" -m pytest tests/test_optimal_cuda.py -q -rs -s -p no:cacheprovider \
            --durations=10 --junitxml="$OUT/test_optimal_cuda.xml"
        echo "exit code $?"
        exit 0 ;;
    bench)
        MARK="$(mktemp)"
        DIFFMEM_CUDA_OPTIMAL=1 timeout -k 10 "$LIMIT" "$PYTHON" bench/optimal.py --device cuda --data random \
            --floors float16 --sigmas 0.002,1,5,80 --repeat 3
        echo "exit code $?"
        find bench/results -maxdepth 1 -name 'optimal-*.json' -newer "$MARK" -exec cp {} "$OUT/" \;
        exit 0 ;;
    full) ;;
    *) echo "unknown stage '$STAGE': tests, bench or full"; exit 2 ;;
esac

DATA="data-cache/cifar10-train.npz"
if [ ! -f "$DATA" ]; then
    echo "not all parts are here yet: make the next call with the next part (see the header)"
    exit 0
fi
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
echo "=== optimal denoiser on all of CIFAR-10, ${SAMPLES:-10000} samples, $GPU"
DIFFMEM_CUDA_OPTIMAL=1 timeout -k 10 "$LIMIT" "$PYTHON" bench/optimal_memorization.py \
    --device cuda --precision float32 --data "$DATA" --size 50000 --samples "${SAMPLES:-10000}" \
    --sample-batch 512 --tikhonov 0 --held-out "" --json "$OUT/optimal-memorization-$GPU-50k.json"
echo "exit code $?"
