#!/usr/bin/env bash
# Issue 4's GPU run: bench/emm_reproduction.py --scale gpu (16x16 vs 8x8 CIFAR-10, |D| 20..400,
# 5 settings, 25 trainings, 4 at a time on the one GPU). Prepare the data once, here:
#
#     python bench/carry_data.py head ../shared/data/cifar10-train.npz --rows 5000 --out carry/cifar10-train-5000.npz
#
# then, on the GPU machine:
#
#     run(command="bash bench/gpu_emm_reproduction.sh", carry=["carry/cifar10-train-5000.npz"], timeout_s=600)
#
# Training needs no native build (pure PyTorch; the kNN scoring falls back to the PyTorch
# reference on CUDA without one). The sweep stops itself after LIMIT_S (540 s) and resumes
# where it stopped when the same command runs again while the machine is warm (runs/ stays
# there 30 s after a call). Output in $OUT: the JSON record and its figure (copy both into
# bench/results/), the run log, and sweep.tar.gz (summary, tables, report, per-run logs).
#
# Knobs: LIMIT_S (540), JOBS (4), PYTHON (python3).

set -u
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
DATA="$ROOT/carry/cifar10-train-5000.npz"
SWEEP="$ROOT/runs/reproduction-gpu"
MARKER="$(mktemp)"  # records newer than this are this run's: bench/results/emm-reproduction-<gpu>.{json,png}

gpu_line
[ -f "$DATA" ] || { echo "no $DATA: carry it (see the header)"; exit 1; }
# SIGTERM first: the sweep checkpoints its running jobs, so a rerun resumes them.
timeout -k 30 "${LIMIT_S:-540}" "$PYTHON" bench/emm_reproduction.py --scale gpu --devices 0 --jobs "${JOBS:-4}" \
    --data "$DATA" --outdir "$SWEEP" 2>&1 | tee "$OUT/emm_reproduction.log"
rc=${PIPESTATUS[0]}
echo "exit code $rc$([ "$rc" = 124 ] && echo ': stopped at LIMIT_S; run the same command again to resume')"
[ "$rc" = 124 ] && rc=0  # a clean stop (checkpointed), not a failure: the device tool would report it as timed out
find bench/results -maxdepth 1 -name 'emm-reproduction-*' -newer "$MARKER" -exec cp {} "$OUT/" \;
# the sweep's own files, without checkpoints and snapshots (large, and rebuilt on a rerun)
[ -d "$SWEEP" ] && tar -czf "$OUT/sweep.tar.gz" -C "$(dirname "$SWEEP")" --exclude='*.pt' \
    "$(basename "$SWEEP")"
ls -la "$OUT"
exit "$rc"
