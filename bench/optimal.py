"""Benchmark of the closed-form optimal denoiser: diffmem.optimal.denoise vs baselines.

    python bench/optimal.py --help

Queries are noisy training images x = y + sigma n (what a sampler feeds the denoiser), one
run per sigma and training-set dtype. Baselines, measured in the same run:
  reference  the dense formulation: torch.cdist, softmax, matmul, all float32 (B x N in memory)
  bare_gemm  two bare float32 torch.mm, (B x d) @ (d x N) and (B x N) @ (N x d): the floor
             of any method that touches every (query, item) pair twice
Each method's relative error of D against float64 is recorded beside its time. Memory:
peak RSS growth of one call in a fresh process (peak reset just before the call through
/proc/self/clear_refs), at N and at --memory-N.
Prints a table and writes a JSON record (command, commit, device, versions, shapes,
dtypes, median times, ratios); see bench/README.md.
"""
from __future__ import annotations

import argparse
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

from bench import contention, knn_data, knn_report, machine
from bench.knn import environment, set_threads, time_calls

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIGMAS = "0.002,0.1,1,5,10,80"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--B", type=int, default=64, help="queries (default: 64)")
    p.add_argument("--N", type=int, default=5000, help="training items (default: 5000)")
    p.add_argument("--d", type=int, default=3072, help="row length (default: 3072 = 32x32x3)")
    p.add_argument("--sigmas", default=DEFAULT_SIGMAS, help=f"comma list (default: {DEFAULT_SIGMAS})")
    p.add_argument("--dtype", default="uint8,float32", help="training-set dtypes (default: uint8,float32)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs after 1 warm-up (default: 5)")
    p.add_argument("--data", choices=["random", "cifar10"], default="cifar10",
                   help="training rows: CIFAR-10 (default) or random uint8 pixels")
    p.add_argument("--data-dir", type=Path, default=knn_data.DEFAULT_DATA_DIR)
    p.add_argument("--memory-N", type=int, default=20000, help="second N of the memory check (default: 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default: bench/results/optimal-<device>.json)")
    args = p.parse_args(argv)
    args.device = "cpu"
    args.sigma_list = [float(s) for s in args.sigmas.split(",") if s]
    args.dtypes = [t for t in args.dtype.split(",") if t]
    return args


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


def methods(x, train, y32, sigma):
    from diffmem import optimal

    W = torch.softmax(torch.randn(x.shape[0], y32.shape[0]), 1)  # any dense weights: the floor's second product

    def reference():
        d2 = torch.cdist(x, y32) ** 2
        return torch.softmax(-d2 / (2 * sigma**2), 1) @ y32

    def bare_gemm():
        torch.mm(x, y32.T)
        return torch.mm(W, y32)

    return {"diffmem": lambda: optimal.denoise(x, sigma, train), "reference": reference, "bare_gemm": bare_gemm}


def run_one(x, train, y32, y64, sigma, repeat) -> dict:
    truth = float64_truth(x, y64, sigma)
    res = {}
    for name, fn in methods(x, train, y32, sigma).items():
        with contention.OtherLoad() as load:
            out, times = time_calls(fn, repeat, lambda: None)
        r = {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
             "other_cpu_load": load.fraction}
        if name != "bare_gemm":
            r["rel_err_vs_float64"] = rel_err(out, truth)
        res[name] = r
    base = res["diffmem"]["median_s"]
    for r in res.values():
        r["ratio_vs_diffmem"] = r["median_s"] / base
    return res


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
    set_threads(args.threads)
    device_name = machine.device_name("cpu", args.threads)
    out_path = args.out or RESULTS_DIR / f"optimal-{machine.slug('cpu ' + device_name)}.json"
    env = environment(args, device_name)
    rows, data_info = load_rows(args)
    gen = torch.Generator().manual_seed(args.seed)
    u8 = torch.from_numpy(np.ascontiguousarray(rows[: args.N]))
    y64 = u8.double() / 127.5 - 1.0
    y32 = y64.float()
    pick = torch.randperm(args.N, generator=gen)[: args.B]
    record = {**env, "data": data_info, "shapes": {"B": args.B, "N": args.N, "d": args.d},
              "dtypes": args.dtypes, "sigmas": args.sigma_list, "repeat": args.repeat,
              "queries": "x = y + sigma n for B random training rows y, float32",
              "runs": {}, "memory": {}}
    for dtype in args.dtypes:
        train = u8 if dtype == "uint8" else y32
        record["runs"][dtype] = {}
        for sigma in args.sigma_list:
            x = (y64[pick] + sigma * torch.randn(args.B, args.d, generator=gen, dtype=torch.float64)).float()
            print(f"{dtype} sigma={sigma}", file=sys.stderr, flush=True)
            record["runs"][dtype][str(sigma)] = run_one(x, train, y32, y64, sigma, args.repeat)
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


if __name__ == "__main__":
    main()
