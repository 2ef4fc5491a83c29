"""How much work the optimal denoiser's CUDA kernel (diffmem/optimal_stream.py) does per
call, on real CIFAR-10 rows: GEMM work in units of one dense B x N x d product (float16
products and int8 products counted apart), the share of (query, item) pairs that need
float64 direct differences, and the error of D against float64. These are counts, not
timings: they come out the same on any device, so the streaming algorithm runs here with
its tensor-core products emulated on the CPU. "float16_equivalent_units" weighs an int8
product as half a float16 one, the ratio of the H100's dense tensor-core peaks (1979 int8
TOPS, 989 float16 TFLOPS): an assumption about the GPU, not a measurement. bench/optimal.py's
floors are two such units in float16, or one int8 and one float16 product (1.5).

    python bench/optimal_work.py                       # B=256, N=50,000 CIFAR-10 rows, 2 threads
    python bench/optimal_work.py --N 12000 --sigmas 0.002,1,80

Queries: x = y + sigma n for B random training images y. Writes
bench/results/optimal-work-cifar10-B<B>-N<N>.json.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli  # noqa: E402
from bench.machine import git_commit, git_dirty  # noqa: E402
from diffmem.training.checkpoint import write_json_atomic  # noqa: E402

DEFAULT_SIGMAS = "0.002,0.1,0.5,1,3,5,10,20,40,80"
INT8_PER_FLOAT16 = 0.5  # H100 SXM dense tensor-core peaks: 1979 int8 TOPS / 989 float16 TFLOPS


PURPOSES = ("logits", "weighted_sum", "weight_residuals")


class WorkCounter:
    """Counts the kernel's GEMM work and direct-difference pairs while installed, the
    GEMM work also by purpose (float16-equivalent units): the logits' products, the
    weighted sum, and the weights' rounding residuals (the products made inside the
    kernel's weighted_sum and add_weight_residuals; everything else is the logits')."""

    WRAPPED = ("mm_f16_f32", "bmm_f16_f32", "mm_i8_i32", "pair_logits", "weighted_sum", "add_weight_residuals")

    def __init__(self, stream, unit: float):
        self.stream, self.unit = stream, unit
        self.saved = {name: getattr(stream, name) for name in self.WRAPPED}
        self.reset()

    def reset(self):
        self.gemm_units = 0.0
        self.int8_units = 0.0
        self.direct_pairs = 0
        self.by_purpose = dict.fromkeys(PURPOSES, 0.0)
        self.purpose = "logits"

    def _count(self, units: float, weight: float = 1.0) -> float:
        self.by_purpose[self.purpose] += weight * units
        return units

    def __enter__(self):
        saved = self.saved

        def mm(a, b, acc=None):
            self.gemm_units += self._count(a.shape[0] * a.shape[1] * b.shape[1] / self.unit)
            return saved["mm_f16_f32"](a, b, acc)

        def bmm(a, b):
            self.gemm_units += self._count(a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2] / self.unit)
            return saved["bmm_f16_f32"](a, b)

        def int_mm(a, b):
            self.int8_units += self._count(a.shape[0] * a.shape[1] * b.shape[1] / self.unit, INT8_PER_FLOAT16)
            return saved["mm_i8_i32"](a, b)

        def pairs(x, rows, q, n, m, inv):
            self.direct_pairs += q.numel()
            return saved["pair_logits"](x, rows, q, n, m, inv)

        def for_purpose(name):
            def call(*args):
                self.purpose = name.removeprefix("add_")
                try:
                    return saved[name](*args)
                finally:
                    self.purpose = "logits"
            return call

        for name, fn in (("mm_f16_f32", mm), ("bmm_f16_f32", bmm), ("mm_i8_i32", int_mm), ("pair_logits", pairs),
                         ("weighted_sum", for_purpose("weighted_sum")),
                         ("add_weight_residuals", for_purpose("add_weight_residuals"))):
            setattr(self.stream, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.stream, name, fn)
        # the float64 GEMM tier (x @ rows.T in float64) is not a float16 GEMM: counted apart
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=cli.positive_int, default=256)
    parser.add_argument("--N", type=cli.positive_int, default=50000)
    parser.add_argument("--sigmas", type=cli.number_list(float, 0.0, strict=True), default=DEFAULT_SIGMAS)
    parser.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared" / "data" / "cifar10-train.npz")
    parser.add_argument("--threads", type=cli.positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"optimal_work: no CIFAR-10 archive at {args.data} (pass --data)", file=sys.stderr)
        return 1
    with np.load(args.data) as archive:
        images = archive["images"]
    if not 1 <= args.B <= args.N <= len(images):
        print(f"optimal_work: need 1 <= B <= N <= {len(images)}, got B={args.B}, N={args.N}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    from diffmem import optimal_stream as stream

    train = torch.from_numpy(np.ascontiguousarray(images[: args.N].reshape(args.N, -1)))
    d = train.shape[1]
    gen = torch.Generator().manual_seed(args.seed)
    y = train[torch.randperm(args.N, generator=gen)[: args.B]].double() / 127.5 - 1
    y64 = train.double() / 127.5 - 1
    rows = []
    counter = WorkCounter(stream, float(args.B) * args.N * d)
    for sigma in args.sigmas:
        x = (y + sigma * torch.randn(args.B, d, generator=gen, dtype=torch.float64)).float()
        sig = torch.full((args.B,), sigma, dtype=torch.float64)
        start = time.perf_counter()
        with counter:
            counter.reset()
            D, _ = stream.optimal_denoise(x, train, sig, torch.ones(args.B, dtype=torch.float64))
        seconds = time.perf_counter() - start
        xd = x.double()
        sq = (xd * xd).sum(1, keepdim=True) + (y64 * y64).sum(1) - 2 * xd @ y64.T
        truth = torch.softmax(-sq.clamp_min(0) / (2 * sigma**2), 1) @ y64
        err = float(((D.double() - truth).norm(dim=1) / truth.norm(dim=1)).max())
        row = dict(sigma=sigma, float16_gemm_units=round(counter.gemm_units, 4),
                   int8_gemm_units=round(counter.int8_units, 4),
                   float16_equivalent_units=round(counter.gemm_units + INT8_PER_FLOAT16 * counter.int8_units, 4),
                   float16_equivalent_units_by_purpose={k: round(v, 4) for k, v in counter.by_purpose.items()},
                   direct_difference_share=counter.direct_pairs / (args.B * args.N),
                   rel_err_vs_float64=err, cpu_seconds_emulated=seconds)
        rows.append(row)
        print(f"sigma {sigma:<6g} GEMM units: float16 {row['float16_gemm_units']:5.2f}, int8 "
              f"{row['int8_gemm_units']:5.2f} (float16-equivalent {row['float16_equivalent_units']:5.2f})  direct differences "
              f"{100 * row['direct_difference_share']:6.3f}%  error {err:.1e}  ({seconds:.1f} s)\n"
              f"             by purpose: " + ", ".join(f"{k} {v:.2f}" for k, v in counter.by_purpose.items()),
              flush=True)
    out = args.json or ROOT / "bench" / "results" / f"optimal-work-cifar10-B{args.B}-N{args.N}.json"
    record = dict(command=" ".join([sys.executable, *sys.argv]), git_commit=git_commit(), git_dirty=git_dirty(),
                  torch=torch.__version__, data=str(args.data.name), B=args.B, N=args.N, d=d,
                  chunk_rows=stream.chunk_rows(args.B, args.N, d),
                  unit="one dense B x N x d GEMM (float16 or int8); float16_equivalent_units = float16 + "
                       f"{INT8_PER_FLOAT16} x int8 (assumed H100 peak ratio); bench/optimal.py's floors: 2 float16 "
                       "units, or 1 int8 + 1 float16; by purpose: the logits' products, the weighted sum, the "
                       "weights' rounding residuals",
                  queries="x = y + sigma n, y random training images", runs=rows)
    write_json_atomic(record, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main("optimal_work", main))
