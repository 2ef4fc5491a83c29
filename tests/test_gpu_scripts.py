"""The GPU session scripts (bench/gpu_*.sh) call the benchmarks with flags a typo would
turn into a wasted GPU session (a drawn task has minutes of device time): every such call
must parse with the benchmark's own argument parser, here, without a GPU."""
import pathlib
import re
import shlex

import pytest

from bench import knn, optimal, train_throughput

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
PARSERS = {"optimal.py": optimal.parse_args, "knn.py": knn.parse_args,
           "train_throughput.py": train_throughput.parse_args}


def bench_calls(script: pathlib.Path):
    """(benchmark, argv) for each call of a benchmark in PARSERS in `script`: continuation
    lines joined, the command ended at a shell operator or redirection."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"bench/(\w+\.py)\s+([^\n]*)", line):
            name, rest = match.groups()
            if name not in PARSERS:
                continue
            argv = []
            for token in shlex.split(rest, comments=True):
                if token in (";", "&&", "||", "|") or token.startswith((">", "2>")):
                    break
                argv.append(token)
            yield name, argv


def test_every_benchmark_call_in_the_gpu_scripts_parses():
    seen = []
    for script in sorted(BENCH.glob("gpu_*.sh")):
        for name, argv in bench_calls(script):
            assert not any("$" in a for a in argv), (script.name, argv)  # shell values: not checkable here
            PARSERS[name](argv)  # argparse exits (SystemExit) on a bad flag or value
            seen.append((script.name, name, tuple(argv)))
    names = {(s, n) for s, n, _ in seen}
    assert {("gpu_check.sh", "optimal.py"), ("gpu_check.sh", "knn.py"), ("gpu_check.sh", "train_throughput.py"),
            ("gpu_optimal_full.sh", "optimal.py")} <= names, seen
    assert all("--profile" in argv for s, n, argv in seen if n == "optimal.py")


@pytest.mark.parametrize("name, argv", [("optimal.py", ["--device", "cuda", "--sigmas", "1", "--profle"]),
                                        ("knn.py", ["--device", "cuda", "--methods", "diffmem,bare_gem_int8"]),
                                        ("train_throughput.py", ["--device", "cuda", "--variants", "fp32_eagr"])])
def test_a_bad_flag_or_value_is_a_usage_error(name, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        PARSERS[name](argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
