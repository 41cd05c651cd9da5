"""The run plan of a method: global batch, peak lr, steps, warm-ups and the schedules, in one place.

``plan_dino`` and ``plan_supervised`` are pure: they turn a method's hyper-parameters and the
numbers of a run (:class:`RunShape`: world size, accumulation, per-device batch, batches per
epoch, epoch and step limits) into a frozen :class:`TrainingPlan`. The methods build their plan in
``configure_optimizers`` from the trainer's numbers (:func:`shape_from_trainer`), and ``xcit-ssl
doctor`` builds the same plan from the resolved config, so the two cannot disagree.

Rules kept from the methods (REFERENCE.md sections 2 and 4):

- global batch = per-device batch x devices x nodes x ``accumulate_grad_batches``;
- peak lr = ``base_lr * global_batch / reference``, reference 256 for DINO and 512 for supervised
  and distilled training (the DeiT/XCiT rule);
- total steps as Lightning's ``trainer.estimated_stepping_batches`` counts them (at least 1);
- warm-up steps = ``round(warmup_epochs * steps_per_epoch)``, at most the whole run; supervised
  ``schedule_unit: epoch`` schedules count epochs and round the warm-up to whole epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..config import DINOConfig, OptimConfig
from ..errors import UserError
from ..schedules import Schedule, cosine_schedule, teacher_temp_schedule
from .sup_config import SupervisedOptimConfig

__all__ = [
    "DINO_LR_REFERENCE",
    "SUPERVISED_LR_REFERENCE",
    "BatchSplit",
    "RunShape",
    "TrainingPlan",
    "count_steps",
    "global_batch_size",
    "loop_limits",
    "plan_dino",
    "plan_supervised",
    "scale_lr",
    "shape_from_trainer",
]

DINO_LR_REFERENCE = 256  # DINO: base_lr is per 256 images
SUPERVISED_LR_REFERENCE = 512  # DeiT/XCiT: base_lr is per 512 images


@dataclass(frozen=True)
class RunShape:
    """The numbers of a run that its schedules depend on, as Lightning resolves them.

    ``batches_per_epoch``: training batches per process and epoch after ``limit_train_batches``
    (Lightning's ``num_training_batches``); ``math.inf`` for a data set without a length.
    ``max_epochs`` / ``max_steps``: the trainer's limits; ``None`` takes Lightning's defaults
    (``-1`` steps; 1000 epochs without a step limit, else ``-1``).
    """

    world_size: int  # devices x nodes
    accumulate: int  # accumulate_grad_batches
    batch_size: int  # per device and micro-batch
    batches_per_epoch: float
    max_epochs: int | None = None
    max_steps: int | None = None

    @property
    def split(self) -> BatchSplit:
        """How this run splits its global batch."""
        return BatchSplit(self.world_size, self.batch_size, self.accumulate)


@dataclass(frozen=True)
class BatchSplit:
    """How a global batch is split: processes x per-device batch x accumulated micro-batches.

    The global batch is part of a run's identity (its peak lr, its steps, its sample order); the
    split is not: ``2 x 32 x 1`` and ``1 x 32 x 2`` train on the same global batches.
    """

    world_size: int
    batch_size: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return global_batch_size(self.batch_size, self.world_size, self.accumulate)

    def describe(self) -> str:
        """``64 (2 devices x 32 x accumulation 1)``."""
        devices = f"{self.world_size} device{'s' if self.world_size != 1 else ''}"
        return f"{self.global_batch} ({devices} x {self.batch_size} x accumulation {self.accumulate})"

    def restoring_flags(self, old: BatchSplit, num_nodes: int = 1) -> list[str]:
        """Single flag changes that give this split ``old``'s global batch again.

        Each keeps two of the three numbers and solves for the third where it comes out whole;
        a flag that puts back ``old``'s own value comes first (it undoes what was changed).
        ``--trainer.devices`` counts devices per node.
        """
        nodes = max(1, int(num_nodes))
        want = old.global_batch
        candidates = [  # (flag, the value it needs, old's value of it)
            ("--trainer.devices", want / (self.batch_size * self.accumulate * nodes), old.world_size / nodes),
            ("--trainer.accumulate_grad_batches", want / (self.world_size * self.batch_size), old.accumulate),
            ("--data.batch_size", want / (self.world_size * self.accumulate), old.batch_size),
        ]
        whole = [(flag, int(v), v == was) for flag, v, was in candidates if v >= 1 and float(v).is_integer()]
        whole.sort(key=lambda c: not c[2])  # stable: undoing a change first, then the table's order
        return [f"{flag} {value}" for flag, value, _ in whole]


@dataclass(frozen=True)
class TrainingPlan:
    """What a method will run: batch, lr, step counts and the schedules applied as data.

    ``lr`` and ``weight_decay`` are indexed by optimizer step, or by epoch when
    ``schedule_unit == "epoch"`` (use :meth:`lr_at` / :meth:`weight_decay_at`, which take the
    optimizer step either way). ``teacher_momentum`` (per step) and ``teacher_temp`` (per epoch)
    exist for DINO only. ``warmup_steps`` counts optimizer steps whatever the unit.
    """

    global_batch: int
    base_lr: float
    lr_reference: int  # base_lr is per this many images
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs the run touches: ceil(total_steps / steps_per_epoch)
    warmup_steps: int
    schedule_unit: Literal["step", "epoch"]
    lr: Schedule
    weight_decay: Schedule
    teacher_momentum: Schedule | None = None
    teacher_temp: Schedule | None = None
    freeze_last_layer_epochs: int = 0

    def _index(self, step: int) -> int:
        return step // self.steps_per_epoch if self.schedule_unit == "epoch" else step

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (held at its last value past the end)."""
        return self.lr(self._index(step))

    def weight_decay_at(self, step: int) -> float:
        """The weight decay of optimizer step ``step`` on the regularised parameters."""
        return self.weight_decay(self._index(step))

    def teacher_momentum_at(self, step: int) -> float:
        """DINO's teacher EMA momentum after optimizer step ``step``."""
        if self.teacher_momentum is None:
            raise ValueError("this plan has no teacher momentum (only DINO's has)")
        return self.teacher_momentum(step)

    def teacher_temp_at(self, epoch: int) -> float:
        """DINO's teacher temperature in ``epoch``."""
        if self.teacher_temp is None:
            raise ValueError("this plan has no teacher temperature (only DINO's has)")
        return self.teacher_temp(epoch)

    def last_layer_frozen(self, epoch: int) -> bool:
        """Whether DINO's last layer gets a zero lr (and no gradient) in ``epoch``."""
        return epoch < self.freeze_last_layer_epochs


def global_batch_size(batch_size: int, world_size: int, accumulate: int) -> int:
    """Images per optimizer step: per-device batch x processes x accumulated micro-batches."""
    return int(batch_size) * int(world_size) * int(accumulate)


def scale_lr(base_lr: float, global_batch: int, reference: int) -> float:
    """The linear scaling rule: ``base_lr`` is the lr for ``reference`` images per step."""
    return base_lr * global_batch / float(reference)


def loop_limits(max_epochs: int | None, max_steps: int | None) -> tuple[int, int]:
    """``(max_epochs, max_steps)`` with Lightning's defaults for ``None`` (``-1`` means no limit)."""
    steps = -1 if max_steps is None else int(max_steps)
    if max_epochs is None:
        return (1000 if steps == -1 else -1), steps
    return int(max_epochs), steps


def count_steps(shape: RunShape) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``, both >= 1, as Lightning counts optimizer steps.

    Total: ``ceil(batches / accumulate) * max(max_epochs, 1)`` capped by ``max_steps``
    (``trainer.estimated_stepping_batches``). Without a known epoch length the step limit is the
    run, and an epoch is ``total / max_epochs`` steps.

    Raises:
        UserError: the run has no end (no epoch limit, or an unsized data set, and no step limit).
    """
    max_epochs, max_steps = loop_limits(shape.max_epochs, shape.max_steps)
    batches, accumulate = shape.batches_per_epoch, max(1, int(shape.accumulate))
    finite = math.isfinite(batches)
    if max_epochs == -1 or not finite:
        if max_steps == -1:
            reason = "the training data has no length, set --trainer.max_steps" if not finite else (
                "set --trainer.max_epochs or --trainer.max_steps"
            )
            raise UserError(f"the schedule needs a finite run: {reason}")
        total = max_steps
    else:
        total = math.ceil(batches / accumulate) * max(max_epochs, 1)
        total = min(total, max_steps) if max_steps != -1 else total
    total = max(1, int(total))
    if finite:
        steps_per_epoch = max(1, math.ceil(batches / accumulate))
    else:  # an iterable data set without a length: trust max_epochs
        steps_per_epoch = max(1, math.ceil(total / max(1, max_epochs)))
    return steps_per_epoch, total


def _common(shape: RunShape, base_lr: float, reference: int) -> tuple[int, float, int, int, int]:
    """``(global_batch, peak_lr, steps_per_epoch, total_steps, epochs)``."""
    steps_per_epoch, total = count_steps(shape)
    batch = global_batch_size(shape.batch_size, shape.world_size, shape.accumulate)
    epochs = max(1, math.ceil(total / steps_per_epoch))
    return batch, scale_lr(base_lr, batch, reference), steps_per_epoch, total, epochs


def plan_dino(optim: OptimConfig, dino: DINOConfig, shape: RunShape) -> TrainingPlan:
    """DINO's plan: lr, weight decay and teacher momentum per step, teacher temperature per epoch.

    lr: linear warm-up from 0 over ``optim.warmup_epochs`` then cosine to ``min_lr``; weight decay
    cosine ``weight_decay -> weight_decay_end``; teacher momentum cosine ``momentum_teacher -> 1``;
    teacher temperature ``warmup_teacher_temp -> teacher_temp`` over its warm-up epochs (at most the
    run); the last layer frozen for ``optim.freeze_last_layer`` epochs.
    """
    batch, peak, steps_per_epoch, total, epochs = _common(shape, optim.base_lr, DINO_LR_REFERENCE)
    warmup = min(int(round(optim.warmup_epochs * steps_per_epoch)), total)
    return TrainingPlan(
        global_batch=batch,
        base_lr=float(optim.base_lr),
        lr_reference=DINO_LR_REFERENCE,
        peak_lr=peak,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=epochs,
        warmup_steps=warmup,
        schedule_unit="step",
        lr=Schedule(cosine_schedule(peak, optim.min_lr, total, warmup_steps=warmup)),
        weight_decay=Schedule(cosine_schedule(optim.weight_decay, optim.weight_decay_end, total)),
        teacher_momentum=Schedule(cosine_schedule(dino.momentum_teacher, 1.0, total)),
        teacher_temp=Schedule(
            teacher_temp_schedule(
                dino.warmup_teacher_temp,
                dino.teacher_temp,
                min(int(dino.warmup_teacher_temp_epochs), epochs),
                epochs,
            )
        ),
        freeze_last_layer_epochs=int(optim.freeze_last_layer),
    )


def plan_supervised(optim: SupervisedOptimConfig, shape: RunShape) -> TrainingPlan:
    """Supervised and distilled training's plan: warm-up from ``warmup_lr`` then cosine, constant decay.

    ``schedule_unit: step`` warms up over ``round(warmup_epochs * steps_per_epoch)`` steps;
    ``epoch`` keeps the lr for a whole epoch (timm's scheduler) and warms up over
    ``round(warmup_epochs)`` epochs, at most the run.
    """
    batch, peak, steps_per_epoch, total, epochs = _common(shape, optim.base_lr, SUPERVISED_LR_REFERENCE)
    if optim.schedule_unit == "epoch":
        units, warmup = epochs, min(round(optim.warmup_epochs), epochs)
        warmup_steps = min(warmup * steps_per_epoch, total)
    else:
        units, warmup = total, min(round(optim.warmup_epochs * steps_per_epoch), total)
        warmup_steps = warmup
    return TrainingPlan(
        global_batch=batch,
        base_lr=float(optim.base_lr),
        lr_reference=SUPERVISED_LR_REFERENCE,
        peak_lr=peak,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=epochs,
        warmup_steps=int(warmup_steps),
        schedule_unit=optim.schedule_unit,
        lr=Schedule(cosine_schedule(peak, optim.min_lr, int(units), warmup_steps=int(warmup), warmup_start=optim.warmup_lr)),
        weight_decay=Schedule(np.array([optim.weight_decay])),  # constant: held past its single value
    )


def shape_from_trainer(trainer: Any) -> RunShape:
    """A running trainer's :class:`RunShape` (the one impure helper here: it reads the trainer).

    Loads the training data loader first where Lightning has not (runs limited by ``max_steps``
    alone skip it when estimating their steps), as ``estimated_stepping_batches`` would.
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    loader = trainer.train_dataloader
    per_device = getattr(loader, "batch_size", None) or getattr(trainer.datamodule, "batch_size", None)
    if per_device is None:
        raise UserError("cannot tell the per-device batch size: use a DataLoader with batch_size set")
    return RunShape(
        world_size=int(trainer.world_size),
        accumulate=int(trainer.accumulate_grad_batches),
        batch_size=int(per_device),
        batches_per_epoch=float(trainer.num_training_batches),
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
    )
