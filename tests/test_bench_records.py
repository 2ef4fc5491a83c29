"""Benchmark records survive a run cut short: bench/knn.py writes what it measured so far
(marked "complete": false) after every method, and the full record at the end."""
import json

import pytest

from bench import knn, knn_methods, machine

SMALL = ["--Q", "20", "--N", "64", "--d", "48", "--repeat", "1", "--exact-rows", "4", "--threads", "1"]


def test_a_finished_run_is_complete(tmp_path):
    out = tmp_path / "knn.json"
    knn.main([*SMALL, "--methods", "diffmem,cdist_topk", "--dtype", "uint8", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is True and set(record["runs"]["uint8"]) == {"diffmem", "cdist_topk"}
    assert record["runs"]["uint8"]["cdist_topk"]["vs_diffmem"]["reference"] == "diffmem"
    # the CPU's FMA peak at the run's thread count, the bound its GMAC/s are read against
    peak = record["cpu_fma_peak"]
    assert peak["lanes"] in (8, 16) and peak["gmacs"] == peak["gmacs_1t"] > 0
    # and, where the float32 search screens with bfloat16 dot products, their peak
    bf16 = record["cpu_bf16_peak"]
    if machine.has_avx512_bf16():
        assert bf16["isa"] == "avx512bf16" and bf16["macs_per_lane"] == 2 and bf16["gmacs"] > 0
    else:
        assert bf16 is None


def test_a_float64_run_times_diffmem_on_float64_rows(tmp_path):
    out = tmp_path / "knn.json"
    knn.main([*SMALL, "--methods", "diffmem,cdist_topk", "--dtype", "float64", "--out", str(out)])
    run = json.loads(out.read_text())["runs"]["float64"]
    # the baselines (faiss too, where installed) take float32 copies
    assert run["diffmem"]["computes_in"] == "float64" and run["cdist_topk"]["computes_in"] == "float32"
    assert run["diffmem"]["exact_sample"]["rows_wrong"] == 0
    assert run["diffmem"]["screen"]["refs_per_query_mean"] >= 2  # the k nearest are always kept
    with pytest.raises(SystemExit):
        knn.main([*SMALL, "--dtype", "float16", "--out", str(out)])


def test_profile_records_where_each_methods_time_went(tmp_path):
    out = tmp_path / "knn.json"
    knn.main([*SMALL, "--methods", "diffmem,bare_gemm_f32", "--dtype", "uint8", "--profile", "--out", str(out)])
    run = json.loads(out.read_text())["runs"]["uint8"]
    for name in ("diffmem", "bare_gemm_f32"):
        p = run[name]["profile"]
        assert p["device"] == "cpu" and p["wall_us"] > 0 and p["top"]
        assert sum(p["self_us_by_category"].values()) == pytest.approx(p["self_us_total"])
    assert run["bare_gemm_f32"]["profile"]["self_us_by_category"]["gemm"] > 0
    knn.main([*SMALL, "--methods", "diffmem", "--dtype", "uint8", "--out", str(out)])
    assert "profile" not in json.loads(out.read_text())["runs"]["uint8"]["diffmem"]  # only on request


def test_the_cpu_peak_is_of_a_core_and_scales_at_most_with_threads():
    """bench/cpu_peak.py reads FMA chains per thread count. Two threads need not be faster
    than one (CI's machine is shared: a busy second core leaves them time-sliced on one), so
    the bounds are those load cannot break: each reading is of the order of a core's peak, and
    two threads never do more than twice the work of one (a wrong work count would)."""
    from bench import cpu_peak

    peak = cpu_peak.measure(2)
    assert peak["lanes"] == 8 and peak["macs_per_lane"] == 1
    for key in ("gmacs_1t", "gmacs_2t"):
        assert 1.0 < peak[key] < 1000.0, (key, peak)  # a few GHz x 2 FMA units x 8 lanes is about 50 a core
    assert 0.5 * peak["gmacs_1t"] < peak["gmacs_2t"] < 2.2 * peak["gmacs_1t"], peak
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_peak.measure(1, "avx1024")


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    def interrupted(inp, dtype):
        raise KeyboardInterrupt  # the device's time limit, say

    monkeypatch.setitem(knn_methods.BUILDERS, "cdist_topk", interrupted)
    out = tmp_path / "knn.json"
    with pytest.raises(KeyboardInterrupt):
        knn.main([*SMALL, "--methods", "diffmem,bare_gemm_int8,cdist_topk", "--dtype", "uint8", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["complete"] is False
    runs = record["runs"]["uint8"]
    assert set(runs) == {"diffmem", "bare_gemm_int8"}
    assert runs["diffmem"]["ratio_vs_diffmem"] == 1.0 and runs["diffmem"]["median_s"] > 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left beside it


def test_the_tuning_script_runs_and_records_both_parts(tmp_path, monkeypatch):
    from bench import gpu_tuning

    for flag in ("DIFFMEM_CUDA_KNN", "DIFFMEM_CUDA_OPTIMAL"):  # the script sets them; undone after
        monkeypatch.setenv(flag, "1")

    out = tmp_path / "tuning.json"
    assert gpu_tuning.main(["--device", "cpu", "--small", "--repeat", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["complete"] is True
    assert all(r["same_answer"] for r in record["knn"]["runs"])
    assert {r["chunk_rows"] for r in record["optimal"]["runs"]} == set(gpu_tuning.SMALL["chunks"])
    with pytest.raises(SystemExit) as exc:  # a usage error, before any part runs
        gpu_tuning.main(["--device", "cpu", "--small", "--parts", "knn,bogus", "--json", str(out)])
    assert exc.value.code == 2


def _git(root, *args):
    import subprocess
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


def test_git_dirty_ignores_records_and_counts_code(tmp_path, monkeypatch):
    # A benchmark that rewrites its own tracked record must not mark the records written
    # after it as coming from a modified tree; a change to code must.
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "bench" / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "x")
    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)
    assert machine.git_dirty() is False
    (tmp_path / "bench" / "results" / "r.json").write_text('{"new": 1}\n')
    assert machine.git_dirty() is False
    (tmp_path / "code.py").write_text("a = 2\n")
    assert machine.git_dirty() is True


def test_git_state_from_the_environment_without_history(tmp_path, monkeypatch):
    # A working tree copied without .git (the GPU machine's): the command that copied it
    # says which commit it is.
    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above either
    monkeypatch.delenv("DIFFMEM_GIT_COMMIT", raising=False)
    monkeypatch.delenv("DIFFMEM_GIT_DIRTY", raising=False)
    assert machine.git_commit() == "unknown" and machine.git_dirty() is None
    monkeypatch.setenv("DIFFMEM_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("DIFFMEM_GIT_DIRTY", "0")
    assert machine.git_commit() == "0123abc" and machine.git_dirty() is False
