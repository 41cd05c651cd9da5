"""Typed settings of supervised and distilled training (REFERENCE.md section 4, XCiT/DeiT recipe).

Plain dataclasses with checks: recipes set them under ``model.optim`` and ``model.mixup``, and
the module saves them as dicts so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import UserError


@dataclass
class SupervisedOptimConfig:
    """AdamW with linear warm-up then cosine (XCiT's ``main.py`` defaults).

    ``base_lr`` is per **512** images (DeiT/XCiT rule): the peak lr is
    ``base_lr * global_batch / 512`` (batch 1024 -> 1e-3). The lr rises linearly from
    ``warmup_lr`` over ``warmup_epochs`` (fractions allowed with ``schedule_unit: step``), then
    follows a cosine to ``min_lr``. ``schedule_unit``:
    ``"epoch"`` changes the lr once per epoch (timm's scheduler, as in the paper), ``"step"`` every
    optimizer step (the same curve, smoother; needed for runs of a few epochs). Weight decay is
    constant and skips biases, 1-D parameters and the backbone's ``no_weight_decay()`` names
    (``cls_token``; the attention temperatures only with ``decay_temperature: false``).
    ``decay_temperature``: XCiT's ``main.py`` builds its optimizer with timm's
    ``create_optimizer``, which exempts biases, 1-D parameters and the model's
    ``no_weight_decay()`` = {pos_embed, cls_token, dist_token}; the XCA temperature has shape
    ``[heads, 1, 1]`` (not 1-D), so the published models decayed it. ``true`` (default) matches
    them; ``false`` exempts it, as timm's own ``Xcit.no_weight_decay()`` suggests.
    Gradient clipping: ``--trainer.gradient_clip_val`` (off in XCiT's recipe).
    """

    base_lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    schedule_unit: Literal["epoch", "step"] = "step"
    decay_temperature: bool = True

    def __post_init__(self) -> None:
        for name in ("base_lr", "min_lr", "warmup_lr", "weight_decay", "eps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"optim.{name}={value}: use a finite value >= 0")
        if self.warmup_epochs < 0:
            raise UserError(f"optim.warmup_epochs={self.warmup_epochs}: use 0 for no warm-up")
        if self.schedule_unit not in ("epoch", "step"):
            raise UserError(f"optim.schedule_unit={self.schedule_unit!r}: use 'epoch' or 'step'")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


@dataclass
class MixupConfig:
    """Mixup / CutMix on the batch (timm's ``Mixup``; XCiT: 0.8 / 1.0, switch 0.5, every batch).

    ``prob``: chance that a batch is mixed at all; ``switch_prob``: chance of CutMix instead of
    mixup when both alphas are > 0; ``mode``: one lambda per ``batch``, per ``pair`` or per
    ``elem``. Label smoothing is folded into the mixed targets. Batches must have an even size.
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise UserError(
                f"mixup.mixup_alpha={self.mixup_alpha}, mixup.cutmix_alpha={self.cutmix_alpha}: use values >= 0 "
                "(0 disables that one; set model.mixup to null to disable both)"
            )
        for name in ("prob", "switch_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"mixup.{name}={value}: a probability lies in [0, 1]")
        if self.mode not in ("batch", "pair", "elem"):
            raise UserError(f"mixup.mode={self.mode!r}: use 'batch', 'pair' or 'elem'")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
