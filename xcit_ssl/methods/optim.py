"""Parameter groups, per-iteration schedules applied as data, and DINO's per-parameter clipping.

Schedules are planned once (:mod:`xcit_ssl.methods.plan`, from ``xcit_ssl.schedules``) and written
into the optimizer's param groups before every step. A frozen last layer is a zero-lr group, not
gradient surgery.

The learning rates a run logs are the ones :func:`apply_schedules` wrote for the step about to be
taken, logged by the method in its ``optimizer_step``: once per optimizer step (not per accumulated
micro-batch), under one name per distinct value: ``train/lr`` for every group on the schedule
(weight decay or not), ``train/lr_last_layer`` for DINO's freeze-at-start groups where a run freezes
them. Lightning's ``LearningRateMonitor`` reads the groups at ``on_train_batch_start``, before the
step's schedule is written, so it would show the previous step's lr; ``fit`` does not add it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

#: the scheduled learning rate, as every param group not frozen at the start gets it
LR_NAME = "train/lr"
#: the learning rate of the groups flagged ``freeze_at_start`` (DINO's last layer): 0 while frozen
FROZEN_LR_NAME = "train/lr_last_layer"


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
) -> dict[str, float]:
    """Write this step's lr and weight decay into every param group.

    Returns the learning rates this step uses, to log: ``{LR_NAME: lr}``, and ``FROZEN_LR_NAME``
    (0.0 while ``freeze_active``, else ``lr``) when some group is flagged ``freeze_at_start``.
    """
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        frozen_at_start = bool(group.get("freeze_at_start", False))
        group["lr"] = 0.0 if freeze_active and frozen_at_start else lr
        group["weight_decay"] = weight_decay if group.get("regularised", True) else 0.0
        lrs[FROZEN_LR_NAME if frozen_at_start else LR_NAME] = group["lr"]
    return lrs


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
