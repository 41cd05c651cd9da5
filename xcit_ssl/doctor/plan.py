"""The run as configured: world size, batches, learning rate, steps, warm-ups and crops.

Read off the resolved config and the instantiated (possibly ``meta``) method and data module:
the per-rank epoch length comes from the data module's own ``train_sampler`` (DistributedSampler
or repeated augmentation) with ``limit_train_batches`` as Lightning applies it. Global batch, peak
lr, step counts and warm-up are not computed here: the method's own ``plan_training`` (the pure
functions of :mod:`xcit_ssl.methods.plan`, which the method also calls when it trains) gives them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from ..data.resumable import EpochTaggedSampler
from ..devices import device_count
from ..errors import UserError
from ..methods.plan import RunShape, count_steps, global_batch_size, loop_limits, scale_lr

IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass
class RunPlan:
    """What ``xcit-ssl fit`` with this config would run (all counts per optimizer step unless said)."""

    recipe: str | None
    method: str  # dino | supervised | distilled | <class name>
    backbone: str | None
    patch_size: int | None
    accelerator: str  # cpu | gpu | ...
    devices: int  # per node
    num_nodes: int
    batch_size: int  # per device and micro-batch
    accumulate: int
    base_lr: float | None
    lr_per: int | None  # base_lr is per this many images
    precision: str
    sync_batchnorm: bool
    num_workers: int
    num_samples: int
    samples_note: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    crops: list[tuple[int, int]]  # (side in px, views per image), in view order
    n_global: int  # views the teacher sees (DINO), 0 otherwise
    warmups: dict[str, float] = field(default_factory=dict)  # setting -> length in epochs
    reference_batch: int | None = None
    reference_note: str = ""
    max_epochs: int | None = None

    @property
    def world(self) -> int:
        return self.devices * self.num_nodes

    @property
    def global_batch(self) -> int:
        return global_batch_size(self.batch_size, self.world, self.accumulate)

    @property
    def peak_lr(self) -> float | None:
        return self.lr_at(self.global_batch)

    def lr_at(self, global_batch: int) -> float | None:
        """The peak lr the method would use at ``global_batch`` (the linear scaling rule)."""
        if self.base_lr is None or not self.lr_per:
            return None
        return scale_lr(self.base_lr, global_batch, self.lr_per)

    @property
    def run_epochs(self) -> float:
        """Length of the run in (possibly limited) epochs."""
        return self.total_steps / max(1, self.steps_per_epoch)

    @property
    def views_per_image(self) -> int:
        return sum(n for _, n in self.crops)


def method_of(model: Any) -> str:
    from ..methods.dino import DINO
    from ..methods.distilled import Distilled
    from ..methods.supervised import Supervised

    if isinstance(model, DINO):
        return "dino"
    if isinstance(model, Distilled):
        return "distilled"
    if isinstance(model, Supervised):
        return "supervised"
    return type(model).__name__


def backbone_of(model: Any) -> torch.nn.Module | None:
    """The trained network: the DINO student backbone or the supervised backbone."""
    return getattr(model, "student_backbone", None) or getattr(model, "backbone", None)


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def batches_per_epoch(datamodule: Any, num_samples: int, world: int, batch_size: int, accumulate: int = 1) -> int:
    """Training batches per rank and epoch, from the data module's own sampler as fit wraps it
    (whole optimizer steps under accumulation with ``drop_last``; before limits)."""
    sampler_of = getattr(datamodule, "train_sampler", None)
    per_rank = math.ceil(num_samples / world)
    if sampler_of is not None and num_samples > 0:
        saved = getattr(datamodule, "trainer", None)
        datamodule.trainer = SimpleNamespace(world_size=world, global_rank=0, accumulate_grad_batches=accumulate)
        try:
            per_rank = len(EpochTaggedSampler(sampler_of(_Sized(num_samples)), batch_size=batch_size, accumulate=accumulate,
                                              drop_last=getattr(datamodule, "drop_last", True)))  # fmt: skip
        finally:
            datamodule.trainer = saved
    if getattr(datamodule, "drop_last", True):
        return per_rank // batch_size
    return math.ceil(per_rank / batch_size)


def setup_as_fit(datamodule: Any, trainer: dict[str, Any]) -> None:
    """Run the data module's own ``setup("fit")`` under the planned world size, as Lightning does
    before fit's first step: its refusals (fewer images per device than one ``drop_last`` batch:
    "no step would run") reach the planner with fit's own words, not a copy of its rule."""
    setup = getattr(datamodule, "setup", None)
    if not callable(setup):
        return
    _, devices = device_count(trainer)
    saved = getattr(datamodule, "trainer", None)
    datamodule.trainer = SimpleNamespace(
        world_size=devices * int(trainer.get("num_nodes") or 1), global_rank=0, current_epoch=0,
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
    )  # fmt: skip
    try:
        setup("fit")
    finally:
        datamodule.trainer = saved


def _no_step(batches: int, limited: int, num_samples: int, world: int, batch: int, limit: Any) -> None:
    """Refuse a plan in which no training step would run, as fit would (Lightning runs none)."""
    if batches == 0:
        raise UserError(
            f"{num_samples:,} training images over {world} device(s) fill no batch of --data.batch_size {batch} "
            "(the last incomplete batch is dropped): no step would run. Lower --data.batch_size or add images"
        )
    if limited == 0:
        raise UserError(
            f"--trainer.limit_train_batches {limit} of {batches} batches per epoch leaves none: no step would "
            "run. Raise --trainer.limit_train_batches"
        )


def _limited(batches: int, limit: Any) -> int:
    """Lightning's ``limit_train_batches``: an int is a count, a float a fraction."""
    if limit is None:
        return batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    return batches if float(limit) >= 1.0 else int(batches * float(limit))


def reference_batch(config_file: str | None, cfg_trainer: dict[str, Any]) -> tuple[int | None, str]:
    """The global batch the recipe was written for: stated in its comments, else its own settings."""
    if not config_file or not Path(config_file).is_file():
        return None, ""
    text = Path(config_file).read_text()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            found = re.search(r"global batch (\d[\d,]*)", line, re.IGNORECASE)
            if found:
                return int(found.group(1).replace(",", "")), f"stated in {Path(config_file).name}"
    try:
        raw = yaml.safe_load(text) or {}
        data = (raw.get("data") or {}).get("init_args") or raw.get("data") or {}
        trainer = raw.get("trainer") or {}
        batch = int(data.get("batch_size"))
    except (AttributeError, TypeError, ValueError, yaml.YAMLError):
        return None, ""
    devices = trainer.get("devices")
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    nodes = int(trainer.get("num_nodes") or 1)
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    return batch * devices * nodes * accumulate, f"{Path(config_file).name}'s own batch x devices"


def _crops(method: str, model: Any, datamodule: Any) -> tuple[list[tuple[int, int]], int]:
    transform = getattr(datamodule, "train_transform", None)
    if method == "dino":
        n_global = int(getattr(model, "n_global_crops", 2))
        crops = [(int(transform.global_crop_size), n_global)]
        if int(transform.n_local_crops) > 0:
            crops.append((int(transform.local_crop_size), int(transform.n_local_crops)))
        return crops, n_global
    size = getattr(transform, "img_size", None) or getattr(backbone_of(model), "img_size", 224)
    return [(int(size), 1)], 0


def build_plan(
    cfg: Any, model: Any, datamodule: Any, num_samples: int, samples_note: str, recipe_file: str | None
) -> RunPlan:
    """The plan of ``cfg`` (the resolved ``fit`` namespace) with its instantiated model and data."""
    trainer = dict(cfg.trainer)
    accelerator, devices = device_count(trainer)
    nodes = int(trainer.get("num_nodes") or 1)
    world = devices * nodes
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    batch = int(getattr(datamodule, "batch_size", 1))
    method = method_of(model)
    full = batches_per_epoch(datamodule, num_samples, world, batch, accumulate)
    batches = _limited(full, trainer.get("limit_train_batches"))
    _no_step(full, batches, num_samples, world, batch, trainer.get("limit_train_batches"))
    shape = RunShape(
        world_size=world, accumulate=accumulate, batch_size=batch, batches_per_epoch=batches,
        max_epochs=trainer.get("max_epochs"), max_steps=trainer.get("max_steps"),
    )  # fmt: skip
    max_epochs, _ = loop_limits(shape.max_epochs, shape.max_steps)
    # the method's own plan: the numbers it will log when it trains
    planner = getattr(model, "plan_training", None)
    training = planner(shape) if callable(planner) else None
    if training is not None:
        steps_per_epoch, total, warmup_steps = training.steps_per_epoch, training.total_steps, training.warmup_steps
        lr_per: int | None = training.lr_reference
    else:  # a method of another kind: Lightning's step count, no lr rule known
        (steps_per_epoch, total), warmup_steps, lr_per = count_steps(shape), 0, None

    optim = getattr(model, "optim", None)
    warmups: dict[str, float] = {}
    if method == "dino":
        warmups["optim.warmup_epochs"] = float(optim.warmup_epochs)
        dino = model.dino
        if dino.warmup_teacher_temp_epochs and dino.warmup_teacher_temp != dino.teacher_temp:
            warmups["dino.warmup_teacher_temp_epochs"] = float(dino.warmup_teacher_temp_epochs)
        warmups["optim.freeze_last_layer"] = float(optim.freeze_last_layer)
    elif method in ("supervised", "distilled"):
        warmups["optim.warmup_epochs"] = float(optim.warmup_epochs)
    crops, n_global = _crops(method, model, datamodule)
    backbone = backbone_of(model)
    ref, ref_note = reference_batch(recipe_file, trainer)
    return RunPlan(
        recipe=cfg.get("recipe_name"),
        method=method,
        backbone=getattr(backbone, "variant_name", None),
        patch_size=getattr(backbone, "patch_size", None),
        accelerator=accelerator,
        devices=devices,
        num_nodes=nodes,
        batch_size=batch,
        accumulate=accumulate,
        base_lr=training.base_lr if training is not None else None,
        lr_per=lr_per,
        precision=str(trainer.get("precision") or "32-true"),
        sync_batchnorm=bool(trainer.get("sync_batchnorm")),
        num_workers=int(getattr(datamodule, "num_workers", 0)),
        num_samples=num_samples,
        samples_note=samples_note,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=warmup_steps,
        crops=crops,
        n_global=n_global,
        warmups=warmups,
        reference_batch=ref,
        reference_note=ref_note,
        max_epochs=max_epochs if max_epochs >= 0 else None,
    )
