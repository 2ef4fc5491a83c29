#!/usr/bin/env bash
# One-command GPU check for an H100/H200 session: build, CUDA tests, benchmarks.
#
#     run(command="DIFFMEM_GIT_COMMIT=<sha> DIFFMEM_GIT_DIRTY=0 bash bench/gpu_check.sh",
#         carry=["carry/prebuilt"], timeout_s=600)  # BUDGET_S=560 inside
#
# DIFFMEM_GIT_*: the commit the records come from (git rev-parse HEAD here), in case the
# copied tree arrives without its git history (bench/machine.py reads them then).
#
# carry/prebuilt: the extension built here for the machine's torch (bench/prebuilt.py pack);
# without it, or where it does not fit, the build step compiles there.
#
# A drawn task has 15 minutes of device time in all (the machine's start, 1-2 min,
# included), so the steps are ordered by what they can settle: issue 2 (kNN) first, then
# issue 5 (optimal denoiser: its tests and benchmark; the 50,000-image run is a session of
# its own, bench/gpu_optimal_full.sh), then issue 3 (training throughput, whose two
# torch.compile builds may take minutes). Estimated times are guesses until a first run;
# the caps bound them (the sum is over the budget on purpose: a fast step leaves its time
# to the next):
#   info          nvidia-smi, python, torch, nvcc                               (cap  20 s)
#   build         the carried carry/prebuilt build where it fits (bench/prebuilt.py install:
#                 same torch, same sources, loads with CUDA), else
#                 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation
#                 --no-deps --no-index -e .  against the machine's torch (2.11 there); if pip
#                 fails fast (not a compile error), python setup.py build_ext --inplace; if
#                 the CUDA build fails, a CPU-only build, so the Python-registered optimal
#                 kernel can still be tested                                     (cap 270 s)
#   import        which diffmem._C loaded, built_with_cuda, CPU kernels          (cap  30 s)
#   test_knn      pytest tests/test_knn_cuda.py -q                               (cap  90 s)
#   bench_knn     python bench/knn.py --device cuda --dtype uint8 --methods
#                 diffmem,bare_gemm_int8,cdist_topk --profile with DIFFMEM_CUDA_KNN=1 (the CUDA
#                 kernel) when test_knn passed, else the default dispatch        (cap 120 s)
#   test_optimal  pytest tests/test_optimal_cuda.py -q: the default dispatch and the
#                 op's CUDA kernel (tensor-core streaming, diffmem/optimal_stream.py;
#                 torch.compile of its stages on first use)                     (cap 150 s)
#   bench_optimal DIFFMEM_CUDA_OPTIMAL=1 python bench/optimal.py --device cuda --data random
#                 --floors float16 --sigmas 0.002,1,5,80 --repeat 3 --profile (one profiled call each
#                 of diffmem and its floor per run: GEMM vs compiled vs idle time; and, for uint8 rows,
#                 the path's int8 + float16 floor, always timed; CIFAR-10's 50,000 rows
#                 do not travel with the tree; random rows, and the record says so) (cap 120 s)
#   bench_train   python bench/train_throughput.py --device cuda --warmup 3 --steps 20
#                 --compile-limit 90: fp32 eager (the reference recipe), its compiled form,
#                 bf16 channels-last, eager and compiled (partial record after each), one
#                 profiled step each (--profile)                                  (cap 240 s)
#   tuning        python bench/gpu_tuning.py --device cuda: kNN tiles (when test_knn passed)
#                 and optimal chunk sizes against their floors, for the defaults   (cap  60 s)
# Each step runs under `timeout` with min(its cap, the time left of BUDGET_S); one that
# fails or times out does not stop the others; a step is skipped when less than 15 s are
# left. Benchmarks write partial JSON records as they go ("complete": false).
#
# Output, in $OUT (set by the device tool; ./gpu-out when unset), at most 8 files:
#   summary.txt       one line per step (exit code, seconds, status), then each benchmark's table
#   gpu_check.log     everything the finished steps printed
#   running_step.log  the output of the step in progress (left there if the script is killed)
#   results.tar.gz    every step's log and every JSON the benchmarks wrote
#   *.json            the benchmarks' JSON records (bench/results/<name>-<device>.json), up to 4
# All but the tarball are refreshed after every step. Copy the JSON records into
# bench/results/ of the checkout to keep them.
#
# Knobs (environment): BUDGET_S (560), PYTHON (python3), SKIP_BUILD=1 (use the build that
# is there), GPU_CHECK_CUDA_KNN=0|1 (run the kNN bench with this dispatch even when
# test_knn failed), GPU_CHECK_CUDA_OPTIMAL=0|1 (the optimal bench's dispatch, default 1),
# STEPS (space-separated step names to run, default all), OUT.
# Without a GPU every CUDA step fails or skips within seconds (bash -n and a dry run here).

set -u
set +e

source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
BUDGET_S="${BUDGET_S:-560}"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
SUMMARY="$WORK/summary.txt"
LOG="$WORK/gpu_check.log"
MARKER="$WORK/start-marker"
touch "$MARKER"
declare -A RC

{
    echo "gpu_check.sh  $(date -u +%Y-%m-%dT%H:%M:%SZ)  budget ${BUDGET_S}s"
    # as the records will say it (bench/machine.py: git, else DIFFMEM_GIT_*)
    "$PYTHON" -c 'from bench import machine; print("commit", machine.git_commit(), " dirty:", machine.git_dirty())' \
        2>/dev/null || echo "commit unknown"
    printf '%-14s %5s %7s  %s\n' step rc seconds status
} >"$SUMMARY"

# run_step NAME CAP_S COMMAND...: runs COMMAND under timeout, logs it, records its exit code.
run_step() {
    local name="$1" cap="$2"
    shift 2
    local now left limit t0 rc status
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        RC[$name]=skipped
        printf '%-14s %5s %7s  %s\n' "$name" - 0 "skipped: not in STEPS" >>"$SUMMARY"
        return 0
    fi
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 15 ]; then
        RC[$name]=skipped
        printf '%-14s %5s %7s  %s\n' "$name" - 0 "skipped: budget spent" >>"$SUMMARY"
        echo "=== $name: skipped (budget spent)" | tee -a "$LOG"
        return 0
    fi
    limit=$cap
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/running_step.log" 2>&1 </dev/null
    rc=$?
    mv "$OUT/running_step.log" "$LOGS/$name.log"
    cat "$LOGS/$name.log" >>"$LOG"
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status=FAILED ;;
    esac
    RC[$name]=$rc
    printf '%-14s %5s %7s  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$status" >>"$SUMMARY"
    echo "=== $name: rc=$rc ($status)" | tee -a "$LOG"
    # what has run so far comes back even if the device tool's own timeout ends the script
    cp "$SUMMARY" "$OUT/summary.txt"
    cp "$LOG" "$OUT/gpu_check.log"
    copy_records
    return 0
}

# copy_records: the JSON records written since the start, newest 4, into $OUT
copy_records() {
    local f n=0
    while IFS= read -r f; do
        [ "$n" -ge 4 ] && break  # 8 files come back at most: summary, two logs, tarball + 4
        cp "$f" "$OUT/"
        n=$((n + 1))
    done < <(find bench/results -maxdepth 1 -name '*.json' -newer "$MARKER" -printf '%T@ %p\n' 2>/dev/null \
             | sort -rn | cut -d' ' -f2-)
}

# ---- the steps' helper scripts live in $WORK (timeout runs programs, not functions) ----
cat >"$WORK/info.py" <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PYEOF
cat >"$WORK/import_check.py" <<'PYEOF'
import torch
import diffmem
from diffmem import _native
print("diffmem", getattr(diffmem, "__version__", "?"), "from", diffmem.__file__)
print("native available:", _native.AVAILABLE, "load error:", _native.LOAD_ERROR)
if _native.AVAILABLE:
    import diffmem._C as C
    print("_C:", C.__file__)
    print("built with CUDA:", _native.built_with_cuda(), "| CPU kernels:", _native.cpu_kernels())
    for op in ("knn_topk", "optimal_denoise"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"diffmem::{op}", "CUDA")
        print(f"{op}: CUDA kernel compiled in: {has}, used by default: {_native.cuda_enabled(op)}")
raise SystemExit(0 if _native.AVAILABLE and _native.built_with_cuda() else 1)
PYEOF
cat >"$WORK/info.sh" <<'SHEOF'
nvidia-smi || echo "nvidia-smi: not available"
"$PYTHON" "$WORK/info.py"
command -v nvcc && nvcc --version | tail -2
echo "cores: $(nproc)"
exit 0
SHEOF
cat >"$WORK/build.sh" <<'SHEOF'
# a build carried from here (bench/prebuilt.py pack; carry=[..., "carry/prebuilt"]) saves the
# compile when it was made for this torch from these sources and loads here
if [ -f carry/prebuilt/stamp.json ]; then
    "$PYTHON" bench/prebuilt.py install && { echo "prebuilt extension in use: no build"; exit 0; }
    echo "prebuilt extension not usable here: building"
fi
t0=$(date +%s)
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
DIFFMEM_BUILD_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index \
    --disable-pip-version-check -e .
rc=$?
if [ "$rc" -ne 0 ] && [ $(($(date +%s) - t0)) -lt 45 ]; then
    echo "pip failed within 45 s (not a compile error?): python setup.py build_ext --inplace"
    DIFFMEM_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace
    rc=$?
fi
if [ "$rc" -ne 0 ]; then
    # without diffmem._C the optimal denoiser's Python CUDA kernel is not registered either
    echo "CUDA build failed (rc $rc): building the CPU kernels alone, so the optimal kernel can be tested"
    DIFFMEM_BUILD_CUDA=0 "$PYTHON" setup.py build_ext --inplace && exit 3  # 3: CPU-only build
fi
exit $rc
SHEOF
export PYTHON WORK

# ---- the steps, most important first ----------------------------------------------------
run_step info 20 bash "$WORK/info.sh"
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    printf '%-14s %5s %7s  %s\n' build - 0 "skipped: SKIP_BUILD=1" >>"$SUMMARY"
    RC[build]=skipped
else
    run_step build 270 bash "$WORK/build.sh"
fi
run_step import 30 "$PYTHON" "$WORK/import_check.py"
run_step test_knn 90 "$PYTHON" -m pytest tests/test_knn_cuda.py -q -rs -p no:cacheprovider --durations=10
# the kNN bench measures the native CUDA kernel once its tests passed, else the default
# dispatch (the PyTorch path: float64 GEMMs)
CUDA_KNN="${GPU_CHECK_CUDA_KNN:-}"
if [ -z "$CUDA_KNN" ]; then
    if [ "${RC[test_knn]:-x}" = 0 ]; then CUDA_KNN=1; else CUDA_KNN=0; fi
fi
echo "(bench_knn runs with DIFFMEM_CUDA_KNN=$CUDA_KNN)" >>"$SUMMARY"
run_step bench_knn 120 env DIFFMEM_CUDA_KNN="$CUDA_KNN" "$PYTHON" bench/knn.py --device cuda --dtype uint8 \
    --methods diffmem,bare_gemm_int8,cdist_topk --profile
run_step test_optimal 150 "$PYTHON" -m pytest tests/test_optimal_cuda.py -q -rs -p no:cacheprovider --durations=10
echo "(bench_optimal runs with DIFFMEM_CUDA_OPTIMAL=${GPU_CHECK_CUDA_OPTIMAL:-1})" >>"$SUMMARY"
run_step bench_optimal 120 env DIFFMEM_CUDA_OPTIMAL="${GPU_CHECK_CUDA_OPTIMAL:-1}" "$PYTHON" bench/optimal.py \
    --device cuda --data random --floors float16 --sigmas 0.002,1,5,80 --repeat 3 --profile
run_step bench_train 240 "$PYTHON" bench/train_throughput.py --device cuda --warmup 3 --steps 20 --compile-limit 90 \
    --variants fp32_eager,bf16_channels_last,fp32_compile,bf16_channels_last_compile --profile
# tile and chunk sizes of both kernels against their floors (the kNN part needs its tests passed)
TUNE_PARTS=optimal
[ "$CUDA_KNN" = 1 ] && TUNE_PARTS=knn,optimal
run_step tuning 60 "$PYTHON" bench/gpu_tuning.py --device cuda --parts "$TUNE_PARTS"

# ---- collect ---------------------------------------------------------------------------
{
    echo "total $(($(date +%s) - START)) s"
    for step in bench_knn bench_optimal bench_train tuning; do
        [ -f "$LOGS/$step.log" ] || continue
        echo
        echo "---- $step: last lines ----"
        tail -n 30 "$LOGS/$step.log"
    done
    for step in test_knn test_optimal; do
        [ -f "$LOGS/$step.log" ] || continue
        echo
        echo "---- $step: last lines ----"
        tail -n 15 "$LOGS/$step.log"
    done
} >>"$SUMMARY"

JSONS=()
while IFS= read -r f; do JSONS+=("$f"); done < <(find bench/results -maxdepth 1 -name '*.json' -newer "$MARKER" 2>/dev/null | sort)
mkdir -p "$WORK/results"
for f in "${JSONS[@]}"; do cp "$f" "$WORK/results/"; done
cp "$SUMMARY" "$LOG" "$WORK/results/" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$WORK" logs results 2>/dev/null
{
    echo
    echo "JSON records written: ${#JSONS[@]} (all in results.tar.gz)"
    for f in "${JSONS[@]}"; do echo "  $f"; done
} >>"$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
cp "$LOG" "$OUT/gpu_check.log"
copy_records
rm -rf "$WORK"
cat "$OUT/summary.txt"
exit 0
