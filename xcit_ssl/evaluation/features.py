"""Frozen-backbone feature extraction with an on-disk cache.

Features are the backbone's normalised CLS token ``[N, D]`` computed in eval mode under the
protocol's eval transform (REFERENCE.md section 3). Offline extraction runs through Lightning's
``Trainer.predict`` so one code path covers CPU, one GPU and several GPUs (DDP shards are written
to disk and reassembled by dataset index, which is exact for any number of images). Results are
cached as safetensors files keyed by the weights' sha256 and everything else that changes the
features (transform, dataset, split, subset), so evaluating the same checkpoint twice extracts once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..console import quiet_loggers
from ..data.images import Unreadable, skipping_unreadable
from ..files import atomic_path

log = logging.getLogger(__name__)

# Bump when the meaning of cached features changes (e.g. a different token), to invalidate caches.
# 2: unreadable images are left out (and listed) instead of replaced by their neighbours.
FEATURE_VERSION = 2
_CALLS = itertools.count()


@dataclass
class FeatureSet:
    """``features [N, D]`` float32 and ``labels [N]`` int64, in dataset order; ``unreadable [U]``
    int64: dataset indices of the images that could not be decoded and are not among the N."""

    features: Tensor
    labels: Tensor
    unreadable: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return self.features.shape[0]


class CLSFeatures(nn.Module):
    """Wraps a backbone so that ``forward(images [B, 3, H, W]) -> [B, D]`` is the normalised CLS.

    Uses ``forward_features`` (timm's contract, ``[B, 1+N, D]``) so a classifier head, if any, is
    ignored. ``pooling="cls+mean_patch"`` returns ``[B, 2D]``: the CLS and the mean of the patch
    tokens of the same (normalised) output. ``pooling="cls+pyramid"`` returns ``[B, 6D]``: the CLS,
    then a two-level spatial pyramid of the patch-token grid (``H/p x W/p``, row-major): its mean, and
    the means of its four quadrants (top-left, top-right, bottom-left, bottom-right; an odd side
    splits as adaptive average pooling does, the middle row/column shared).
    ``pooling="cls+pyramid3"`` returns ``[B, 22D]``: the same with a third level, the 4 x 4 adaptive
    average pool of the grid (row-major; at 32 px and patch 8 the grid itself), as in spatial pyramid
    pooling (He et al., 2014) and the pooled-feature-map linear probes of SSL benchmarks.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in POOLING_WIDTH:
            raise ValueError(f"pooling must be one of {sorted(POOLING_WIDTH)}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.backbone.forward_features(images)
        if self.pooling == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        if self.pooling == "cls+mean_patch":
            return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
        p = int(getattr(self.backbone, "patch_size", 16))
        h, w = images.shape[-2] // p, images.shape[-1] // p
        cells_per_level = POOLING_PYRAMID[self.pooling]
        side = max(cells_per_level)
        if h * w != patches.shape[1] or min(h, w) < side:
            raise ValueError(f"{self.pooling} needs a patch grid of at least {side}x{side} matching the tokens: "
                             f"images {tuple(images.shape[-2:])} at patch {p} give {h}x{w}, tokens {patches.shape[1]}")  # fmt: skip
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)  # [B, D, h, w]
        levels = [tokens[:, 0], patches.mean(dim=1)]
        for cells in cells_per_level:
            levels.append(nn.functional.adaptive_avg_pool2d(grid, cells).flatten(2).transpose(1, 2).flatten(1))  # [B, cells^2 D]
        return torch.cat(levels, dim=-1)


#: feature width of each pooling option, in multiples of the backbone's embed_dim
POOLING_WIDTH = {"cls": 1, "cls+mean_patch": 2, "cls+pyramid": 6, "cls+pyramid3": 22}
#: the cells per side of each spatial-pyramid level below the grid mean (the last: the smallest grid it reads)
POOLING_PYRAMID = {"cls+pyramid": (2,), "cls+pyramid3": (2, 4)}


class RawPixels(nn.Module):
    """The baseline every learned feature must beat: ``[B, 3, H, W] -> [B, 3HW]``, the transformed
    (resized, cropped, normalised) pixels themselves."""

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1)


class TransformedDataset(Dataset):
    """``(image, label)`` dataset -> ``(transform(image), label, index)``; the index lets shards
    computed on different processes be put back in dataset order. An :class:`Unreadable` image
    (datasets opened with ``skipping_unreadable``) passes through untransformed, for
    :func:`collate_readable` to leave out."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.dataset[index]
        return (image if isinstance(image, Unreadable) else self.transform(image)), int(label), index


def collate_readable(samples: list[tuple[Any, int, int]]) -> tuple[Tensor | None, Tensor, Tensor, list[tuple[int, str, str]]]:
    """Batch ``(image, label, index)`` samples, leaving out unreadable ones: ``(images [B, 3, H, W]
    or None when none is readable, labels [B], index [B], [(index, path, reason) of the others]``."""
    good = [s for s in samples if not isinstance(s[0], Unreadable)]
    bad = [(int(s[2]), s[0].path, s[0].reason) for s in samples if isinstance(s[0], Unreadable)]
    images = torch.stack([s[0] for s in good]) if good else None
    labels = torch.tensor([s[1] for s in good], dtype=torch.int64)
    index = torch.tensor([s[2] for s in good], dtype=torch.int64)
    return images, labels, index, bad


class UnreadableFiles:
    """The unreadable files an evaluation met, each logged and counted once however often it is read."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.index: dict[int, str] = {}

    def note(self, batch: Any) -> None:
        """Record the unreadable samples of a :func:`collate_readable` batch (other batches: nothing)."""
        bad = batch[3] if isinstance(batch, (list, tuple)) and len(batch) == 4 else []
        for index, path, reason in bad:
            if index not in self.index:
                self.index[index] = path
                log.warning("%s: left out unreadable image %s (%s)", self.what, path, reason)

    def __len__(self) -> int:
        return len(self.index)

    def as_tensor(self) -> Tensor:
        return torch.tensor(sorted(self.index), dtype=torch.int64)


# -- hashing -------------------------------------------------------------------------------------


# -- cache ---------------------------------------------------------------------------------------


class FeatureCache:
    """Safetensors files ``<dir>/<key>.safetensors`` holding ``features``, ``labels`` and the key's
    description as metadata. Writes are atomic (temp file + rename)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @staticmethod
    def make_key(**parts: Any) -> str:
        """Stable key from JSON-serialisable parts (weights sha256, transform, dataset, split...)."""
        blob = json.dumps({"feature_version": FEATURE_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> FeatureSet | None:
        from safetensors.torch import load_file  # noqa: PLC0415

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a truncated/corrupt cache entry is just a miss
            log.warning("ignoring unreadable feature cache %s (%s)", path, err)
            return None
        unreadable = tensors.get("unreadable", torch.zeros(0, dtype=torch.int64))
        return FeatureSet(tensors["features"], tensors["labels"], unreadable)

    def save(self, key: str, features: FeatureSet, description: dict[str, Any]) -> Path:
        from safetensors.torch import save_file  # noqa: PLC0415

        path = self.path(key)
        tensors = {"features": features.features.contiguous(), "labels": features.labels.contiguous(),
                   "unreadable": features.unreadable.contiguous()}  # fmt: skip
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        with atomic_path(path, needed=needed) as tmp:
            save_file(tensors, str(tmp), metadata={"xcit_ssl_features": json.dumps(description, default=str)})
        return path


def cached_features(
    cache: FeatureCache | None, key: str, description: dict[str, Any], compute: Callable[[], FeatureSet | None]
) -> tuple[FeatureSet | None, bool]:
    """Return ``(features, hit)``: the cached set for ``key``, or ``compute()`` stored under it.

    ``compute`` may return None (a non-zero DDP rank); nothing is stored then.
    """
    if cache is not None:
        found = cache.load(key)
        if found is not None:
            log.info("feature cache hit: %s", cache.path(key))
            return found, True
    result = compute()
    if cache is not None and result is not None:
        log.info("feature cache write: %s", cache.save(key, result, description))
    return result, False


@contextmanager
def quiet_lightning_info() -> Iterator[None]:
    """Silence Lightning's info lines (accelerator banner, logger tips) while building a Trainer:
    an evaluation command's output is its progress bar and its table."""
    with quiet_loggers("lightning.pytorch.utilities.rank_zero"):
        yield


# -- extraction ----------------------------------------------------------------------------------


def _check_features(out: Tensor, batch: int) -> Tensor:
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(f"the feature model must return [B, D] features, got shape {tuple(out.shape)}")
    return out.float()


@torch.no_grad()
def embed_loader(
    embed: Callable[[Tensor], Tensor], loader: Iterable, device: torch.device | str
) -> FeatureSet:
    """Plain loop (no Trainer): ``embed(images [B, 3, H, W]) -> [B, D]`` over ``(x, y[, idx])`` batches.

    Used inside a running ``fit`` (the online monitor), where a nested Trainer is not possible.
    """
    feats, labels = [], []
    unreadable = UnreadableFiles("feature extraction")
    for batch in loader:
        unreadable.note(batch)
        images, targets = batch[0], batch[1]
        if images is None:  # a batch of unreadable files only
            continue
        out = _check_features(embed(images.to(device, non_blocking=True)), images.shape[0])
        feats.append(out.cpu())
        labels.append(torch.as_tensor(targets).long().cpu())
    if not feats:
        raise ValueError("no readable image to extract features from")
    return FeatureSet(torch.cat(feats), torch.cat(labels), unreadable.as_tensor())


class _PredictFeatures(pl.LightningModule):
    """Runs the feature model in eval mode; each rank writes its shard, rank 0 reassembles."""

    def __init__(self, model: nn.Module, num_samples: int, shard_dir: Path) -> None:
        super().__init__()
        self.model = model
        self.num_samples = num_samples
        self.shard_dir = shard_dir
        self._parts: list[tuple[Tensor, Tensor, Tensor]] = []
        self._unreadable = UnreadableFiles("feature extraction")
        self.result: FeatureSet | None = None

    def on_predict_start(self) -> None:
        self.model.eval()  # BatchNorm uses running statistics, dropout/drop-path off

    def predict_step(self, batch: tuple[Any, ...], batch_idx: int) -> int:
        self._unreadable.note(batch)
        images, labels, index = batch[:3]
        if images is None:  # a batch of unreadable files only
            return 0
        out = _check_features(self.model(images), images.shape[0])
        self._parts.append((out.cpu(), labels.long().cpu(), index.long().cpu()))
        return images.shape[0]  # not collected (return_predictions=False); None would only warn

    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        parts, self._parts = self._parts, []
        dim = parts[0][0].shape[1] if parts else 0
        feats = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dim)
        labels = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        index = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        unreadable = self._unreadable.as_tensor()
        del parts
        if self.trainer.world_size == 1:
            # one process reads in order: no reassembly (saves a copy of N x D at ImageNet scale)
            readable = torch.ones(self.num_samples, dtype=torch.bool)
            readable[unreadable] = False
            if not torch.equal(index, torch.arange(self.num_samples)[readable]):
                raise RuntimeError("feature extraction did not visit the dataset once, in order")
            self.result = FeatureSet(feats, labels, unreadable)
            return
        with atomic_path(self.shard_dir / f"rank{self.global_rank}.pt") as tmp:
            torch.save((feats, labels, index, unreadable), tmp)
        strategy.barrier("features_written")
        if self.trainer.is_global_zero:
            shards = [torch.load(self.shard_dir / f"rank{r}.pt", weights_only=True) for r in range(self.trainer.world_size)]
            self.result = self._assemble(shards)
        strategy.barrier("features_read")

    def _assemble(self, shards: list[tuple[Tensor, ...]]) -> FeatureSet:
        dim = max(s[0].shape[1] for s in shards)
        features = torch.empty(self.num_samples, dim)
        labels = torch.full((self.num_samples,), -1, dtype=torch.int64)
        seen = torch.zeros(self.num_samples, dtype=torch.bool)
        unreadable = torch.zeros(self.num_samples, dtype=torch.bool)
        for f, y, i, bad in shards:
            unreadable[bad] = True
            if len(i):
                features[i], labels[i], seen[i] = f, y, True
        if not bool((seen | unreadable).all()):
            raise RuntimeError(f"feature extraction missed {int((~(seen | unreadable)).sum())} of {self.num_samples} samples")
        keep = seen & ~unreadable
        return FeatureSet(features[keep], labels[keep], unreadable.nonzero().flatten())


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    transform: Callable[[Any], Tensor],
    batch_size: int = 256,
    num_workers: int = 4,
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str = "32-true",
    progress: bool = True,
) -> FeatureSet | None:
    """Features ``[N, D]`` of a ``(image, label)`` dataset, in dataset order.

    ``model(images [B, 3, H, W]) -> [B, D]`` (e.g. :class:`CLSFeatures`). With several devices the
    work is split by Lightning's unrepeated distributed sampler; only global rank 0 gets the
    result, the other ranks get None. Images that fail to decode are left out and listed in
    ``unreadable`` (the dataset is read under the evaluation policy, ``skipping_unreadable``).
    """
    loader = DataLoader(
        TransformedDataset(skipping_unreadable(dataset), transform), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
        collate_fn=collate_readable,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xcit_ssl_features_") as tmp:
        with quiet_lightning_info():
            trainer = pl.Trainer(
                accelerator=accelerator, devices=devices, precision=precision, logger=False,
                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                default_root_dir=tmp,
            )  # fmt: skip
        shard_dir = Path(tmp)
        if trainer.world_size > 1:
            # every rank must agree on one shard folder: rank 0's temp dir is not visible to others,
            # so use a folder beside the (shared) working directory, named per launch
            # (ranks make the same sequence of calls, so a per-process counter names it consistently)
            root = Path(os.environ.get("XCIT_SSL_SHARD_DIR", ".xcit_ssl_feature_shards"))
            shard_dir = root / f"call{next(_CALLS)}"
            shard_dir.mkdir(parents=True, exist_ok=True)
        module = _PredictFeatures(model, len(dataset), shard_dir)  # type: ignore[arg-type]
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if trainer.world_size > 1 and trainer.is_global_zero:
            shutil.rmtree(shard_dir, ignore_errors=True)
    return module.result
