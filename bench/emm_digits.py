"""Wall time of a whole EMM search on the built-in digits data, on this machine.

    python bench/emm_digits.py                  # diffmem emm --preset emm-digits --min 8 --max 1024 --jobs 2

Runs `diffmem emm` in a fresh folder (so nothing is reused), times it end to end (process
starts, training, sampling, scoring) and writes a JSON record with the command, commit,
device, seconds, runs trained and the EMM found: bench/results/emm-digits-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cli  # noqa: E402
from bench.machine import cpu_model, git_commit, git_dirty, slug  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min", type=cli.positive_int, default=8)
    parser.add_argument("--max", type=cli.positive_int, default=1024)
    parser.add_argument("--tolerance", type=cli.positive_float, default=0.25)
    parser.add_argument("--jobs", type=cli.positive_int, default=2)
    parser.add_argument("--outdir", default=str(ROOT / "runs" / "emm-digits-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    out = pathlib.Path(args.outdir)
    shutil.rmtree(out, ignore_errors=True)  # a timing must not reuse earlier runs
    command = [sys.executable, "-m", "diffmem.cli.main", "emm", "--preset", "emm-digits", "--min", str(args.min),
               "--max", str(args.max), "--tolerance", str(args.tolerance), "--jobs", str(args.jobs),
               "--outdir", str(out)]
    load_before = os.getloadavg()
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    print(result.stdout, end="")
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr, end="")
        return result.returncode
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["entries"][0]
    device = f"{cpu_model()} {os.cpu_count()} cores"
    record = dict(
        command=" ".join(command), git_commit=git_commit(), git_dirty=git_dirty(), device=device,
        seconds=seconds, load_average_before=load_before, load_average_after=os.getloadavg(),
        runs_trained=sum(1 for r in entry["runs"] if r["status"] == "done"), emm=entry["emm"],
        runs=[dict(size=r["size"], ratio=r["ratio"]) for r in entry["runs"]],
    )
    path = pathlib.Path(args.json or ROOT / "bench" / "results" / f"emm-digits-{slug(device)}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{seconds:.0f} s for {record['runs_trained']} runs on {device}; record {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main("emm_digits", main))
