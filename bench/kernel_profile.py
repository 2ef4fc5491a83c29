"""Where one call's time goes: torch.profiler over a single call, its kernels (CUDA) or
ops (CPU) summed by self time into GEMMs (and convolutions), compiled (fused elementwise)
kernels and the rest, with the busiest ones by name and the call's wall time beside them (the gap is time
the device waited: host syncs, launches). A benchmark's ratio says whether a target is
met; this says which part to work on.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

# kernel or op names of matrix products (and convolutions, the same tensor-core work in a
# training step): cuBLAS/cuBLASLt kernels on Hopper ("nvjet", "sm90_xmma", CUTLASS-based
# ones), cuDNN's, and the aten ops the CPU shows
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "cudnn", "fprop", "dgrad", "wgrad",
                "aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::baddbmm", "convolution")
# Inductor's generated kernels: Triton on CUDA, C++ on the CPU
COMPILED_MARKERS = ("triton_", "cpp_fused", "Torch-Compiled Region", "CompiledFunction")
TOP = 15


def category(name: str) -> str:
    if any(m in name for m in COMPILED_MARKERS):
        return "compiled"
    if any(m in name.lower() for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def profile_call(fn, device: torch.device, sync=lambda: None) -> dict:
    """One profiled call of fn() (warmed up beforehand by the caller): self time per
    category in microseconds, the TOP busiest names, and the call's wall time. A profiler
    that cannot run here (no CUPTI, say) gives {"error": ...}: the timings it accompanies
    stand without it."""
    try:
        return _profile_call(fn, device, sync)
    except (RuntimeError, AssertionError) as exc:
        return {"device": device.type, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _profile_call(fn, device: torch.device, sync) -> dict:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    rows = []
    for ev in prof.key_averages():
        if cuda:
            if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.self_device_time_total
        else:
            us = ev.self_cpu_time_total
        if us > 0:
            rows.append((ev.key, ev.count, float(us)))
    by_category = {"gemm": 0.0, "compiled": 0.0, "other": 0.0}
    for name, _, us in rows:
        by_category[category(name)] += us
    rows.sort(key=lambda r: -r[2])
    total = sum(by_category.values())
    return {"device": device.type, "wall_us": wall * 1e6, "self_us_total": total,
            "self_us_by_category": by_category,
            "note": ("CUDA kernels' self time; wall - total is time the GPU had no kernel running"
                     if cuda else "CPU ops' self time (profiler overhead included)"),
            "top": [{"name": name[:160], "count": count, "self_us": us, "category": category(name)}
                    for name, count, us in rows[:TOP]]}


def summary(p: dict) -> str:
    if "error" in p:
        return f"not profiled ({p['error']})"
    cats = p["self_us_by_category"]
    return (f"wall {p['wall_us'] / 1e3:.2f} ms: gemm {cats['gemm'] / 1e3:.2f}, compiled {cats['compiled'] / 1e3:.2f}, "
            f"other {cats['other'] / 1e3:.2f} ms")
