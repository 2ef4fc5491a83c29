"""pytest-benchmark timings of exact top-k at a small size, reusing bench/knn.py's methods.

    pytest bench/test_knn_bench.py --benchmark-only

Lives in bench/, outside the `tests` testpath, so `pytest tests` never runs it.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from bench import knn, knn_check, knn_data, knn_methods
except ImportError:  # --import-mode=importlib does not put the repo root on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from bench import knn, knn_check, knn_data, knn_methods

Q, N, D, K = 256, 2048, 3072, 2
THREADS = 2  # same default as the CLI, so numbers are comparable with its CPU results

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
]


@pytest.fixture(scope="module")
def data():
    queries, refs, _ = knn_data.random_pixels(Q, N, D, seed=0)
    return queries, refs


@pytest.fixture(scope="module")
def exact(data):
    return knn_check.ExactSample(*data, K, rows=16)


@pytest.fixture(scope="module", autouse=True)
def threads():
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    knn.set_threads(THREADS)
    yield
    torch.set_num_threads(before)  # leave the process as other test modules expect it
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module", params=DEVICES)
def inputs(request, data):
    return knn_methods.Inputs(*data, K, request.param)


def run_benchmark(benchmark, inputs, name: str, dtype: str = "float32"):
    """Time one method with pytest-benchmark; skip where the method cannot run."""
    try:
        method = knn_methods.BUILDERS[name](inputs, dtype)
    except knn_methods.Skipped as exc:
        pytest.skip(str(exc))
    sync = knn.sync_for(inputs.device.type)

    def call():
        out = method.run()
        sync()  # GPU calls are asynchronous; time until the result exists
        return out

    benchmark.extra_info.update(Q=Q, N=N, d=D, k=K, dtype=dtype, computes_in=method.computes_in)
    return benchmark(call)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_diffmem(benchmark, inputs, exact, dtype):
    dist, idx = run_benchmark(benchmark, inputs, "diffmem", dtype)
    assert tuple(idx.shape) == (Q, K)
    assert exact.check(dist, idx)["rows_wrong"] == 0  # a fast wrong answer is no result


def test_cdist_topk(benchmark, inputs):
    dist, idx = run_benchmark(benchmark, inputs, "cdist_topk")
    assert tuple(idx.shape) == (Q, K)


def test_faiss_flat_l2(benchmark, inputs):
    dist, idx = run_benchmark(benchmark, inputs, "faiss_flat_l2")
    assert tuple(idx.shape) == (Q, K)


def test_bare_gemm_int8(benchmark, inputs):
    run_benchmark(benchmark, inputs, "bare_gemm_int8")  # the floor, for scale
