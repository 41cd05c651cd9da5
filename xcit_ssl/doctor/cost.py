"""Parameters and multiply-adds of one training step, counted with :mod:`xcit_ssl.models.flops`.

Conventions (those of ``xcit-ssl models`` and fvcore): a "FLOP" of the counter is one
multiply-add (MAC); backbone counts are headless, batch 1, eval mode. Per image of the recipe:

- forward: the sum of the backbone counts at every view's resolution (2 x 224 + 8 x 96 for
  DINO): the number ``xcit-ssl models`` gives for each resolution, added up;
- training: the student's forward and backward (backward ~ 2 x forward, so 3 x the student's
  backbone + head forward), plus, for DINO, the teacher's forward of the global views (backbone +
  head), for distillation the frozen teacher's forward; loss, EMA and optimizer are elementwise
  and, as in fvcore, free.

Hardware FLOP/s (for MFU) count 2 per MAC: :attr:`StepCost.train_flops_per_image` = 2 x MACs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models.flops import count_flops
from .plan import RunPlan, backbone_of


@dataclass
class StepCost:
    """Parameters and per-image multiply-adds of a training step (see the module docstring)."""

    params_trained: int
    params_frozen: int  # teacher / EMA copies, no gradient
    params_by_part: dict[str, int]
    backbone_macs: dict[int, int]  # resolution -> headless backbone MACs per image
    forward_macs: int  # per image: sum over views of backbone_macs (the `xcit-ssl models` counts)
    head_macs: int  # per image: the trained network's head over all views
    teacher_macs: int  # per image: teacher forward (DINO: global views; distillation: the timm teacher)
    notes: list[str] = field(default_factory=list)

    @property
    def student_macs(self) -> int:
        return self.forward_macs + self.head_macs

    @property
    def train_macs_per_image(self) -> int:
        return 3 * self.student_macs + self.teacher_macs

    @property
    def train_flops_per_image(self) -> int:
        return 2 * self.train_macs_per_image

    def state_bytes(self) -> int:
        """fp32 weights + gradients + AdamW moments of trained params, weights of frozen ones."""
        return 16 * self.params_trained + 4 * self.params_frozen


class _Headless(nn.Module):
    """``forward_head(forward_features(x), pre_logits=True)``: the backbone without its classifier."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        b = self.backbone
        return b.forward_head(b.forward_features(x), pre_logits=True)


def _on_meta(module: nn.Module) -> nn.Module:
    """A ``meta`` copy (no memory, no arithmetic) unless it is already there."""
    param = next(iter(module.parameters()), None)
    if param is not None and param.device.type == "meta":
        return module
    return copy.deepcopy(module).to("meta")


def _in_chans(backbone: nn.Module) -> int:
    return int(getattr(backbone, "arch_args", {}).get("in_chans", 3))


def backbone_macs(backbone: nn.Module, size: int) -> int:
    """Headless MACs of one ``size`` x ``size`` image, as ``xcit-ssl models`` counts them."""
    meta = _on_meta(backbone)
    net = _Headless(meta) if hasattr(meta, "forward_features") and hasattr(meta, "forward_head") else meta
    x = torch.zeros(1, _in_chans(meta), size, size, device="meta")
    return count_flops(net, x)


def _module_macs(module: nn.Module, x: Tensor) -> int:
    return count_flops(_on_meta(module), x.to("meta"))


def _params(module: nn.Module | None, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def count_step(model: Any, plan: RunPlan) -> StepCost:
    """Parameters and MACs per image of ``model``'s training step with the plan's crops."""
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"{type(model).__name__}: no backbone to count")
    by_size = {size: backbone_macs(backbone, size) for size, _ in plan.crops}
    forward = sum(by_size[size] * n for size, n in plan.crops)
    views = plan.views_per_image
    dim = int(getattr(backbone, "num_features", 0))
    parts: dict[str, int] = {}
    head = teacher = 0
    notes: list[str] = []
    if plan.method == "dino":
        parts = {
            "student_backbone": _params(model.student_backbone),
            "student_head": _params(model.student_head),
            "teacher_backbone": _params(model.teacher_backbone),
            "teacher_head": _params(model.teacher_head),
        }
        head = _module_macs(model.student_head, torch.zeros(views, dim))
        teacher_head = _module_macs(model.teacher_head, torch.zeros(plan.n_global, dim))
        teacher = sum(by_size[size] * n for size, n in plan.crops[:1]) + teacher_head
        trained = parts["student_backbone"] + parts["student_head"]
        frozen = parts["teacher_backbone"] + parts["teacher_head"]
    else:
        classes = int(getattr(backbone, "num_classes", 0) or 0)
        head = dim * classes * views
        parts = {"backbone": _params(backbone)}
        ema = getattr(model, "ema_backbone", None)
        if ema is not None:
            parts["ema_backbone"] = _params(ema)
        timm_teacher = getattr(model, "teacher", None)
        if timm_teacher is not None:
            parts["teacher"] = _params(timm_teacher)
            size = plan.crops[0][0]
            try:
                teacher = _module_macs(timm_teacher, torch.zeros(1, 3, size, size))
            except Exception as err:  # noqa: BLE001 - a foreign model the counter cannot run on meta
                notes.append(f"teacher MACs not counted ({type(err).__name__})")
        trained = _params(backbone, trainable=True)
        frozen = sum(v for k, v in parts.items() if k != "backbone") + _params(backbone, trainable=False)
    return StepCost(
        params_trained=trained,
        params_frozen=frozen,
        params_by_part=parts,
        backbone_macs=by_size,
        forward_macs=forward,
        head_macs=head,
        teacher_macs=teacher,
        notes=notes,
    )
