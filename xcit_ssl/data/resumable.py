"""Training data whose order and augmentation draws survive a kill: exact mid-epoch resume.

Three pieces make a resumed run see the same remaining samples with the same random crops as
the uninterrupted run, whatever the number of DataLoader workers:

- :class:`EpochTaggedSampler` deals one *global order* per epoch (the seeded permutation of a
  ``DistributedSampler``, or a sampler's own ``global_order``, e.g. repeated augmentation) to the
  ranks and accumulation steps, and yields *tagged* indices ``epoch * N + i`` (``N`` the data set
  size). Optimizer step ``k`` trains on the global batch ``order[k * G : (k + 1) * G]`` (``G`` =
  world size x per-device batch x accumulation), split into micro-batches by a stride rule that
  depends on ``G`` and the per-device batch only, so ``2 devices x 32`` and ``1 device x 32 x
  accumulation 2`` train on the same micro-batches (BatchNorm sees the same batches too). With one
  micro-batch per rank and step it deals exactly as ``DistributedSampler`` does (rank ``r`` takes
  ``order[r::world]``). Lightning calls ``set_epoch`` on it (a ``DistributedSampler`` subclass).
- :class:`SeededSamples` decodes a tagged index and draws the sample's augmentation from its own
  seed ``(run seed, epoch, i)``: torch, NumPy and Python's ``random`` are seeded per sample and
  restored afterwards, so no worker's history and no state of the training process's RNG matter.
- :func:`resumable_loader` builds a torchdata ``StatefulDataLoader`` (Lightning stores its
  ``state_dict`` in every checkpoint and restores it on resume, skipping what was already
  served) over them. Its own ``generator`` keeps data loading from consuming the training
  process's global RNG, which the model's stochastic depth uses.

The sampler's state records its split and its position in global samples, so a checkpoint resumed
with another split of the same global batch (elastic resume) continues at the same global sample;
another global batch is refused. A state without a split (written before it was recorded) resumes
as it always did.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..errors import UserError
from .workers import worker_init

__all__ = [
    "EpochTaggedSampler", "SeededSamples", "distributed_order", "resumable_loader", "run_seed", "sample_seed",
]  # fmt: skip


def run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``), 0 when none was set."""
    value = os.environ.get("PL_GLOBAL_SEED", "0")
    return int(value) if value.lstrip("-").isdigit() else 0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch, well mixed (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


def epoch_permutation(n: int, shuffle: bool, seed: int, epoch: int) -> Tensor:
    """``[n]`` indices of an epoch as torch's ``DistributedSampler`` draws them: ``randperm`` seeded
    with ``seed + epoch``, or ``arange`` without shuffling."""
    if not shuffle:
        return torch.arange(n)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator)


def distributed_order(sampler: DistributedSampler, epoch: int, multiple: int) -> Tensor:
    """The epoch's global order of a ``DistributedSampler`` as a 1-D index tensor.

    Its permutation (``torch.randperm`` seeded with ``seed + epoch``; ``arange`` without shuffling)
    padded by wrapping around to a multiple of ``multiple``, or cut to one under the sampler's own
    ``drop_last``: with ``multiple`` = world size, the list torch's ``DistributedSampler`` deals.
    """
    n = len(sampler.dataset)  # type: ignore[arg-type]
    order = epoch_permutation(n, sampler.shuffle, sampler.seed, epoch)
    if sampler.drop_last:
        return order[: n // multiple * multiple]
    total = -(-n // multiple) * multiple
    return order.repeat(-(-total // n))[:total] if total > n else order


class EpochTaggedSampler(DistributedSampler):
    """This rank's share of the epoch's global order, as tagged indices ``epoch * N + i``.

    Args:
        inner: the ``DistributedSampler`` whose world size, rank, seed and order it deals (a
            ``global_order(epoch, multiple)`` method, if it has one, gives the order).
        start_epoch: the epoch before Lightning's first ``set_epoch`` call (a loader built on resume).
        batch_size: per-device micro-batch; accumulate: micro-batches per optimizer step.
        drop_last: the loader drops its last incomplete batch: the sampler then also leaves out an
            epoch's last, incomplete global batch, so every optimizer step is a whole global batch.

    The micro-batches of step ``k`` are ``order[k*G + c :: M][:batch_size]`` for ``c < M`` (``M`` =
    world x accumulation streams); rank ``r`` trains streams ``c = a * world + r``, ``a`` its
    accumulation steps. It is stateful (``state_dict``: epoch, indices yielded, split, global
    position), which is how ``StatefulDataLoader`` resumes it mid-epoch: the next ``__iter__`` after
    ``load_state_dict`` skips what the interrupted run had already used.
    """

    def __init__(
        self,
        inner: DistributedSampler,
        start_epoch: int = 0,
        *,
        batch_size: int = 1,
        accumulate: int = 1,
        drop_last: bool = False,
    ) -> None:
        # Deliberately no super().__init__(): it would ask torch.distributed for the world.
        self.inner = inner
        self.dataset = inner.dataset
        self.num_replicas, self.rank = inner.num_replicas, inner.rank
        self.shuffle, self.seed, self.drop_last = inner.shuffle, inner.seed, inner.drop_last
        self.batch_size, self.accumulate = max(1, int(batch_size)), max(1, int(accumulate))
        self.drop_last_batch = bool(drop_last)
        self.yielded = 0
        self._skip_next: int | None = None
        self._cached: tuple[int, Tensor] | None = None
        self.set_epoch(start_epoch)

    @property
    def global_batch(self) -> int:
        return self.num_replicas * self.batch_size * self.accumulate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.inner.set_epoch(self.epoch)

    def global_order(self, epoch: int) -> Tensor:
        """The epoch's order over all ranks, padded to a multiple of world x accumulation."""
        streams = self.num_replicas * self.accumulate
        own = getattr(self.inner, "global_order", None)
        order = own(epoch, streams) if callable(own) else distributed_order(self.inner, epoch, streams)
        return torch.as_tensor(order, dtype=torch.int64)

    def indices(self, epoch: int) -> Tensor:
        """This rank's indices of ``epoch`` (untagged), in the order it trains them."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = self.global_order(epoch)
        world, batch, acc, rank = self.num_replicas, self.batch_size, self.accumulate, self.rank
        steps = len(order) // self.global_batch
        # step k's global batch as [B, A, W]: position j * A * W + a * W + r is micro-batch
        # (rank r, accumulation step a)'s j-th sample, i.e. stream c = a * W + r takes every M-th
        whole = order[: steps * self.global_batch].view(steps, batch, acc, world)[..., rank]
        mine = [whole.permute(0, 2, 1).reshape(-1)]
        tail = order[steps * self.global_batch :]  # the last, incomplete global batch
        if len(tail):
            share = tail.view(-1, acc, world)[..., rank].T.reshape(-1)
            # a share under one micro-batch is what the loader's drop_last drops (as it always
            # did); one that fills micro-batches would train a smaller last step: left out
            if not (self.drop_last_batch and len(share) >= batch):
                mine.append(share)
        self._cached = (epoch, torch.cat(mine))
        return self._cached[1]

    def __len__(self) -> int:
        return len(self.indices(self.epoch))

    def __iter__(self) -> Iterator[int]:
        skip, self._skip_next = self._skip_next or 0, None
        offset = self.epoch * len(self.dataset)  # type: ignore[arg-type]
        self.yielded = skip
        for i in self.indices(self.epoch)[skip:].tolist():
            self.yielded += 1
            yield offset + i

    def state_dict(self) -> dict[str, int]:
        # ``position``: global samples of this epoch trained by all ranks (each rank is at the
        # same count at an optimizer step, where checkpoints are written)
        return {
            "epoch": self.epoch, "yielded": self.yielded, "world_size": self.num_replicas,
            "batch_size": self.batch_size, "accumulate": self.accumulate, "position": self.yielded * self.num_replicas,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]))
        skip = int(state["yielded"])
        saved = tuple(state.get(k) for k in ("world_size", "batch_size", "accumulate"))
        if None not in saved and saved != (self.num_replicas, self.batch_size, self.accumulate):
            skip = self._elastic_skip(state, *(int(v) for v in saved))  # type: ignore[arg-type]
        self._skip_next = skip

    def _elastic_skip(self, state: dict[str, int], world: int, batch: int, accumulate: int) -> int:
        """Where this rank resumes a position saved under another split of the global batch."""
        position = int(state.get("position", int(state["yielded"]) * world))
        if world * batch * accumulate != self.global_batch:
            raise UserError(
                f"the checkpoint's data position is in global batches of {world * batch * accumulate} "
                f"({world} x {batch} x {accumulate}), this run's are {self.global_batch}: resume with the "
                "checkpoint's global batch (devices x --data.batch_size x --trainer.accumulate_grad_batches)"
            )
        if position % self.global_batch == 0:
            return position // self.num_replicas
        if position >= len(self.global_order(self.epoch)):  # the whole epoch was trained
            return len(self.indices(self.epoch))
        raise UserError(
            f"the checkpoint was written inside an optimizer step (global sample {position} of epoch "
            f"{self.epoch}), which only its own split can resume: pass --trainer.devices {world} "
            f"--data.batch_size {batch} --trainer.accumulate_grad_batches {accumulate}"
        )


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
    accumulate: int = 1,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``SeededSamples(dataset)``, ``sampler``'s order dealt by
    :class:`EpochTaggedSampler` into micro-batches of ``batch_size``, ``accumulate`` a step."""
    seed = run_seed() if seed is None else seed
    generator = torch.Generator().manual_seed(seed)  # worker base seeds: not the global RNG
    return StatefulDataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=EpochTaggedSampler(
            sampler, start_epoch, batch_size=batch_size, accumulate=accumulate, drop_last=drop_last
        ),
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
