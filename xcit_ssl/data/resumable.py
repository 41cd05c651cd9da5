"""Training data whose order and augmentation draws survive a kill: exact mid-epoch resume.

Three pieces make a resumed run see the same remaining samples with the same random crops as
the uninterrupted run, whatever the number of DataLoader workers:

- :class:`EpochTaggedSampler` yields *tagged* indices ``epoch * N + i`` (``N`` the data set size),
  from any ``DistributedSampler`` (Lightning leaves a ``DistributedSampler`` subclass in place
  under DDP and calls ``set_epoch`` on it every epoch, so every rank shards one seeded
  permutation).
- :class:`SeededSamples` decodes a tagged index and draws the sample's augmentation from its own
  seed ``(run seed, epoch, i)``: torch, NumPy and Python's ``random`` are seeded per sample and
  restored afterwards, so no worker's history and no state of the training process's RNG matter.
- :func:`resumable_loader` builds a torchdata ``StatefulDataLoader`` (Lightning stores its
  ``state_dict`` in every checkpoint and restores it on resume, skipping what was already
  served) over them. Its own ``generator`` keeps data loading from consuming the training
  process's global RNG, which the model's stochastic depth uses.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .workers import worker_init

__all__ = ["EpochTaggedSampler", "SeededSamples", "resumable_loader", "run_seed", "sample_seed"]


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``), 0 when none was set."""
    value = os.environ.get("PL_GLOBAL_SEED", "0")
    return int(value) if value.lstrip("-").isdigit() else 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch, well mixed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


class EpochTaggedSampler(DistributedSampler):
    """Wraps a ``DistributedSampler`` and yields ``epoch * N + i`` for each index ``i`` it yields.

    ``set_epoch`` reaches the wrapped sampler, so its shuffling, sharding and padding rules (and
    its epoch length) are unchanged. It is stateful (``state_dict``: epoch and indices yielded),
    which is how ``StatefulDataLoader`` resumes it mid-epoch: the next ``__iter__`` after
    ``load_state_dict`` skips what the interrupted run had already used. ``start_epoch`` lets a
    loader built on resume know its epoch before Lightning's first ``set_epoch`` call.
    """

    def __init__(self, inner: DistributedSampler, start_epoch: int = 0) -> None:
        # Deliberately no super().__init__(): it would ask torch.distributed for the world.
        self.inner = inner
        self.dataset = inner.dataset
        self.num_replicas, self.rank = inner.num_replicas, inner.rank
        self.shuffle, self.seed, self.drop_last = inner.shuffle, inner.seed, inner.drop_last
        self.yielded = 0
        self._skip_next: int | None = None
        self.set_epoch(start_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.inner.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip_next = self._skip_next or 0, None
        size = len(self.dataset)  # type: ignore[arg-type]
        offset = self.epoch * size
        self.yielded = skip
        for i in itertools.islice(iter(self.inner), skip, None):
            self.yielded += 1
            yield offset + int(i)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]))
        self._skip_next = int(state["yielded"])


def _seed_cpu_rngs(seed: int) -> None:
    """Seed torch's CPU generator, Python's and NumPy's. Not ``torch.manual_seed``: it also seeds
    every CUDA device (queued with a captured traceback while CUDA is uninitialised: 1.7 ms a
    sample, more than a 32-px image's four crops) and, in a main-process loader of a GPU run, would
    reset the training step's CUDA stream at every sample, outside what ``fork_rng`` restores."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class SeededSamples(Dataset):
    """Reads tagged indices ``epoch * N + i`` of ``dataset`` with per-sample seeded augmentation.

    ``dataset[i]`` runs inside a fork of torch's, NumPy's and Python's RNG seeded with
    ``sample_seed(seed, epoch, i)``; the caller's RNG states are restored afterwards (in the main
    process; a DataLoader worker's RNGs are simply reseeded for every sample). Plain
    indices ``< N`` are epoch 0. Attributes of ``dataset`` (``classes``, ``num_skipped``, ...) are
    reachable through this wrapper.
    """

    def __init__(self, dataset: Dataset, seed: int | None = None) -> None:
        self.dataset = dataset
        self.seed = run_seed() if seed is None else int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, tagged: int) -> Any:
        size = len(self)
        epoch, index = divmod(int(tagged), size)
        seed = sample_seed(self.seed, epoch, index)
        if torch.utils.data.get_worker_info() is not None:
            # A DataLoader worker: nothing else draws from its RNGs between samples and every
            # sample reseeds them, so there is no caller state to keep (saving and restoring
            # NumPy's costs ~0.2 ms a sample, a sixth of a 32-px image's whole cost).
            _seed_cpu_rngs(seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_cpu_rngs(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def resumable_loader(
    dataset: Dataset,
    sampler: DistributedSampler,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    drop_last: bool,
    start_epoch: int = 0,
    seed: int | None = None,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``SeededSamples(dataset)`` in the order of ``sampler``."""
    seed = run_seed() if seed is None else seed
    generator = torch.Generator().manual_seed(seed)  # worker base seeds: not the global RNG
    return StatefulDataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=EpochTaggedSampler(sampler, start_epoch),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=worker_init if num_workers > 0 else None,
    )


def default_sampler(dataset: Sized, world_size: int, rank: int, seed: int | None = None) -> DistributedSampler:
    """What Lightning would insert under DDP: one seeded permutation per epoch, sharded by rank."""
    seed = run_seed() if seed is None else seed
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
