"""Benchmark of exact top-k nearest-neighbour search: diffmem.knn.topk vs baselines.

    python bench/knn.py --help

Prints one table per input dtype and writes a JSON record (see bench/README.md).
Importable too: `from bench import knn; knn.main([...])`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import cli, contention, cpu_peak, kernel_profile, knn_check, knn_data, knn_methods, knn_report, machine

DEFAULT_SIZES = {"cpu": dict(Q=2000, N=10000, d=3072), "cuda": dict(Q=10000, N=50000, d=3072)}
DEFAULT_METHODS = "diffmem,faiss_flat_l2,cdist_topk,cdist_topk_compiled,bare_gemm"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch and faiss threads (default: 2 on CPU, torch's own on CUDA)")
    p.add_argument("--Q", type=cli.positive_int, help="queries (default: CPU 2000, CUDA 10000)")
    p.add_argument("--N", type=cli.positive_int, help="references (default: CPU 10000, CUDA 50000)")
    p.add_argument("--d", type=cli.positive_int, help="row length (default: 3072 = 32x32x3)")
    p.add_argument("--k", type=cli.int_at_least(1, 32), default=2, help="neighbours per query, 1..32 (default: 2)")
    p.add_argument("--dtype", default="uint8,float32",
                   help="comma list of diffmem input dtypes, each a separate run: uint8, "
                        "float32, float64 (the baselines take float32 copies) (default: uint8,float32)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list (default: {DEFAULT_METHODS}); bare_gemm = "
                        "bare_gemm_f32,bare_gemm_int8")
    p.add_argument("--repeat", type=cli.positive_int, default=5,
                   help="timed runs after 1 warm-up; the median is reported (default: 5)")
    p.add_argument("--data", choices=["random", "cifar10"], default="random",
                   help="random uint8 pixels, or CIFAR-10 rows with planted copies "
                        "(default: random)")
    p.add_argument("--data-dir", type=Path, default=knn_data.DEFAULT_DATA_DIR,
                   help="folder with cifar10-train.npz (default: ../shared/data)")
    p.add_argument("--exact-rows", type=cli.nonnegative_int, default=64,
                   help="query rows checked against float64 ground truth, 0 = off (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    cli.add_profile_flag(p, "one call of each method")
    p.add_argument("--out", type=Path,
                   help="JSON path (default: bench/results/knn-<device-slug>.json)")
    args = p.parse_args(argv)
    machine.resolve_device_defaults(args, DEFAULT_SIZES[args.device])
    args.dtypes = [t for t in args.dtype.split(",") if t]
    bad = set(args.dtypes) - set(knn_methods.DTYPES)
    if bad:
        p.error(f"--dtype must be among {', '.join(knn_methods.DTYPES)}, got {sorted(bad)}")
    try:
        args.method_names = knn_methods.expand_names([m for m in args.methods.split(",") if m])
    except ValueError as exc:  # an unknown method: a usage error, not a traceback
        p.error(f"--methods: {exc}")
    return args


def set_threads(n: int | None) -> None:
    """Same thread count for every method. The env var reaches OpenMP runtimes loaded
    later (diffmem's extension is imported lazily); already-loaded ones need the calls."""
    if n is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def default_out(device_slug: str, args: argparse.Namespace) -> Path:
    """Device in the name; non-default data or sizes get a suffix so they never
    overwrite the canonical default-size result."""
    parts = [f"knn-{device_slug}"]
    if args.data != "random":
        parts.append(args.data)
    sizes = DEFAULT_SIZES[args.device]
    parts += [f"{key}{getattr(args, key)}" for key in ("Q", "N", "d")
              if getattr(args, key) != sizes[key]]
    if args.k != 2:
        parts.append(f"k{args.k}")
    return RESULTS_DIR / ("-".join(parts) + ".json")


def sync_for(device: str):
    """Waits for queued GPU work, so a timer around a call measures the call."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


SLOW_CALL_S = 5.0  # a method whose warm-up call takes longer gets one timed call


def time_calls(run, repeat: int, sync, slow_s: float = SLOW_CALL_S) -> tuple[tuple, list[float]]:
    """One warm-up call (lazy init, caches, allocator), then `repeat` timed calls; only one
    when the warm-up took over `slow_s` (a slow baseline at a large size: the spread of such
    long calls is small, the machine time is not). The record keeps every time, so the
    number of samples shows."""
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    if time.perf_counter() - t0 > slow_s:
        repeat = min(repeat, 1)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return out, times


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(name: str, inp: knn_methods.Inputs, dtype: str, repeat: int, sync, profile: bool = False):
    """Build and time one method (and, with `profile`, profile one more call of it); a
    method that cannot run is recorded as skipped."""
    t0 = time.perf_counter()
    try:
        method = knn_methods.BUILDERS[name](inp, dtype)
        with contention.OtherLoad() as load:
            out, times = time_calls(method.run, repeat, sync)
        profiled = kernel_profile.profile_call(method.run, inp.device, sync) if profile else None
    except knn_methods.Skipped as exc:
        _log(f"  {name}: skipped ({exc})")
        return {"skipped": str(exc)}, None
    except Exception as exc:  # a broken method must not hide the others' results
        _log(f"  {name}: failed ({type(exc).__name__}: {exc})")
        return {"skipped": f"failed: {type(exc).__name__}: {exc}"[:500]}, None
    Q, N, d = inp.shape
    median = statistics.median(times)
    _log(f"  {name}: {median:.4f} s median ({time.perf_counter() - t0:.1f} s incl. setup)")
    r = {"median_s": median, "min_s": min(times), "times_s": times,
         "gmac_per_s": Q * N * d / median / 1e9, "other_cpu_load": load.fraction,
         "computes_in": method.computes_in, "note": method.note}
    if profiled is not None:
        r["profile"] = profiled
        _log(f"  {name} profile: {kernel_profile.summary(profiled)}")
    return r, out


def check(results: dict, outputs: dict, exact: knn_check.ExactSample | None) -> None:
    """Fill in cross-checks: vs diffmem (or the first method with neighbours) and vs truth."""
    with_nbrs = [n for n, o in outputs.items() if o is not None and o[0] is not None]
    ref = "diffmem" if "diffmem" in with_nbrs else (with_nbrs[0] if with_nbrs else None)
    for name in with_nbrs:
        dist, idx = outputs[name]
        if ref and name != ref:
            results[name]["vs_diffmem"] = {"reference": ref,
                                           **_safe(knn_check.versus, dist, idx, *outputs[ref])}
        if exact is not None:
            results[name]["exact_sample"] = _safe(exact.check, dist, idx)


def _safe(check_fn, *args) -> dict:
    """A malformed result is reported as such rather than losing the whole run's record."""
    try:
        return check_fn(*args)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def add_ratios(results: dict, device: str, dtype: str) -> None:
    base = results.get("diffmem", {}).get("median_s")
    for name, r in results.items():
        if "median_s" in r and base:
            r["ratio_vs_diffmem"] = r["median_s"] / base
        target = knn_report.target_for(device, dtype, name)
        if target:
            r["target"] = target.evaluate(r.get("ratio_vs_diffmem"))


def run_dtype(inp, dtype: str, args, exact, progress=None) -> dict:
    """Every method on one input dtype; progress(results so far, with their ratios) after
    each method, so that a run cut short keeps what it measured."""
    _log(f"dtype {dtype}:")
    sync = sync_for(args.device)
    results, outputs = {}, {}
    for name in args.method_names:
        results[name], outputs[name] = measure(name, inp, dtype, args.repeat, sync, args.profile)
        if progress is not None:
            partial = {n: dict(r) for n, r in results.items()}
            add_ratios(partial, args.device, dtype)
            progress(partial)
    check(results, outputs, exact)
    add_ratios(results, args.device, dtype)
    if results.get("diffmem", {}).get("median_s") is not None:  # diffmem ran
        screen = screen_summary(inp, dtype)
        if screen is not None:
            results["diffmem"]["screen"] = screen
    return results


def screen_summary(inp, dtype: str) -> dict | None:
    """How much the float CPU search left for its exact re-rank on these data (refs a query,
    from torch.ops.diffmem.knn_screen_counts; -1 marks a query screened again): the part of
    its work that grows when the screen's bound is loose. None where it does not apply."""
    if dtype == "uint8" or inp.device.type != "cpu":
        return None
    try:
        import diffmem
    except ImportError:
        return None
    if not diffmem._native.AVAILABLE:
        return None
    q, r = inp.for_dtype(dtype)
    counts = torch.ops.diffmem.knn_screen_counts(q, r, inp.k)
    kept = counts[counts >= 0].double()
    return {
        "screen": diffmem._native.cpu_kernels().split()[-1],
        "refs_per_query_mean": float(kept.mean()) if kept.numel() else None,
        "refs_per_query_median": float(kept.median()) if kept.numel() else None,
        "refs_per_query_max": int(kept.max()) if kept.numel() else None,
        "queries_screened_again": int((counts < 0).sum()),
    }


def _reference_note(results: dict) -> str:
    """Says which method the 'idx differ' / 'max rel err' columns compare against."""
    refs = {r["vs_diffmem"].get("reference") for r in results.values() if "vs_diffmem" in r}
    refs.discard("diffmem")
    return f"\n(diffmem absent: cross-check columns compare with {refs.pop()})" if refs else ""


def environment(args, device_name: str) -> dict:
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": machine.git_commit(),
        "git_dirty": machine.git_dirty(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # other work on the machine skews timings; this records whether there was any
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": {"type": args.device, "name": device_name, "threads": args.threads},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if args.device == "cuda" else None,
        "numpy": np.__version__,
        "faiss": machine.faiss_info(),
        "diffmem": machine.diffmem_info(),
    }


def _cpu_peak(args, isa: str) -> dict | None:
    """The CPU's measured multiply-add peak at the benchmark's thread count on `isa`, the
    bound to read the GMAC/s column against (bench/cpu_peak.py); None on CUDA."""
    if args.device != "cpu":
        return None
    threads = torch.get_num_threads()  # set from --threads by now
    try:
        peak = cpu_peak.measure(threads, isa)
    except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"(no CPU peak: {exc})")
        return {"error": str(exc)}
    gmacs = peak[f"gmacs_{threads}t"]
    print(f"CPU {isa} multiply-add peak: {gmacs:.1f} GMAC/s ({peak['lanes']} lanes, bench/cpu_peak.py)")
    return {**peak, "gmacs": gmacs}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    set_threads(args.threads)
    device_name = machine.device_name(args.device, args.threads)
    out_path = args.out or default_out(machine.slug(f"{args.device} {device_name}"), args)
    env = environment(args, device_name)  # first, so the load average predates our own work

    try:
        queries, refs, data_info = knn_data.load(args.data, args.Q, args.N, args.d, args.seed,
                                                 args.data_dir)
    except (OSError, ValueError) as exc:  # missing or too small data set: say so, no traceback
        sys.exit(f"error: {exc}")
    inp = knn_methods.Inputs(queries, refs, args.k, args.device)
    exact = (knn_check.ExactSample(queries, refs, args.k, args.exact_rows, args.seed)
             if args.exact_rows > 0 else None)

    record = {**env, "data": data_info, "cpu_fma_peak": _cpu_peak(args, "avx512" if machine.has_avx512() else "avx2"),
              # the float32 search screens with bfloat16 dot products where the CPU has them
              "cpu_bf16_peak": _cpu_peak(args, "avx512bf16") if machine.has_avx512_bf16() else None,
              "shapes": {"Q": args.Q, "N": args.N, "d": args.d}, "k": args.k,
              "dtypes": args.dtypes, "repeat": args.repeat, "notes": knn_report.NOTES,
              "runs": {}}
    for dtype in args.dtypes:
        def partial(results, dtype=dtype):
            knn_report.write_json({**record, "runs": {**record["runs"], dtype: results}}, out_path, complete=False)
        record["runs"][dtype] = run_dtype(inp, dtype, args, exact, progress=partial)
        title = (f"\n== {dtype} input | Q={args.Q} N={args.N} d={args.d} k={args.k} | "
                 f"{device_name} | {args.data} data ==")
        print(knn_report.table(title + _reference_note(record["runs"][dtype]),
                               record["runs"][dtype]), flush=True)
    knn_report.write_json(record, out_path)
    print(f"\nwrote {out_path}")
    return record


if __name__ == "__main__":
    sys.exit(cli.run_main("knn", main))
