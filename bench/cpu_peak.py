"""The CPU's measured multiply-add peak (GMAC/s), the bound the CPU kernels' benchmark
numbers are read against: builds bench/cpu_peak.cpp with the system C++ compiler and runs
it on 1..T threads (best of three each). float32 FMAs on AVX2 or AVX-512 vectors, or
AVX-512 BF16 dot products (the float32 search's bfloat16 screen runs on those).

    python bench/cpu_peak.py                 # 2 threads, AVX2 (8 lanes)
    python bench/cpu_peak.py --threads 4 --isa avx512
    python bench/cpu_peak.py --isa avx512bf16
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from bench import cli  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


ISAS = ("avx2", "avx512", "avx512bf16")


def measure(threads: int = 2, isa: str = "avx2") -> dict:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        exe = pathlib.Path(tmp) / "cpu_peak"
        subprocess.run([compiler, "-O3", "-fopenmp", str(HERE / "cpu_peak.cpp"), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(threads), isa], check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=cli.positive_int, default=2)
    parser.add_argument("--isa", choices=ISAS, default="avx2", help="the instructions to time (the CPU must have them)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(measure(args.threads, args.isa)))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cpu_peak: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
