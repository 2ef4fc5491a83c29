"""The order in which training images are fed: EDM's InfiniteSampler with window_size=0,
which DiffMemorize uses for every run.

The dataset indices are shuffled once with numpy's RandomState(seed) and then cycled in
that same order forever. The i-th image of the global stream is order[i mod |D|]; with P
processes, process r takes stream positions r, r + P, r + 2P, ... So at each step the P
processes together consume one contiguous block of `batch` stream positions, and a run
sees the same global batches whatever the number of processes.

Being a pure function of (step, process), the order needs no state to resume.
"""
from __future__ import annotations

import numpy as np


class CyclicOrder:
    def __init__(self, dataset_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        order = np.arange(dataset_size)
        np.random.RandomState(seed % (1 << 32)).shuffle(order)
        self.order = order
        self.rank = rank
        self.world_size = world_size

    def indices(self, step: int, batch_per_process: int, round_index: int = 0, batch_per_round: int | None = None) -> np.ndarray:
        """Dataset indices this process trains on at `step`, accumulation round
        `round_index` (each round takes the next batch_per_round images of the process's
        share of the step)."""
        batch_per_round = batch_per_process if batch_per_round is None else batch_per_round
        first_local = step * batch_per_process + round_index * batch_per_round
        local = np.arange(first_local, first_local + batch_per_round, dtype=np.int64)
        stream = local * self.world_size + self.rank
        return self.order[stream % len(self.order)]
