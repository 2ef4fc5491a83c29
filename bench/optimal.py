"""Benchmark of the closed-form optimal denoiser: diffmem.optimal.denoise vs baselines.

    python bench/optimal.py --help
    python bench/optimal.py --device cuda      # B=512, N=50,000, d=3,072: issue 5's GPU target

Queries are noisy training images x = y + sigma n (what a sampler feeds the denoiser), one
run per sigma and training-set dtype. Baselines, measured in the same run:
  reference  the dense formulation: torch.cdist, softmax, matmul, all float32 (B x N in memory)
  bare_gemm  two bare float32 torch.mm, (B x d) @ (d x N) and (B x N) @ (N x d): the floor
             of any method that touches every (query, item) pair twice
Each method's relative error of D against float64 is recorded beside its time. Memory:
peak RSS growth of one call in a fresh process (peak reset just before the call through
/proc/self/clear_refs), at N and at --memory-N.

--device cuda: every tensor on the GPU, calls timed between torch.cuda.synchronize()
(median of --repeat after one warm-up, which also compiles the CUDA path's fused stages),
TF32 off for all float32 matmuls (recorded). The floor is measured in float16 (tensor-core
products with float32 results), float32 and float64 (bare_gemm_float16/32/64), and as one
int8 product (torch._int_mm) plus one float16 one (bare_gemm_int8_float16); the record
names, per training dtype, the one in the precisions the op computes in ("floor_by_dtype"):
float64 where diffmem takes the PyTorch reference (the CUDA kernel is off until verified:
diffmem._native; set DIFFMEM_CUDA_OPTIMAL=1 to measure it); for the CUDA kernel
(diffmem/optimal_stream.py) int8 + float16 on uint8 training sets (its logits run on int8
tensor cores there), float16 otherwise. Memory: torch.cuda.max_memory_allocated() growth of one call at N and
at --memory-N (default N / 4). The float64 truth is computed on the GPU. Targets (issue
5, judged at the default sizes): reference / diffmem >= 5 and diffmem / floor <= 2.
--profile: one profiled call of diffmem and of its floor per run besides
(bench/kernel_profile.py: time in GEMMs, compiled kernels and the rest).
Prints a table and writes a JSON record (command, commit, device, versions, shapes,
dtypes, median times, ratios); see bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import cli, contention, kernel_profile, knn_data, knn_report, machine
from bench.knn import environment, set_threads, time_calls

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIGMAS = "0.002,0.1,1,5,10,80"
DEFAULT_SIZES = {"cpu": dict(B=64, N=5000, d=3072, memory_N=20000),
                 "cuda": dict(B=512, N=50000, d=3072, memory_N=12500)}
# issue 5's GPU target: (method, metric, op, value) as bench.knn_report.Target reads them;
# "floor" is the bare GEMM in the precision the op computes in
CUDA_TARGETS = (("reference", "method/diffmem", ">=", 5.0), ("floor", "diffmem/method", "<=", 2.0))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch threads (default: 2 on CPU, torch's own on CUDA)")
    p.add_argument("--B", type=cli.positive_int, help="queries (default: CPU 64, CUDA 512)")
    p.add_argument("--N", type=cli.positive_int, help="training items (default: CPU 5000, CUDA 50000)")
    p.add_argument("--d", type=cli.positive_int, help="row length (default: 3072 = 32x32x3)")
    p.add_argument("--sigmas", type=cli.number_list(float, 0.0, strict=True), default=DEFAULT_SIGMAS,
                   help=f"comma list, each > 0 (default: {DEFAULT_SIGMAS})")
    p.add_argument("--dtype", default="uint8,float32", help="training-set dtypes (default: uint8,float32)")
    p.add_argument("--repeat", type=cli.positive_int, default=5, help="timed runs after 1 warm-up (default: 5)")
    p.add_argument("--floors", default=",".join(f.removeprefix("bare_gemm_") for f in CUDA_FLOORS),
                   help="CUDA: the bare-GEMM floors to time, comma list of float16,float32,float64,int8_float16 (default: "
                        "all); the floor of the precision the op computes in is always timed")
    p.add_argument("--data", choices=["random", "cifar10"], default="cifar10",
                   help="training rows: CIFAR-10 (default) or random uint8 pixels")
    p.add_argument("--data-dir", type=Path, default=knn_data.DEFAULT_DATA_DIR)
    p.add_argument("--memory-N", type=cli.positive_int,
                   help="second N of the memory check (default: CPU 20000, CUDA 12500)")
    p.add_argument("--seed", type=int, default=0)
    cli.add_profile_flag(p, "one call of diffmem and of its floor per run")
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/optimal-<device>.json; "
                                            "non-default sizes get a suffix)")
    args = p.parse_args(argv)
    machine.resolve_device_defaults(args, DEFAULT_SIZES[args.device])
    if args.B > args.N:
        p.error(f"--B ({args.B}) must not exceed --N ({args.N}): queries are noisy training rows")
    args.dtypes = [t for t in args.dtype.split(",") if t]
    args.floor_names = [f"bare_gemm_{f}" for f in args.floors.split(",") if f]
    bad = set(args.floor_names) - set(CUDA_FLOORS)
    if bad:
        p.error(f"--floors must be among float16,float32,float64,int8_float16, got {sorted(f.removeprefix('bare_gemm_') for f in bad)}")
    bad = set(args.dtypes) - {"uint8", "float32"}
    if bad:
        p.error(f"--dtype must be uint8 and/or float32, got {sorted(bad)}")
    return args


def default_out(args, device_name: str) -> Path:
    """bench/results/optimal-<device>.json; sizes other than the device's defaults get a
    suffix so a small run never overwrites the default-size record."""
    parts = [f"optimal-{machine.slug(args.device + ' ' + device_name)}"]
    parts += [f"{key.replace('_', '')}{getattr(args, key)}" for key, value in DEFAULT_SIZES[args.device].items()
              if getattr(args, key) != value]
    return RESULTS_DIR / ("-".join(parts) + ".json")


def load_rows(args) -> tuple[np.ndarray, dict]:
    """N uint8 training rows (CIFAR-10 falls back to random pixels when absent)."""
    if args.data == "cifar10":
        try:
            _, refs, info = knn_data.load("cifar10", 0, max(args.N, args.memory_N), args.d, args.seed, args.data_dir)
            return refs, info
        except (OSError, ValueError) as exc:
            print(f"cifar10 unavailable ({exc}); using random pixels", file=sys.stderr)
    _, refs, info = knn_data.load("random", 1, max(args.N, args.memory_N), args.d, args.seed)
    return refs, info


def float64_truth(x: torch.Tensor, y64: torch.Tensor, sigma: float) -> torch.Tensor:
    """D in float64. Squared distances by the expansion in float64: its error (~1e-11 for
    CIFAR rows) moves logits by < 1e-5 even at sigma = 0.002, far below what is measured,
    and it needs no B x N x d temporary."""
    x = x.double()
    sq = (x * x).sum(1, keepdim=True) + (y64 * y64).sum(1) - 2 * x @ y64.T
    return torch.softmax(-sq.clamp_min(0) / (2 * sigma**2), 1) @ y64


def rel_err(D: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((D.double() - truth).norm(dim=1) / truth.norm(dim=1)).max())


CPU_FLOORS = {"bare_gemm": torch.float32}
CUDA_FLOORS = {"bare_gemm_float16": torch.float16, "bare_gemm_float32": torch.float32,
               "bare_gemm_float64": torch.float64, "bare_gemm_int8_float16": "int8+float16"}
# the streaming CUDA kernel's products: int8 logits and float16 weights for uint8 training
# sets, float16 for both otherwise
STREAM_FLOORS = {"uint8": "bare_gemm_int8_float16"}


def _no_sync() -> None:
    pass


def methods(x, train, y32, sigma, *, floors=None, y64=None):
    """name -> call. `floors`: name -> dtype of the two bare torch.mm (default: CPU_FLOORS);
    a float64 floor needs y64."""
    from diffmem import optimal, optimal_stream

    floors = CPU_FLOORS if floors is None else floors
    gen = torch.Generator(device=x.device).manual_seed(1)
    # any dense weights: the floor's second product
    W = torch.softmax(torch.randn(x.shape[0], y32.shape[0], generator=gen, device=x.device), 1)

    def reference():
        d2 = torch.cdist(x, y32) ** 2
        return torch.softmax(-d2 / (2 * sigma**2), 1) @ y32

    def bare_gemm(a, y, w):
        # float16: the tensor-core products the streaming CUDA path makes, float32 results
        mm = optimal_stream.mm_f16_f32 if a.dtype == torch.float16 else torch.mm

        def run():
            mm(a, y.T)
            return mm(w, y)
        return run

    def bare_int8_float16(y):
        # the first product on int8 tensor cores, shaped as the kernel shapes it (x's first
        # int8 term; rows y * 127.5 - 0.5 = v - 128 for pixels), the second in float16 with
        # float32 results
        R, d8 = optimal_stream.int8_shapes(*x.shape)
        x8 = optimal_stream.int8_terms(x.double(), R, d8)[0][0]
        p8 = optimal_stream.int8_padded((y * 127.5 - 0.5).round().clamp(-128, 127).to(torch.int8), d8)
        y16, w16 = y.half(), W.half()

        def run():
            optimal_stream.mm_i8_i32(x8, p8.T)
            return optimal_stream.mm_f16_f32(w16, y16)
        return run

    out = {"diffmem": lambda: optimal.denoise(x, sigma, train), "reference": reference}
    for name, dtype in floors.items():
        if dtype == "int8+float16":
            out[name] = bare_int8_float16(y32)
            continue
        y = y32 if dtype in (torch.float32, torch.float16) else y64
        y = y.to(dtype)
        out[name] = bare_gemm(x.to(dtype), y, W.to(dtype))
    return out


def run_one(x, train, y32, y64, sigma, repeat, *, floors=None, sync=_no_sync, measure_load=True,
            profile=()) -> dict:
    """Times every method (median of `repeat` after a warm-up, `sync` around each call) and
    records its relative error against the float64 truth (computed on x's device); the
    methods named in `profile` also get one profiled call (bench/kernel_profile.py)."""
    truth = float64_truth(x, y64, sigma)
    res = {}
    for name, fn in methods(x, train, y32, sigma, floors=floors, y64=y64).items():
        with contention.OtherLoad() if measure_load else contextlib.nullcontext() as load:
            out, times = time_calls(fn, repeat, sync)
        r = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
             "other_cpu_load": load.fraction if measure_load else None}
        if not name.startswith("bare_gemm"):
            r["rel_err_vs_float64"] = rel_err(out, truth)
        if name in profile:  # after the timed calls: warm, and its overhead in no timing
            r["profile"] = kernel_profile.profile_call(fn, x.device, sync)
        res[name] = r
        del out
    base = res["diffmem"]["median_s"]
    for r in res.values():
        r["ratio_vs_diffmem"] = r["median_s"] / base
    return res


# ---- the device (CUDA) run: every tensor on one device, timed between syncs --------------


def diffmem_path(device: torch.device) -> dict:
    """Which implementation diffmem.optimal.denoise takes on `device`, and the precision
    it computes in there (float32 input): the native CPU op computes in float32 (float64
    logits where needed), the CUDA kernel (diffmem/optimal_stream.py) in float16 tensor-core
    products with float32 accumulation, the PyTorch reference in float64."""
    from diffmem import _native

    native = _native.use_native("optimal_denoise", device)
    computes_in = ("float16" if device.type == "cuda" else "float32") if native else "float64"
    info = {"path": ("stream" if device.type == "cuda" else "native") if native else "reference",
            "computes_in": computes_in,
            "native_available": _native.AVAILABLE, "load_error": _native.LOAD_ERROR,
            "env_DIFFMEM_CUDA_OPTIMAL": os.environ.get("DIFFMEM_CUDA_OPTIMAL")}
    if _native.AVAILABLE:
        info["built_with_cuda"] = _native.built_with_cuda()
        try:
            info["cuda_kernel_registered"] = bool(torch._C._dispatch_has_kernel_for_dispatch_key(
                "diffmem::optimal_denoise", "CUDA"))
        except Exception as exc:  # private API: its absence must not stop the benchmark
            info["cuda_kernel_registered"] = f"unknown ({type(exc).__name__})"
    return info


@contextlib.contextmanager
def tf32_off():
    """float32 matmuls (torch.mm, torch.cdist's mm path) in full float32, restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield tf32_setting()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def tf32_setting() -> dict:
    matmul = torch.backends.cuda.matmul
    return {"cuda_matmul_allow_tf32": matmul.allow_tf32,
            "cuda_matmul_fp32_precision": getattr(matmul, "fp32_precision", None),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def memory_growth(call, stats, sync) -> int:
    """Bytes of device memory one call allocates beyond what was allocated before it
    (peak), with `stats` = torch.cuda (reset_peak_memory_stats, memory_allocated,
    max_memory_allocated)."""
    sync()
    stats.reset_peak_memory_stats()
    before = stats.memory_allocated()
    out = call()
    sync()
    peak = stats.max_memory_allocated()
    del out
    return int(peak - before)


def device_memory_check(x, trains: dict, stats, sync) -> dict:
    """max_memory_allocated growth of one denoise call (sigma = 1) for each N -> train."""
    from diffmem import optimal

    B = x.shape[0]
    first = next(iter(trains.values()))
    optimal.denoise(x[:1], 1.0, first[:8])  # lazy initialization outside the measurement
    out = {}
    for N, train in trains.items():
        growth = memory_growth(lambda: optimal.denoise(x, 1.0, train), stats, sync)
        out[f"N{N}"] = {"peak_allocated_growth_bytes": growth, "dense_B_by_N_float32_bytes": B * N * 4}
    return out


def add_targets(res: dict, dtype: str, floor: str) -> None:
    """Issue 5's GPU targets on one run (ratios measured in the same run)."""
    res["targets"] = []
    for method, metric, op, value in CUDA_TARGETS:
        name = floor if method == "floor" else method
        target = knn_report.Target("cuda", dtype, name, metric, op, value)
        res["targets"].append(target.evaluate(res.get(name, {}).get("ratio_vs_diffmem")))


def device_record(args, device: torch.device, *, sync=_no_sync, stats=None, log=None, progress=None) -> dict:
    """The --device cuda measurements on `device`: runs, memory, path and settings. Written
    for CUDA; it runs on any device (a test drives it on the CPU with tiny sizes and a
    stand-in for torch.cuda's memory statistics). progress(record) is called after every
    measurement with the record so far."""
    progress = progress or (lambda record: None)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    stats = stats if stats is not None else torch.cuda
    rows, data_info = load_rows(args)
    gen = torch.Generator().manual_seed(args.seed)
    u8_all = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
    u8 = u8_all[: args.N]
    y64 = u8.double() / 127.5 - 1.0
    y32 = y64.float()
    pick = torch.randperm(args.N, generator=gen)[: args.B]
    y_pick = y64[pick.to(device)].cpu()
    path = diffmem_path(device)
    floor = f"bare_gemm_{path['computes_in']}"
    floor_by_dtype = {dtype: STREAM_FLOORS.get(dtype, floor) if path["path"] == "stream" else floor
                      for dtype in args.dtypes}
    floors = {f: CUDA_FLOORS[f] for f in CUDA_FLOORS if f in args.floor_names or f in floor_by_dtype.values()}
    record = {"data": data_info, "shapes": {"B": args.B, "N": args.N, "d": args.d},
              "dtypes": args.dtypes, "sigmas": args.sigmas, "repeat": args.repeat,
              "queries": "x = y + sigma n for B random training rows y, float32",
              "diffmem_path": path, "floor": floor, "floor_by_dtype": floor_by_dtype, "floors": list(floors),
              "floor_note": f"floor_by_dtype: the bare GEMMs in the precision the op computes in "
                            f"({path['computes_in']}, {path['path']} path; the stream path's logits of uint8 "
                            "training sets on int8 tensor cores: one bare torch._int_mm and one float16 "
                            "product, bare_gemm_int8_float16)",
              "targets_note": "issue 5 (GPU, B=512, N=50,000, d=3,072): reference/diffmem >= 5, "
                              "diffmem/floor <= 2; other sizes are indicative only",
              "runs": {}, "memory": {}}
    with tf32_off() as tf32:
        record["tf32"] = tf32
        for dtype in args.dtypes:
            train = u8 if dtype == "uint8" else y32
            record["runs"][dtype] = {}
            for sigma in args.sigmas:
                noise = torch.randn(args.B, args.d, generator=gen, dtype=torch.float64)
                x = (y_pick + sigma * noise).float().to(device)
                log(f"{dtype} sigma={sigma}")
                res = run_one(x, train, y32, y64, sigma, args.repeat, floors=floors, sync=sync,
                              measure_load=False,
                              profile=("diffmem", floor_by_dtype[dtype]) if args.profile else ())
                add_targets(res, dtype, floor_by_dtype[dtype])
                record["runs"][dtype][str(sigma)] = res
                log(f"{dtype} sigma={sigma}: diffmem {res['diffmem']['median_s']:.4f} s, "
                    f"reference {res['reference']['median_s']:.4f} s, {floor_by_dtype[dtype]} "
                    f"{res[floor_by_dtype[dtype]]['median_s']:.4f} s")
                progress(record)
        del y64
        x = (y_pick + 0.5 * torch.randn(args.B, args.d, generator=gen, dtype=torch.float64)).float().to(device)
        for dtype in args.dtypes:
            sizes = sorted({args.N, args.memory_N})
            if dtype == "uint8":
                trains = {N: u8_all[:N] for N in sizes}
            else:
                y32_all = y32 if args.memory_N <= args.N else u8_all.float() / 127.5 - 1.0
                trains = {N: y32_all[:N] for N in sizes}
            record["memory"][dtype] = device_memory_check(x, trains, stats, sync)
            del trains
    passes = [t["pass"] for per_sigma in record["runs"].values() for r in per_sigma.values() for t in r["targets"]]
    record["targets_all_pass"] = None if None in passes else all(passes)
    return record


def device_table(record: dict) -> str:
    floors = record["floors"]
    floor_by_dtype = record["floor_by_dtype"]
    floor_text = ", ".join(f"{dtype}: {f}" for dtype, f in floor_by_dtype.items())
    lines = [f"diffmem path: {record['diffmem_path']['path']} (computes in {record['diffmem_path']['computes_in']}); "
             f"floor = {floor_text}; TF32 matmul {'on' if record['tf32']['cuda_matmul_allow_tf32'] else 'off'}",
             f"{'train':8} {'sigma':>7} {'diffmem s':>10} {'reference s':>12} "
             + " ".join(f"{f.replace('bare_gemm_', 'gemm ') + ' s':>12}" for f in floors)
             + f" {'ref/diffmem':>11} {'diffmem/flr':>11} {'err diffmem':>11} {'err ref':>9} {'targets':>8}"]
    for dtype, per_sigma in record["runs"].items():
        floor = floor_by_dtype[dtype]
        for sigma, r in per_sigma.items():
            dm, ref = r["diffmem"], r["reference"]
            verdict = ["-" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL") for t in r["targets"]]
            lines.append(f"{dtype:8} {sigma:>7} {dm['median_s']:10.4f} {ref['median_s']:12.4f} "
                         + " ".join(f"{r[f]['median_s']:12.4f}" for f in floors)
                         + f" {ref['ratio_vs_diffmem']:11.2f} {dm['median_s'] / r[floor]['median_s']:11.2f} "
                         f"{dm['rel_err_vs_float64']:11.1e} {ref['rel_err_vs_float64']:9.1e} {'/'.join(verdict):>8}")
    lines.append("targets: " + ", ".join(f"{m}: {metric} {op} {v:g}"
                                         for m, metric, op, v in CUDA_TARGETS)
                 + f" -> all pass: {record['targets_all_pass']}")
    lines += profile_lines(record)
    for dtype, mem in record["memory"].items():
        for key, r in mem.items():
            lines.append(f"memory {dtype} {key}: peak allocated +{r['peak_allocated_growth_bytes'] / 2**20:.1f} MB "
                         f"(dense B x N float32 would be {r['dense_B_by_N_float32_bytes'] / 2**20:.1f} MB)")
    return "\n".join(lines)


def profile_lines(record: dict) -> list[str]:
    """One line per profiled method and run (--profile)."""
    return [f"profile {dtype} sigma={sigma} {name}: {kernel_profile.summary(r['profile'])}"
            for dtype, per_sigma in record["runs"].items() for sigma, run in per_sigma.items()
            for name, r in run.items() if "profile" in r]


_MEMORY_CHILD = """
import json, numpy as np, torch
torch.set_num_threads({threads})
from diffmem import optimal

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

rows = np.load({path!r}, mmap_mode="r")[:{N}]
train = torch.from_numpy(np.array(rows)){to_float}  # a resident copy: memmap pages would count as growth
x = train[:{B}].float() / (127.5 if train.dtype == torch.uint8 else 1.0) - (1.0 if train.dtype == torch.uint8 else 0.0)
x = (x + 0.5 * torch.randn_like(x)).contiguous()
optimal.denoise(x[:1], 1.0, train[:8])  # load the libraries
before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
optimal.denoise(x, 1.0, train)
peak = status_kb("VmHWM")
print(json.dumps({{"peak_rss_growth_bytes": (peak - before) * 1024}}))
"""


def memory_check(args, dtype: str, tmp: Path) -> dict:
    """Peak RSS growth of one denoise call in a fresh process, for N and memory_N."""
    out = {}
    for N in (args.N, args.memory_N):
        code = _MEMORY_CHILD.format(threads=args.threads, path=str(tmp), N=N, B=args.B,
                                    to_float=".float() / 127.5 - 1.0" if dtype == "float32" else "")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                   "DIFFMEM_QUIET": "1"})
        if proc.returncode != 0:
            out[f"N{N}"] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["dense_B_by_N_float32_bytes"] = args.B * N * 4
        out[f"N{N}"] = r
    return out


def table(record: dict) -> str:
    lines = [f"{'train':8} {'sigma':>7} {'diffmem s':>10} {'reference s':>12} {'bare_gemm s':>12} "
             f"{'ref/diffmem':>11} {'diffmem/gemm':>12} {'err diffmem':>11} {'err ref':>9}"]
    for dtype, per_sigma in record["runs"].items():
        for sigma, r in per_sigma.items():
            dm, ref, gemm = r["diffmem"], r["reference"], r["bare_gemm"]
            lines.append(f"{dtype:8} {sigma:>7} {dm['median_s']:10.4f} {ref['median_s']:12.4f} "
                         f"{gemm['median_s']:12.4f} {ref['ratio_vs_diffmem']:11.2f} "
                         f"{dm['median_s'] / gemm['median_s']:12.2f} {dm['rel_err_vs_float64']:11.1e} "
                         f"{ref['rel_err_vs_float64']:9.1e}")
    lines += profile_lines(record)
    for dtype, mem in record["memory"].items():
        for key, r in mem.items():
            if "peak_rss_growth_bytes" in r:
                lines.append(f"memory {dtype} {key}: peak RSS +{r['peak_rss_growth_bytes'] / 2**20:.1f} MB "
                             f"(dense B x N float32 would be {r['dense_B_by_N_float32_bytes'] / 2**20:.1f} MB)")
            else:
                lines.append(f"memory {dtype} {key}: {r}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)
    set_threads(args.threads)
    device_name = machine.device_name("cpu", args.threads)
    out_path = args.out or default_out(args, device_name)
    env = environment(args, device_name)
    rows, data_info = load_rows(args)
    gen = torch.Generator().manual_seed(args.seed)
    u8 = torch.from_numpy(np.ascontiguousarray(rows[: args.N]))
    y64 = u8.double() / 127.5 - 1.0
    y32 = y64.float()
    pick = torch.randperm(args.N, generator=gen)[: args.B]
    record = {**env, "data": data_info, "shapes": {"B": args.B, "N": args.N, "d": args.d},
              "dtypes": args.dtypes, "sigmas": args.sigmas, "repeat": args.repeat,
              "queries": "x = y + sigma n for B random training rows y, float32",
              "runs": {}, "memory": {}}
    for dtype in args.dtypes:
        train = u8 if dtype == "uint8" else y32
        record["runs"][dtype] = {}
        for sigma in args.sigmas:
            x = (y64[pick] + sigma * torch.randn(args.B, args.d, generator=gen, dtype=torch.float64)).float()
            print(f"{dtype} sigma={sigma}", file=sys.stderr, flush=True)
            record["runs"][dtype][str(sigma)] = run_one(x, train, y32, y64, sigma, args.repeat,
                                                        profile=("diffmem", "bare_gemm") if args.profile else ())
    tmp = out_path.with_suffix(".rows.npy")
    try:
        np.save(tmp, rows)
        for dtype in args.dtypes:
            record["memory"][dtype] = memory_check(args, dtype, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"\n== optimal denoiser | B={args.B} N={args.N} d={args.d} | {device_name} | {data_info['source']} ==")
    print(table(record))
    knn_report.write_json(record, out_path)
    print(f"\nwrote {out_path}")
    return record


def main_cuda(args) -> dict:
    if not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available (torch.cuda.is_available() is False; "
                 f"torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    set_threads(args.threads)
    device = torch.device("cuda")
    device_name = machine.device_name("cuda", args.threads)
    out_path = args.out or default_out(args, device_name)
    env = environment(args, device_name)  # first, so the load average predates our own work
    partial = lambda r: knn_report.write_json({**env, **r}, out_path, complete=False)  # noqa: E731
    record = {**env, **device_record(args, device, sync=torch.cuda.synchronize, stats=torch.cuda, progress=partial)}
    record["cuda"] = {"torch_cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability()),
                      "memory_total_bytes": torch.cuda.get_device_properties(device).total_memory}
    print(f"\n== optimal denoiser | B={args.B} N={args.N} d={args.d} | {device_name} | {record['data']['source']} ==")
    print(device_table(record))
    knn_report.write_json(record, out_path)
    print(f"\nwrote {out_path}")
    return record


if __name__ == "__main__":
    sys.exit(cli.run_main("optimal", main))
