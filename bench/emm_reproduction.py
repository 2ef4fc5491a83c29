"""Scaled reproduction of Gu et al.'s qualitative findings on real CIFAR-10.

    python bench/emm_reproduction.py --scale gpu --devices 0 --jobs 4     # ~10 min on one H100/H200
    python bench/emm_reproduction.py --scale cpu --jobs 2                 # toy scale (8x8 vs 16x16), 2 CPU cores

One sweep (diffmem.emm) over fixed training-set sizes, reduced resolution and a small
DDPM++, with five settings, and four checks of the papers' findings:

  1. the memorization ratio falls as |D| grows (no labels, base resolution);
  2. a lower resolution gives a larger EMM (Gu et al.: 8x8 > 16x16 > 32x32);
  3. unique labels memorize more than no labels at the same |D|;
  4. random labels with more classes give a larger EMM (Gu et al. Fig. 7).

Each check says whether it holds and on which numbers. The sweep folder gets the usual
summary, tables and `diffmem report` figures; the JSON summary goes to --json (default
bench/results/emm-reproduction-<device>.json, with the ratio-vs-|D| figure beside it as .png).
Rerunning resumes the sweep.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli  # noqa: E402
from bench.machine import cpu_model, git_commit, git_dirty, slug  # noqa: E402
from diffmem.training.checkpoint import write_json_atomic  # noqa: E402

# Settings per scale: the base resolution and one to compare it with, sizes (multiples of
# 10: the class-balanced rule), model and training length, chosen so that the base
# setting's EMM falls inside the sizes. Random labels use few classes (|D| / C >= 4 around
# the EMM): samples are drawn for a uniformly random class, and a class without training
# images has nothing to copy, which would measure the sampling rule, not memorization.
SCALES = {
    "gpu": dict(resolution=16, compare_resolution=8, sizes=[20, 50, 100, 200, 400], random_classes=(2, 10),
                model=dict(num_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[]),
                train=dict(batch=128, lr=2e-3, duration="4000steps", lr_rampup="25.6kimg", ema="6.4kimg",
                           ema_mode="mode1", samples=2000, sample_batch=1000, precision="fp32")),
    "cpu": dict(resolution=8, compare_resolution=16, sizes=[10, 20, 40, 80], random_classes=(2, 5),
                model=dict(num_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[]),
                train=dict(batch=64, lr=3e-3, duration="1200steps", lr_rampup="6.4kimg", ema="1.6kimg",
                           ema_mode="mode1", samples=500, sample_batch=500, threads=1)),
}


def build_spec(scale: str, data: str) -> dict:
    s = SCALES[scale]
    few, many = s["random_classes"]
    base = dict(data=f"cifar10:{data}", subset="balanced", arch="ddpmpp", precond="edm", dropout=0.0,
                snapshots="1", steps=18, **s["model"], **s["train"])
    settings = [
        dict(resolution=s["resolution"], labels="none"),
        dict(resolution=s["compare_resolution"], labels="none"),
        dict(resolution=s["resolution"], labels="unique"),
        dict(resolution=s["resolution"], labels="random", num_classes=few),
        dict(resolution=s["resolution"], labels="random", num_classes=many),
    ]
    return dict(name=f"reproduction-{scale}", base=base, sizes=s["sizes"], eps=0.1, metric="max",
                grid=dict(setting=settings))


def _ratios(entry: dict) -> dict[int, float]:
    return {r["size"]: r["ratio"] for r in entry["runs"] if r["status"] == "done"}


def _emm_rank(entry: dict) -> float:
    """EMM as a number to compare: the estimate, or the bound when it is outside the sizes
    (all memorized: the largest size; none memorized: 0)."""
    emm = entry["emm"]
    if emm is None:
        return math.nan
    if emm["bracketed"]:
        return emm["value"]
    return float(emm["lower"]) if emm["lower"] is not None else 0.0


def _more_at_each_size(more: dict[int, float], less: dict[int, float]) -> dict:
    """'memorizes more': at least as much at every shared size, strictly at one."""
    sizes = sorted(set(more) & set(less))
    diffs = {s: more[s] - less[s] for s in sizes}
    holds = bool(sizes) and all(d >= 0 for d in diffs.values()) and any(d > 0 for d in diffs.values())
    return dict(holds=holds, sizes=sizes, more=[more[s] for s in sizes], less=[less[s] for s in sizes])


def check_findings(summary: dict, scale: str) -> dict:
    base, other, unique, few, many = summary["entries"]
    low, high = (other, base) if SCALES[scale]["compare_resolution"] < SCALES[scale]["resolution"] else (base, other)
    base_r = _ratios(base)
    sizes = sorted(base_r)
    falls = [base_r[s] for s in sizes]
    findings = {
        "ratio_falls_with_size": dict(
            holds=len(falls) >= 2 and all(a >= b for a, b in zip(falls, falls[1:])) and falls[0] > falls[-1],
            sizes=sizes, ratios=falls),
        "lower_resolution_larger_emm": dict(
            holds=_emm_rank(low) > _emm_rank(high) or (_emm_rank(low) == _emm_rank(high)
                                                       and _more_at_each_size(_ratios(low), _ratios(high))["holds"]),
            emm_lower_resolution=_emm_rank(low), emm_higher_resolution=_emm_rank(high),
            per_size=_more_at_each_size(_ratios(low), _ratios(high))),
        "unique_labels_memorize_more": _more_at_each_size(_ratios(unique), base_r),
        "more_random_classes_memorize_more": dict(
            holds=_emm_rank(many) > _emm_rank(few), emm_more_classes=_emm_rank(many), emm_fewer_classes=_emm_rank(few),
            per_size=_more_at_each_size(_ratios(many), _ratios(few))),
    }
    return findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-train.npz"),
                        help="CIFAR-10 training set (.npz or torchvision root)")
    parser.add_argument("--outdir", default=None, help="sweep folder (default: runs/reproduction-<scale>)")
    parser.add_argument("--devices", default=None, help="cpu or GPU numbers (default: cpu for --scale cpu, else 0)")
    parser.add_argument("--jobs", type=cli.positive_int, default=2, help="parallel runs per device (default: 2)")
    parser.add_argument("--json", default=None, help="where to write the JSON summary")
    args = parser.parse_args(argv)

    from diffmem.emm import parse_spec
    from diffmem.emm.execute import parse_slots, run_sweep
    from diffmem.emm.summary import build_summary, collect_progress, write_outputs

    if not pathlib.Path(args.data).exists():
        print(f"emm_reproduction: CIFAR-10 not found at {args.data} (pass --data)", file=sys.stderr)
        return 1
    devices = args.devices or ("cpu" if args.scale == "cpu" else "0")
    spec_values = build_spec(args.scale, args.data)
    spec = parse_spec(spec_values, source="reproduction spec")
    sweep_dir = pathlib.Path(args.outdir or ROOT / "runs" / f"reproduction-{args.scale}")
    sweep_dir.mkdir(parents=True, exist_ok=True)

    start = time.time()
    outcome = run_sweep(spec, sweep_dir, parse_slots(devices, args.jobs), log=lambda line: print(line, flush=True))
    seconds = time.time() - start
    summary = build_summary(spec, collect_progress(spec, sweep_dir), sweep_dir)
    write_outputs(summary, sweep_dir)
    report_path = None
    try:
        from diffmem.emm.report import write_report

        report_path = str(write_report(sweep_dir))
    except ImportError as err:  # matplotlib missing: the numbers still count
        print(f"emm_reproduction: no report ({err})", file=sys.stderr)

    import torch

    device = torch.cuda.get_device_name() if devices != "cpu" and torch.cuda.is_available() else \
        f"{cpu_model()} {args.jobs}x1t"
    findings = check_findings(summary, args.scale)
    record = dict(
        command=" ".join([sys.executable, *sys.argv]), git_commit=git_commit(), git_dirty=git_dirty(),
        device=device, torch=torch.__version__, scale=args.scale, spec=spec_values, seconds=seconds,
        trained_this_time=outcome.trained, reused=outcome.reused, failed=outcome.failed,
        entries=[dict(label=e["label"], ratios=_ratios(e), emm=e["emm"]) for e in summary["entries"]],
        findings=findings, all_hold=all(f["holds"] for f in findings.values()), report=report_path,
    )
    json_path = pathlib.Path(args.json or ROOT / "bench" / "results" / f"emm-reproduction-{slug(device)}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, json_path)
    figure = sweep_dir / "report-figures" / "ratio-vs-size.png"
    if report_path is not None and figure.is_file():  # the main figure beside the record
        shutil.copyfile(figure, json_path.with_suffix(".png"))
    for name, finding in findings.items():
        print(f"{'HOLDS' if finding['holds'] else 'does not hold'}: {name}")
    print(f"{seconds:.0f} s on {device}; summary {json_path}; report {report_path}")
    return 0 if outcome.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(cli.run_main("emm_reproduction", main))
