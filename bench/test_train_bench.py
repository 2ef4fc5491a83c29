"""pytest-benchmark timings of one DDPM++ training step at a tiny size, reusing
bench/train_throughput.py's Trainer (the step the CLI times).

    pytest bench/test_train_bench.py --benchmark-only

Lives in bench/, outside the `tests` testpath, so `pytest tests` never runs it.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    from bench import knn, train_throughput as tt
except ImportError:  # --import-mode=importlib does not put the repo root on sys.path
    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from bench import knn, train_throughput as tt

CHANNELS, BLOCKS, RESOLUTION, BATCH = 16, 2, 16, 4
THREADS = 2  # same default as the CLI, so numbers are comparable with its CPU results
WARMUP = 2   # untimed steps first (allocator, oneDNN / cuDNN choices, compilation)

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CASES = [
    ("cpu", "fp32_eager"),
    ("cpu", "bf16_autocast"),
    *[pytest.param("cuda", name, marks=_no_cuda)
      for name in ("fp32_eager", "tf32", "bf16_autocast", "bf16_channels_last",
                   "bf16_channels_last_compile")],
]


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


@pytest.fixture(scope="module")
def setup():
    kwargs = tt.model_kwargs(CHANNELS, BLOCKS, RESOLUTION)
    pool = tt.POOL_BATCHES * BATCH
    images, _ = tt.load_images("random", pool, RESOLUTION, seed=0)
    return kwargs, images, tt.batch_indices(pool, BATCH, 2 * tt.POOL_BATCHES, seed=0)


@pytest.mark.parametrize("device,variant", CASES)
def test_train_step(benchmark, setup, device, variant):
    kwargs, images, indices = setup
    sync = knn.sync_for(device)
    with tt.Trainer(tt.VARIANTS[variant], kwargs, images, indices, device) as trainer:
        for _ in range(WARMUP):
            trainer.step()
        sync()

        def step():
            loss = trainer.step()
            sync()  # GPU calls are asynchronous; time until the step has finished
            return loss

        benchmark.extra_info.update(channels=CHANNELS, blocks=BLOCKS, resolution=RESOLUTION,
                                    batch=BATCH, variant=variant, device=device)
        loss = benchmark(step)
        assert math.isfinite(float(loss))  # a fast step that trains nothing is no result
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # absent under --benchmark-disable
            benchmark.extra_info["images_per_s"] = BATCH / stats.stats.median
