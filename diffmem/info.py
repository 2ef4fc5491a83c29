"""Which backends diffmem uses here:  python -m diffmem.info"""
from __future__ import annotations

import json
import sys

import torch

from . import __version__, _native


def backends() -> dict:
    cuda_ops = {op: _native.cuda_enabled(op) for op in _native._CUDA_VERIFIED}
    return {
        "diffmem": __version__,
        "torch": torch.__version__,
        "native_extension": _native.AVAILABLE,
        "native_error": _native.LOAD_ERROR,
        "cpu_kernels": _native.cpu_kernels(),
        "built_with_cuda": _native.built_with_cuda(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_kernels_enabled": cuda_ops,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    info = backends()
    if "--json" in sys.argv[1:]:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:22s} {value}")
    if not info["native_extension"]:
        print("-> the PyTorch reference kernels are in use (slower, same results)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
