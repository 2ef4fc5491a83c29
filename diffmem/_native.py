"""Loads the compiled extension diffmem._C, or falls back to the PyTorch references.

`import diffmem` must never fail because of the native build: a missing or unloadable
extension prints one notice line and the pure-PyTorch reference kernels take over.
"""
from __future__ import annotations

import os
import sys

import torch

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.diffmem.*)
except Exception as exc:  # ImportError, or an OSError/undefined symbol from an ABI mismatch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if os.environ.get("DIFFMEM_QUIET") != "1":
        print(
            f"diffmem: native extension unavailable ({LOAD_ERROR}); using the PyTorch reference kernels",
            file=sys.stderr,
        )

AVAILABLE = LOAD_ERROR is None

# CUDA kernels that have never passed their tests on a GPU stay compiled but off: CUDA
# tensors take the PyTorch path unless DIFFMEM_CUDA_KNN=1. Flip the default per op once
# its CUDA tests pass on a GPU (and say which GPU in the README).
_CUDA_VERIFIED = {"knn_topk": False, "optimal_denoise": False}
# Ops whose CUDA kernel is registered from Python (composed of torch/cuBLAS calls), so it
# exists without a CUDA build of the extension: diffmem/optimal_stream.py.
_CUDA_FROM_PYTHON = {"optimal_denoise"}


def built_with_cuda() -> bool:
    return AVAILABLE and bool(torch.ops.diffmem.built_with_cuda())


def cpu_kernels() -> str | None:
    return str(torch.ops.diffmem.cpu_kernels()) if AVAILABLE else None


def cuda_enabled(op: str) -> bool:
    """Whether the native CUDA kernel of `op` is used for CUDA tensors."""
    if not (built_with_cuda() or (AVAILABLE and op in _CUDA_FROM_PYTHON)):
        return False
    flag = os.environ.get("DIFFMEM_CUDA_" + op.split("_")[0].upper())
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "yes", "on")
    return _CUDA_VERIFIED[op]


def use_native(op: str, device: torch.device) -> bool:
    if not AVAILABLE:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_enabled(op)
    return False
