import pathlib
import sys

import pytest

# the repository root, so tests import the bench package whichever test runs first
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffmem  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402


@pytest.fixture(params=["native", "native-generic", "native-avx2", "native-avx512", "native-bf16-emulated",
                        "reference"])
def backend(request, monkeypatch):
    """Runs a test through each implementation: the native op with its default CPU
    kernels, with the portable kernels, with the AVX2 uint8 kernel (the default where
    the CPU lacks AVX-512 VNNI), with the float32 AVX-512 FMA screen (the default where the
    CPU lacks AVX-512 BF16), with the bfloat16 screen on emulated products (its logic on any
    CPU), and the PyTorch reference."""
    monkeypatch.delenv("DIFFMEM_CPU_KERNEL", raising=False)
    if request.param.startswith("native") and not diffmem._native.AVAILABLE:
        pytest.fail(f"native extension failed to load: {diffmem._native.LOAD_ERROR}")
    if request.param == "native-generic":
        monkeypatch.setenv("DIFFMEM_CPU_KERNEL", "generic")
    if request.param == "native-avx2":
        monkeypatch.setenv("DIFFMEM_CPU_KERNEL", "avx2")
        if {"avx2", "fma"} <= cpu_flags():  # else the portable kernel runs: still a valid case
            assert "uint8:avx2-fma-blocked" in diffmem._native.cpu_kernels()
    if request.param == "native-avx512":
        monkeypatch.setenv("DIFFMEM_CPU_KERNEL", "avx512")
        if "avx512f" in cpu_flags():  # else the BLAS screen runs: still a valid case
            assert "float32:avx512-fma" in diffmem._native.cpu_kernels()
    if request.param == "native-bf16-emulated":
        monkeypatch.setenv("DIFFMEM_CPU_KERNEL", "bf16-emulated")
        assert "float32:bf16-screen-emulated" in diffmem._native.cpu_kernels()
    if request.param == "reference":
        monkeypatch.setattr(diffmem._native, "use_native", lambda op, device: False)
    return request.param
