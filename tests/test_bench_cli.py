"""The benchmark scripts' command lines (bench/cli.py): bad numbers are usage errors at
parse time (exit status 2, one line, no traceback, nothing run); errors met while running
end with one line and status 1, as the diffmem commands do."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli

ROOT = Path(__file__).resolve().parents[1]


def test_integer_bounds():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0 and cli.int_at_least(1, 32)("32") == 32
    for parse, text in ((cli.positive_int, "0"), (cli.positive_int, "-2"), (cli.nonnegative_int, "-1"),
                        (cli.int_at_least(1, 32), "33"), (cli.positive_int, "2.5"), (cli.positive_int, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_positive_float_refuses_zero_nan_and_inf():
    assert cli.positive_float("1e-3") == 1e-3
    for text in ("0", "-1", "nan", "inf", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_float(text)


def test_number_lists():
    strict = cli.number_list(float, 0.0, strict=True)
    assert strict("0.002, 1,80") == [0.002, 1.0, 80.0]
    assert cli.number_list(float, 0.0, strict=False)("0,1e-3") == [0.0, 1e-3]
    assert cli.number_list(int, 0, strict=True, allow_empty=True)("") == []
    for text in ("", "0,1", "1,nan", "1,inf", "1,a"):
        with pytest.raises(argparse.ArgumentTypeError):
            strict(text)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.number_list(int, 0, strict=True)("6,1.5")


def test_run_main_exit_status(capsys):
    assert cli.run_main("x", lambda: {"a": 1}) == 0  # a record
    assert cli.run_main("x", lambda: None) == 0
    assert cli.run_main("x", lambda: 3) == 3
    assert cli.run_main("x", lambda: True) == 0  # not an exit status

    def bad():
        raise ValueError("no such dataset:\nfoo")

    assert cli.run_main("x", bad) == 1
    assert capsys.readouterr().err == "x: error: no such dataset: foo\n"


@pytest.mark.parametrize("argv", [
    ["bench/optimal.py", "--sigmas", "0,1"],
    ["bench/optimal.py", "--sigmas", "a"],
    ["bench/knn.py", "--k", "0"],
    ["bench/knn.py", "--methods", "diffmem,nope"],
    ["bench/optimal_memorization.py", "--size", "-1"],
    ["bench/optimal_2d.py", "--samples", "0"],
    ["bench/optimal_work.py", "--sigmas", "x"],
    ["bench/cpu_peak.py", "--threads", "0"],
    ["bench/train_throughput.py", "--batch", "0"],
    ["bench/emm_digits.py", "--tolerance", "nan"],
    ["bench/carry_data.py", "split", "a.npz", "--parts", "0"],
    ["bench/gpu_tuning.py", "--device", "cpu", "--small", "--parts", "knn,foo"],
])
def test_scripts_refuse_bad_numbers_without_a_traceback(argv, tmp_path):
    proc = subprocess.run([sys.executable, *argv, *(["--out", str(tmp_path / "o.json")] if argv[0] in (
        "bench/optimal.py", "bench/knn.py") else [])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].split(": error: ")[1], proc.stderr  # usage, then one line
    assert not list(tmp_path.iterdir())  # nothing written
