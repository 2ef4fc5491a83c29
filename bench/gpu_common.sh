# Sourced by the GPU-session scripts (gpu_check.sh, gpu_optimal_full.sh,
# gpu_emm_reproduction.sh): the repository root as the working directory, $OUT (the device
# tool's output folder; ./gpu-out where it is unset), $PYTHON (python3), unbuffered Python
# output, and the tree's diffmem first on the path (also when no install step ran).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

gpu_line() {
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
}
