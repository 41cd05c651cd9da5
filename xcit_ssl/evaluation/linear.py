"""Linear probes on frozen features (the DINO protocol, REFERENCE.md section 3).

:class:`LinearProbe` is the protocol: a frozen backbone in eval mode, one ``Linear(D, C)`` on the
final CLS (weight N(0, 0.01), bias 0), SGD momentum 0.9, weight decay 0,
lr = base_lr x global_batch / 256 (base_lr 1e-3), cosine to 0 over the epochs (stepped per epoch,
as DINO's ``eval_linear.py``), RandomResizedCrop + flip for training, 256 -> 224 for validation.

The headline is the last evaluated epoch: the weights the probe ends with, no epoch chosen by its
accuracy on the evaluation images. DINO published the best epoch on the validation set; that number
stays in the result as the labelled diagnostic ``best_on_val`` (optimistic: chosen on the test images).
A training set that gives fewer than :data:`MIN_STEPS_PER_EPOCH` optimiser steps per epoch is
warned about (:func:`few_steps_note`), and top-5 is not reported with 5 classes or fewer.

:func:`train_linear_on_features` is a *fast variant* (not the protocol): the same optimiser and
schedule on cached eval-transform features, so no augmentation. Its output is labelled as such.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .features import UnreadableFiles
from .metrics import top1_top5_correct, top5_applies, top5_note

log = logging.getLogger(__name__)


def build_linear_train_transform(
    crop_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    interpolation: Literal["bilinear", "bicubic"] = "bilinear",
) -> v2.Compose:
    """DINO's linear-probe train transform: PIL image -> float ``[3, crop, crop]``.

    RandomResizedCrop(crop, scale) + horizontal flip + normalise. DINO's ``eval_linear.py`` uses
    torchvision's default (bilinear) interpolation here, hence the default.
    """
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return v2.Compose([
        v2.RGB(),
        v2.ToImage(),
        v2.RandomResizedCrop(crop_size, scale=scale, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
        v2.ToPureTensor(),
    ])  # fmt: skip


#: below this many optimiser steps per epoch a probe is warned about: on a few hundred images the
#: default batch (1024) is one step per epoch, and the probe can end near chance without a word
MIN_STEPS_PER_EPOCH = 10
BEST_ON_VAL_NOTE = ("a diagnostic, not a result: the epoch picked by its accuracy on the evaluation images "
                    "themselves, hence optimistic (DINO published its linear numbers this way)")  # fmt: skip


def few_steps_note(num_train: int, global_batch: int, epochs: int, steps_per_epoch: int | None = None) -> str | None:
    """The warning for a probe with too few optimiser steps per epoch, None when there are enough.

    Advice, not a silent cap: on 40 images of 4 Fashion-MNIST classes (random-init XCiT-N12, fast probe,
    base_lr 1e-3) batch 1024 ended at 60 % top-1, batch 4 at chance (its lr falls with it), batch 4
    with the lr sweep at 65 %."""
    steps = steps_per_epoch if steps_per_epoch is not None else math.ceil(num_train / max(1, global_batch))
    if steps >= MIN_STEPS_PER_EPOCH:
        return None
    batch = max(1, num_train // MIN_STEPS_PER_EPOCH)
    return (f"{num_train} training images at batch {global_batch} make {steps} optimiser step(s) per epoch "
            f"({steps * epochs} in all): the probe may stay near chance. On a set this small pass "
            f"--linear.batch_size {batch} ({MIN_STEPS_PER_EPOCH} steps per epoch) with --linear.fast true "
            "--linear.lr_sweep '[0.01, 0.1, 1.0, 10.0]' (the lr chosen on held-out training images)")  # fmt: skip


@dataclass
class ProbeHistory:
    """Per-epoch validation accuracies (percent) and the summary; ``epochs``: the epoch number of each
    entry, ``num_train`` / ``num_val``: images the probe trained on / was evaluated on,
    ``unreadable``: files left out, ``notes``: warnings a reader of the numbers must see."""

    top1: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    unreadable: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    epochs: list[int] = field(default_factory=list)
    num_classes: int = 0  # 0: unknown (top-5 then reported)
    notes: list[str] = field(default_factory=list)

    def record(self, epoch: int, top1: float, top5: float) -> None:
        """One evaluated epoch (1-based)."""
        self.epochs.append(epoch)
        self.top1.append(top1)
        self.top5.append(top5)

    @property
    def top5_reported(self) -> bool:
        """False with 5 classes or fewer (an unknown count, 0, reports it)."""
        return not self.num_classes or top5_applies(self.num_classes)

    def _top5(self, i: int) -> float | None:
        return self.top5[i] if self.top5_reported else None

    def summary(self) -> dict[str, Any]:
        """The headline ``top1`` / ``top5`` / ``epoch`` of the last evaluated epoch, ``best_on_val``
        (labelled diagnostic), counts and notes; ``top5`` is None with 5 classes or fewer."""
        counts = {"num_train": self.num_train, "num_val": self.num_val, "unreadable": dict(self.unreadable)}
        notes = list(self.notes) + ([] if self.top5_reported else [top5_note(self.num_classes)])
        extra = {"notes": notes} if notes else {}
        if not self.top1:
            return {"epochs_evaluated": 0, **counts, **extra}
        epochs = self.epochs or list(range(1, len(self.top1) + 1))
        best = max(range(len(self.top1)), key=lambda i: self.top1[i])
        return {
            "top1": self.top1[-1], "top5": self._top5(-1), "epoch": epochs[-1], "headline": "last epoch",
            "best_on_val": {"top1": self.top1[best], "top5": self._top5(best), "epoch": epochs[best],
                            "note": BEST_ON_VAL_NOTE},
            "epochs_evaluated": len(self.top1), **counts, **extra,
        }  # fmt: skip


def _init_linear(dim: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, mean=0.0, std=0.01)  # DINO LinearClassifier init
    nn.init.zeros_(linear.bias)
    return linear


class LinearProbe(pl.LightningModule):
    """One linear layer on a frozen feature model; the feature model never leaves eval mode.

    ``features(images [B, 3, H, W]) -> [B, D]`` (e.g. :class:`~.features.CLSFeatures`).
    ``batch_size`` is the per-device batch; the lr scales with the global batch. Under DDP,
    Lightning's validation sampler pads the last shard with repeats (as DINO's did), so val
    accuracy can count up to ``world_size - 1`` images twice.
    """

    def __init__(
        self,
        features: nn.Module,
        feature_dim: int,
        num_classes: int,
        epochs: int = 100,
        base_lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 128,
    ) -> None:
        super().__init__()
        self.features = features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.linear = _init_linear(feature_dim, num_classes)
        self.epochs, self.base_lr, self.momentum = epochs, base_lr, momentum
        self.weight_decay, self.batch_size = weight_decay, batch_size
        self.history = ProbeHistory(num_classes=num_classes)
        self._correct = torch.zeros(3)  # top-1 hits, top-5 hits, count
        self.unreadable = {split: UnreadableFiles(f"linear probe ({split})") for split in ("train", "val")}

    def train(self, mode: bool = True) -> LinearProbe:
        # Lightning calls .train() on the whole module each epoch; BatchNorm statistics of the
        # frozen backbone must not move, so the feature model is pinned to eval mode.
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> logits ``[B, C]``."""
        with torch.no_grad():
            feats = self.features(images).float()
        return self.linear(feats)

    def training_step(self, batch: tuple[Any, ...], batch_idx: int) -> Tensor | None:
        self.unreadable["train"].note(batch)
        if batch[0] is None:  # every image of the batch was unreadable: no step
            return None
        logits = self(batch[0])
        loss = F.cross_entropy(logits, batch[1])
        self.log("linear/train_loss", loss, prog_bar=True, batch_size=batch[1].shape[0])
        return loss

    def on_train_start(self) -> None:
        loader = self.trainer.train_dataloader
        steps = self.trainer.num_training_batches
        if loader is None or not hasattr(loader, "dataset") or not math.isfinite(steps):
            return
        global_batch = self.batch_size * self.trainer.world_size
        note = few_steps_note(len(loader.dataset), global_batch, self.epochs, int(steps))
        if note is not None:
            log.warning("linear probe: %s", note)
            self.history.notes.append(note)

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[Any, ...], batch_idx: int) -> None:
        self.unreadable["val"].note(batch)
        if batch[0] is None:
            return
        logits = self(batch[0])
        top1, top5 = top1_top5_correct(logits, batch[1])
        self._correct += torch.stack([top1, top5, torch.tensor(batch[1].shape[0], device=self.device)]).double()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        total = self.trainer.strategy.reduce(self._correct, reduce_op="sum")
        top1, top5 = (100.0 * total[:2] / total[2].clamp(min=1)).tolist()
        self.history.record(self.current_epoch + 1, top1, top5)
        self.history.num_val = int(total[2])
        metrics = {"linear/val_top1": top1}
        if self.history.top5_reported:  # not with 5 classes or fewer: it would read 100 %
            metrics["linear/val_top5"] = top5
        self.log_dict(metrics, prog_bar=True, sync_dist=False)
        log.info("linear probe epoch %d: val top-1 %.2f%s", self.current_epoch + 1, top1,
                 f" top-5 {top5:.2f}" if self.history.top5_reported else "")  # fmt: skip

    def on_fit_end(self) -> None:
        """Count each unreadable file once over all epochs and processes (DDP ranks see different files)."""
        found = {split: dict(files.index) for split, files in self.unreadable.items()}
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, found)
            found = {split: {k: v for g in gathered for k, v in g[split].items()} for split in found}
        self.history.unreadable = {split: len(files) for split, files in found.items()}

    def configure_optimizers(self) -> Any:
        global_batch = self.batch_size * self.trainer.world_size
        lr = self.base_lr * global_batch / 256.0
        opt = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs, eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def train_linear_on_features(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    epochs: int = 100,
    base_lr: float = 1e-3,
    batch_size: int = 1024,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[nn.Linear, ProbeHistory]:
    """Fast variant: the protocol's optimiser and schedule on cached features, no augmentation.

    ``train_features [N, D]``, ``val_features [M, D]``; labels ``[N]``/``[M]``. ``batch_size`` is
    the global batch (lr = base_lr x batch_size / 256). Returns the trained layer and the per-epoch
    validation history (with a note when the set gives too few steps per epoch: :func:`few_steps_note`).
    """
    note = few_steps_note(int(train_features.shape[0]), batch_size, epochs)
    if note is not None:
        log.warning("linear_fast: %s", note)
    (linear, history), = _train_linears_jointly(
        train_features, train_labels, val_features, val_labels, (base_lr,), epochs=epochs, batch_size=batch_size,
        momentum=momentum, weight_decay=weight_decay, device=device, seed=seed,
        on_epoch=None if on_epoch is None else (lambda e, t1, t5: on_epoch(e, t1[0], t5[0])),
    )  # fmt: skip
    history.notes += [note] if note is not None else []
    return linear, history


def _train_linears_jointly(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    base_lrs: Sequence[float],
    epochs: int = 100,
    batch_size: int = 1024,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[int, list[float], list[float]], None] | None = None,
) -> list[tuple[nn.Linear, ProbeHistory]]:
    """One probe per base lr, trained side by side in one pass over the data.

    Every probe is what a run of its own would be: the same seeded initial weights, the same seeded
    batch order, its own SGD parameter group (lr = base_lr x batch_size / 256, momentum, weight
    decay) and cosine schedule; the loss is the sum of the probes' cross-entropies, so no probe's
    gradient touches another's weights. What they share is the gather of each batch and one matrix
    product for all their logits ([B, D] x [D, K x C]), which is what makes an lr sweep over K
    rates cost about one run instead of K.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    linears = []
    for _ in base_lrs:
        torch.manual_seed(seed)  # each probe starts where a run of its own would
        linears.append(_init_linear(train_features.shape[1], num_classes).to(device))
    groups = [{"params": list(lin.parameters()), "lr": lr * batch_size / 256.0} for lin, lr in zip(linears, base_lrs)]
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    x_train, y_train = train_features.float().to(device), train_labels.long().to(device)
    x_val, y_val = val_features.float().to(device), val_labels.long().to(device)
    k = len(linears)

    def logits(x: Tensor) -> Tensor:  # [B, K, C]
        w = torch.cat([lin.weight for lin in linears])
        b = torch.cat([lin.bias for lin in linears])
        return F.linear(x, w, b).view(x.shape[0], k, num_classes)

    histories = [ProbeHistory(num_train=int(x_train.shape[0]), num_val=int(x_val.shape[0]), num_classes=num_classes)
                 for _ in linears]  # fmt: skip
    steps = math.ceil(x_train.shape[0] / batch_size)
    for epoch in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=g).to(device)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]  # the last batch may be partial, as in DINO
            out = logits(x_train[idx])
            # sum over probes of each probe's mean cross-entropy over the batch
            loss = F.cross_entropy(out.reshape(-1, num_classes), y_train[idx].repeat_interleave(k)) * k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            hits1, hits5 = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
            for v0 in range(0, x_val.shape[0], 8192):
                out, y = logits(x_val[v0 : v0 + 8192]), y_val[v0 : v0 + 8192]
                for j in range(k):
                    h1, h5 = top1_top5_correct(out[:, j], y)
                    hits1[j] += int(h1)
                    hits5[j] += int(h5)
        for j, history in enumerate(histories):
            history.record(epoch + 1, 100.0 * int(hits1[j]) / x_val.shape[0], 100.0 * int(hits5[j]) / x_val.shape[0])
        if on_epoch is not None:
            on_epoch(epoch + 1, [h.top1[-1] for h in histories], [h.top5[-1] for h in histories])
    return [(lin.cpu(), history) for lin, history in zip(linears, histories)]


def sweep_linear_on_features(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    base_lrs: Sequence[float],
    holdout: float = 0.1,
    seed: int = 0,
    on_candidate: Callable[[float, float], None] | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    **train_kwargs: Any,
) -> tuple[nn.Linear, ProbeHistory, dict[str, Any]]:
    """The fast probe with its learning rate chosen without looking at the test images.

    A seeded ``holdout`` fraction of the *training* features is set aside; one probe per base lr is
    trained on the rest (all of them side by side in one pass, :func:`_train_linears_jointly`) and
    scored on it (its last epoch's top-1); the best lr (the smaller one on a
    tie) then trains on all the training features and is evaluated on ``val_features`` as
    :func:`train_linear_on_features` does. Returns that layer, its history and the sweep record
    ``{"holdout_images", "candidates": [{"base_lr", "holdout_top1"}], "chosen_base_lr"}``.
    """
    if not base_lrs:
        raise ValueError("base_lrs must hold at least one learning rate")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}")
    n = train_features.shape[0]
    n_hold = max(1, int(round(n * holdout)))
    if n - n_hold < 1:
        raise ValueError(f"{n} training features are too few to hold out {holdout:.0%} for the lr sweep")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    hold, rest = order[:n_hold], order[n_hold:]
    lrs = sorted(float(v) for v in base_lrs)
    runs = _train_linears_jointly(train_features[rest], train_labels[rest], train_features[hold], train_labels[hold],
                                  lrs, seed=seed, **train_kwargs)  # fmt: skip
    candidates = []
    for lr, (_, h) in zip(lrs, runs):
        candidates.append({"base_lr": lr, "holdout_top1": h.top1[-1]})
        if on_candidate is not None:
            on_candidate(lr, h.top1[-1])
    chosen = max(candidates, key=lambda c: (c["holdout_top1"], -c["base_lr"]))["base_lr"]
    linear, history = train_linear_on_features(train_features, train_labels, val_features, val_labels,
                                               base_lr=chosen, seed=seed, on_epoch=on_epoch, **train_kwargs)  # fmt: skip
    return linear, history, {"holdout_images": int(n_hold), "candidates": candidates, "chosen_base_lr": chosen}


def history_as_dict(history: ProbeHistory) -> dict[str, Any]:
    """Summary plus the full per-epoch curves, for the JSON result (top-5 null with <= 5 classes)."""
    curve = {"epoch": list(history.epochs), "top1": list(history.top1),
             "top5": list(history.top5) if history.top5_reported else None}  # fmt: skip
    return {**history.summary(), "curve": curve}

