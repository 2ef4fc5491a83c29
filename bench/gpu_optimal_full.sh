#!/usr/bin/env bash
# Issue 5's GPU experiment: the optimal denoiser memorizes all 50,000 CIFAR-10 training
# images. The data (147 MiB) is over one device call's carry limit (64 MiB), so it travels
# in three parts over three consecutive calls (the machine keeps data-cache/ only while it
# stays warm, 30 s after a call). Prepare once, here:
#
#     python bench/carry_data.py split ../shared/data/cifar10-train.npz --parts 3
#
# then, in a session of its own (gpu_check.sh first verifies the kernel, in another
# session), three device calls, each at once after the last (30 s idle gives the machine
# back, data-cache/ with it):
#
#     run(command="bash bench/gpu_optimal_full.sh gather", carry=["carry/cifar10-train.part1of3.npz", "carry/prebuilt"], timeout_s=120)
#     run(command="bash bench/gpu_optimal_full.sh gather", carry=["carry/cifar10-train.part2of3.npz"], timeout_s=60)
#     run(command="RUN_LIMIT_S=<T-30> bash bench/gpu_optimal_full.sh full", carry=["carry/cifar10-train.part3of3.npz"], timeout_s=<T>)
#
# with T = budget_left_s from `status` minus about 30 s (the machine's start, 1-2 min, is
# spent by then). Every call stashes its part in data-cache/ (bench/carry_data.py gather);
# the first also installs the carried build (bench/prebuilt.py; else a CPU-only build, as
# the op's CUDA kernel is Python, diffmem/optimal_stream.py). Stages:
#   gather  only that
#   tests   pytest tests/test_optimal_cuda.py (the CUDA kernel forced on in its cases)
#   bench   DIFFMEM_CUDA_OPTIMAL=1 bench/optimal.py --device cuda (B=512, N=50,000, random rows,
#           4 sigmas, the float16 floor; as gpu_check.sh's bench_optimal)
#   full    joins and verifies the parts, samples SAMPLES images (default 1,000, seeds 0..999,
#           Heun 18 steps, batch 512) with the CUDA kernel (float32 queries) and scores them
#           against all 50,000 training images. From bench/optimal_work.py's counts (about
#           2.5 float16 GEMMs of B x N x d per evaluation), 1,000 samples are ~1 minute of
#           GEMMs on an H100 and 10,000 ~8 minutes: more than one call.
# Records in $OUT: optimal-*.json (bench), optimal-memorization-<gpu>-50k.{json,png} (full);
# copy them into bench/results/.
#
# Knobs: SAMPLES (1000), RUN_LIMIT_S (the stage's own timeout; default 400, below the
# calls' timeout_s so that the script reports the exit code itself), PYTHON (python3).

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
LIMIT="${RUN_LIMIT_S:-400}"
case "$STAGE" in
    gather)
        [ -f data-cache/cifar10-train.npz ] && echo "all parts are here: next, the full stage"
        exit 0 ;;
    tests)
        timeout -k 10 "$LIMIT" "$PYTHON" -m pytest tests/test_optimal_cuda.py -q -rs -s -p no:cacheprovider \
            --durations=10 --junitxml="$OUT/test_optimal_cuda.xml"
        rc=$?
        echo "exit code $rc"
        exit "$rc" ;;
    bench)
        MARK="$(mktemp)"
        DIFFMEM_CUDA_OPTIMAL=1 timeout -k 10 "$LIMIT" "$PYTHON" bench/optimal.py --device cuda --data random \
            --floors float16 --sigmas 0.002,1,5,80 --repeat 3 --profile
        rc=$?
        echo "exit code $rc"
        find bench/results -maxdepth 1 -name 'optimal-*.json' -newer "$MARK" -exec cp {} "$OUT/" \;
        exit "$rc" ;;
    full) ;;
    *) echo "unknown stage '$STAGE': gather, tests, bench or full"; exit 2 ;;
esac

DATA="data-cache/cifar10-train.npz"
if [ ! -f "$DATA" ]; then
    echo "not all parts are here yet: make the next call with the next part (see the header)"
    exit 0
fi
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null || echo unknown-gpu)
echo "=== optimal denoiser on all of CIFAR-10, ${SAMPLES:-1000} samples, $GPU"
DIFFMEM_CUDA_OPTIMAL=1 timeout -k 10 "$LIMIT" "$PYTHON" bench/optimal_memorization.py \
    --device cuda --precision float32 --data "$DATA" --size 50000 --samples "${SAMPLES:-1000}" \
    --sample-batch 512 --tikhonov 0 --held-out "" --json "$OUT/optimal-memorization-$GPU-50k.json"
rc=$?
echo "exit code $rc"
exit "$rc"
