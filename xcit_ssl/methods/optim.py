"""Parameter groups, per-iteration schedules applied as data, and DINO's per-parameter clipping.

Schedules are planned once (:mod:`xcit_ssl.methods.plan`, from ``xcit_ssl.schedules``) and written
into the optimizer's param groups before every step. A frozen last layer is a zero-lr group, not
gradient surgery.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_regularised(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to everything but biases and 1-D parameters (norms, layer scales)."""
    return not (name.endswith(".bias") or param.ndim <= 1)


def build_param_groups(
    modules: dict[str, nn.Module], frozen_first: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """AdamW groups keyed by (regularised, frozen-at-start) for the trainable parameters.

    Args:
        modules: prefix -> module, e.g. ``{"backbone": b, "head": h}``.
        frozen_first: parameters that get a zero learning rate for the first epochs
            (DINO's last layer); they form their own groups flagged ``freeze_at_start``.
    Returns:
        groups with keys ``params``, ``regularised``, ``freeze_at_start``, ``names``.
    """
    frozen_ids = {id(p) for p in frozen_first}
    groups: dict[tuple[bool, bool], dict] = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            key = (is_regularised(name, param), id(param) in frozen_ids)
            group = groups.setdefault(
                key, {"params": [], "names": [], "regularised": key[0], "freeze_at_start": key[1]}
            )
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}")
    return [groups[k] for k in sorted(groups)]


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, weight_decay: float, freeze_active: bool
) -> None:
    """Write this step's lr and weight decay into every param group."""
    for group in optimizer.param_groups:
        frozen = freeze_active and group.get("freeze_at_start", False)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("regularised", True) else 0.0


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> list[float]:
    """DINO's clipping: each parameter's gradient is rescaled to norm ``max_norm`` on its own.

    Returns the pre-clipping norms (useful for logging). ``max_norm <= 0`` disables clipping.
    """
    norms: list[float] = []
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return norms
    per_param = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    scale = (max_norm / (per_param + 1e-6)).clamp(max=1.0)
    for g, s in zip(grads, scale):
        g.mul_(s.to(g.dtype))
    return per_param.tolist()
