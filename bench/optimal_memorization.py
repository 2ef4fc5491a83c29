"""The closed-form optimal denoiser memorizes CIFAR-10, and Tikhonov regularization is what
stops it, at a cost in distance to the data.

    python bench/optimal_memorization.py                              # CPU: |D| = 1,000, 1,000 samples, minutes
    python bench/optimal_memorization.py --samples 10000              # the papers' sample count
    DIFFMEM_CUDA_OPTIMAL=1 python bench/optimal_memorization.py --device cuda --precision float32 \
        --size 50000 --samples 10000 --tikhonov 0         # all of CIFAR-10 (bench/gpu_optimal_full.sh)

Every setting is one `diffmem sample` run (diffmem.cli.sample: EDM Heun, 18 steps, seeds
0..N-1, no labels; its run directory goes under --workdir), scored by Gu et al.'s criterion
(NN1/NN2 < 1/3 on uint8 pixels). Checks: the plain optimum (c = 0) memorizes at least 0.99
of its samples. The sweep over the Tikhonov constant c (score (D - x) / (sigma^2 + c)) shows
where memorization breaks and how far the samples then are from their nearest training
image (knn_distance: mean NN1 distance / sqrt(C H W), in uint8 pixel units, as Gu et al.
log it).

Writes bench/results/optimal-memorization-<device>.json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli  # noqa: E402
from bench.machine import device_name, git_commit, git_dirty, slug  # noqa: E402
from diffmem.cli import sample as sample_cli  # noqa: E402
from diffmem.training.checkpoint import write_atomic, write_json_atomic  # noqa: E402

DEFAULT_DATA = f"cifar10:{ROOT.parent / 'shared' / 'data' / 'cifar10-train.npz'}"
DEFAULT_HELD_OUT = ROOT.parent / "shared" / "data" / "cifar10-test.npz"
DEFAULT_TIKHONOV = "0,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,1"
REQUIRED_RATIO = 0.99
MEMORIZED = 0.9  # EMM's 1 - eps


def run_setting(c: float, args, workdir: pathlib.Path) -> dict:
    """One `diffmem sample` run at Tikhonov constant c (0: the plain optimum); its results
    entry plus where it was written."""
    outdir = workdir / f"tikhonov-{c:g}"
    argv = ["--data", args.data, "--size", str(args.size), "--samples", str(args.samples),
            "--sample-batch", str(args.sample_batch), "--steps", str(args.steps), "--device", args.device,
            "--precision", args.precision,
            "--grid-rows", "8", "--outdir", str(outdir)]
    if c > 0:
        argv += ["--tikhonov", repr(c)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    namespace = sample_cli.build_parser().parse_args(argv)
    sample_cli.run(namespace)
    entry = json.loads((outdir / "results.json").read_text())["snapshots"][0]
    return dict(tikhonov=c, ratio=entry["ratio"], n_memorized=entry["n_memorized"], n_samples=entry["n_samples"],
                knn_distance=entry["knn_distance"], seconds=entry["seconds"], run_dir=str(outdir))


def held_out_distance(held_out: str, args) -> dict | None:
    """knn distance and ratio of real images the denoiser never saw (the first --samples of
    `held_out`) against the same training set: what samples of a model that generalizes
    look like under the same measure."""
    from diffmem import data, memorization
    from diffmem.training.config import TrainingConfig
    from diffmem.training.dataset import build_dataset

    train = build_dataset(TrainingConfig.from_dict(dict(data=args.data, size=args.size, labels="none")))
    images = data.first(data.load(held_out), min(args.samples, len(data.load(held_out)))).images
    report = memorization.evaluate(images, train.images)
    return dict(data=held_out, n_images=report.n_samples, knn_distance=report.knn_distance, ratio=report.ratio)


def breaking_point(rows: list[dict]) -> dict:
    """The largest c that still memorizes (ratio >= 0.9) and the smallest that does not."""
    held = [r["tikhonov"] for r in rows if r["ratio"] >= MEMORIZED]
    broken = [r["tikhonov"] for r in rows if r["ratio"] < MEMORIZED]
    return dict(last_memorizing=max(held) if held else None, first_not=min(broken) if broken else None)


def plot(rows: list[dict], path: pathlib.Path, title: str, reference: dict | None) -> None:
    """Memorization ratio and knn distance against c (c = 0 drawn at the left edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [r["tikhonov"] for r in rows if r["tikhonov"] > 0]
    zero_at = min(positive) / 10 if positive else 1e-5  # where c = 0 sits on the log axis
    xs = [r["tikhonov"] if r["tikhonov"] > 0 else zero_at for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.semilogx(xs, [r["ratio"] for r in rows], "o-", color="C0", label="memorization ratio")
    ax.axhline(MEMORIZED, color="gray", ls="--", lw=1, label="0.9 (EMM threshold)")
    ax.set(xlabel="Tikhonov c (leftmost point: c = 0)", ylabel="memorization ratio", ylim=(-0.03, 1.03))
    twin = ax.twinx()
    twin.semilogx(xs, [r["knn_distance"] for r in rows], "s--", color="C3", label="knn distance")
    if reference is not None:
        twin.axhline(reference["knn_distance"], color="C3", ls=":", lw=1, label="held-out real images")
    twin.set_ylabel("mean NN1 distance / sqrt(d) (uint8 units)", color="C3")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=100), "wb")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"training data (default: {DEFAULT_DATA})")
    parser.add_argument("--size", type=cli.positive_int, default=1000, help="|D|, class-balanced (default: 1000)")
    parser.add_argument("--samples", type=cli.positive_int, default=1000, help="samples per setting (default: 1000; papers: 10000)")
    parser.add_argument("--sample-batch", type=cli.positive_int, default=500)
    parser.add_argument("--steps", type=cli.positive_int, default=18)
    parser.add_argument("--tikhonov", type=cli.number_list(float, 0.0, strict=False), default=DEFAULT_TIKHONOV, help=f"comma-separated c values (default: {DEFAULT_TIKHONOV})")
    parser.add_argument("--held-out", default=f"cifar10:{DEFAULT_HELD_OUT}" if DEFAULT_HELD_OUT.is_file() else "",
                        help="real images outside the training set, for a reference knn distance ('' for none)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", choices=("float64", "float32"), default="float64",
                        help="the denoiser's compute precision (diffmem sample --precision; float32 takes the "
                             "op's fast kernels: on CUDA the tensor-core one where DIFFMEM_CUDA_OPTIMAL=1)")
    parser.add_argument("--threads", type=cli.positive_int, default=None)
    parser.add_argument("--workdir", default=None, help="parent of the per-setting run directories (default: a temporary one)")
    parser.add_argument("--json", default=None, help="default: bench/results/optimal-memorization-<device>.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    values = sorted(set(args.tikhonov))
    device = device_name("cuda" if args.device.startswith("cuda") else "cpu", args.threads)
    out = pathlib.Path(args.json) if args.json else ROOT / "bench" / "results" / f"optimal-memorization-{slug(device)}.json"

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="optimal-memorization-") as tmp:
        workdir = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(tmp)
        rows = [run_setting(c, args, workdir) for c in values]
    reference = held_out_distance(args.held_out, args) if args.held_out else None
    plain = next((r for r in rows if r["tikhonov"] == 0), None)
    check = None if plain is None else dict(required=REQUIRED_RATIO, ratio=plain["ratio"],
                                            holds=plain["ratio"] >= REQUIRED_RATIO)
    record = dict(command=" ".join(sys.argv), git_commit=git_commit(), git_dirty=git_dirty(), device=device,
                  torch=torch.__version__, data=args.data, size=args.size, subset="balanced", labels="none",
                  samples=args.samples, precision=args.precision, sampler="heun", steps=args.steps, seeds=f"0-{args.samples - 1}",
                  knn_distance_units="mean NN1 l2 distance / sqrt(C*H*W), uint8 pixels",
                  plain_memorizes=check, breaking_point=breaking_point(rows), sweep=rows,
                  held_out_reference=reference,
                  seconds=time.time() - start)
    if not args.workdir:
        for row in rows:
            row.pop("run_dir")  # a temporary folder, gone now
    figure = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, figure, f"optimal denoiser + Tikhonov, CIFAR-10 |D|={args.size}, {args.samples} samples, "
                       f"Heun {args.steps} steps\n{device}", reference)
    record["figure"] = figure.name
    write_json_atomic(record, out)

    for r in rows:
        print(f"c = {r['tikhonov']:<8g} ratio {r['ratio']:.4f} ({r['n_memorized']}/{r['n_samples']}), "
              f"knn distance {r['knn_distance']:.3f}, {r['seconds']:.0f} s")
    if check is not None:
        print(f"plain optimum memorizes >= {REQUIRED_RATIO}: {'yes' if check['holds'] else 'NO'} ({check['ratio']:.4f})")
    if reference is not None:
        print(f"held-out real images: knn distance {reference['knn_distance']:.3f}, ratio {reference['ratio']:.4f}")
    bp = record["breaking_point"]
    if bp["first_not"] is None:
        print(f"every c memorizes (ratio >= {MEMORIZED}), up to c = {bp['last_memorizing']}")
    else:
        print(f"Tikhonov breaks memorization between c = {bp['last_memorizing']} (last >= {MEMORIZED}) "
              f"and c = {bp['first_not']}")
    print(f"wrote {out} and {figure.name} ({record['seconds']:.0f} s)")
    return 0 if check is None or check["holds"] else 1


if __name__ == "__main__":
    sys.exit(cli.run_main("optimal_memorization", main))
