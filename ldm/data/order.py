"""A resumable, seeded order of training batches over a map-style dataset.

Batch k of a run is a pure function of (seed, k): epoch e visits a permutation drawn from a
generator seeded with (seed, e), and every sample gets its own augmentation seed. A run resumed at
step k therefore sees exactly the batches an uninterrupted run would, whatever the worker count.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of (index, sample_seed) from `start_step` on, endlessly (drop_last)."""

    def __init__(self, n_items: int, batch_size: int, *, seed: int, start_step: int = 0):
        if n_items < batch_size:
            raise ValueError(f"dataset has {n_items} items, fewer than one batch of {batch_size}")
        self.n_items, self.batch_size, self.seed, self.start_step = n_items, batch_size, seed, start_step
        self.steps_per_epoch = n_items // batch_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            epoch, within = divmod(step, self.steps_per_epoch)
            order = self._epoch_order(epoch)
            for b in range(within, self.steps_per_epoch):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
                base = (self.seed * 7919 + epoch) * self.n_items
                yield [(i, base + i) for i in idx]
                step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len() calls we never make
        return 2 ** 62


class SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is made under its own RNG seed (for augmentation)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            state = random.getstate()
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)
