"""DeiT-style distillation into an XCiT classifier (REFERENCE.md section 4).

The teacher (a timm model with a weight file, e.g. RegNetY-16GF ``regnety_160`` as in DeiT/XCiT,
or one of our classifier checkpoints) is frozen and stays in eval mode; it sees the same mixed
batch as the student. XCiT has no distillation token, so the student's single head receives
``(1 - alpha) * CE(student, mixed targets) + alpha * distill(student, teacher)``.

The teacher is deliberately not a registered submodule: it is not trained, not wrapped by DDP,
not saved in checkpoints (which stay the student's size) and is rebuilt from ``teacher_model`` /
``teacher_weights`` on resume. It follows the module across devices and dtypes (``_apply``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..losses.distillation import DistillationLoss
from ..models.checkpoints import load_backbone, read_state_dict
from ..models.xcit import XCiT
from .supervised import Supervised
from .sup_config import MixupConfig, SupervisedOptimConfig

logger = logging.getLogger(__name__)

CHECKPOINT_TEACHER = "checkpoint"


def _unwrap_state_dict(obj: Any, origin: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict from a timm / DeiT / Lightning checkpoint object."""
    for _ in range(3):
        if isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values()):
            break
        if not isinstance(obj, Mapping):
            raise UserError(f"{origin} holds a {type(obj).__name__}, not a state dict of a timm model")
        # DeiT files wrap the weights in 'model'; timm training checkpoints in 'state_dict'
        wrapped = [k for k in ("model", "state_dict", "model_state_dict") if isinstance(obj.get(k), Mapping)]
        if not wrapped:
            raise UserError(f"{origin} holds no weights (keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = obj[wrapped[0]]
    weights = {}
    for key, value in obj.items():
        if isinstance(value, Tensor):
            parts = [p for p in str(key).split(".") if p not in ("module", "_orig_mod")]
            weights[".".join(parts)] = value
    return weights


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown teacher model '{name}': not a timm model name.{hint} DeiT/XCiT use 'regnety_160'; use "
            f"'{CHECKPOINT_TEACHER}' for one of our checkpoints"
        )


def _timm_teacher(name: str, weights_path: str) -> nn.Module:
    import timm

    from ..models.checkpoint_files import load_checkpoint_file

    obj, _ = load_checkpoint_file(weights_path)
    origin = f"teacher weights {weights_path}"
    state = _unwrap_state_dict(obj, origin)
    probe = timm.create_model(name, pretrained=False)
    classifier = probe.pretrained_cfg.get("classifier", "head")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    head = state.get(f"{classifier}.weight")
    if head is None:
        raise UserError(
            f"{origin} does not fit timm's {name}: it has no classifier '{classifier}.weight' (its keys start: "
            f"{', '.join(list(state)[:4])}); pass {name}'s classifier weights or the teacher_model they belong to"
        )
    teacher = timm.create_model(name, pretrained=False, num_classes=int(head.shape[0]))
    result = teacher.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{origin} does not fit timm's {name}: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; pass the weight file of that model"
        )
    return teacher


def build_teacher(model: str, weights: str | None, checkpoint_key: str = "ema") -> nn.Module:
    """The frozen teacher in eval mode; raises UserError for a bad name or file.

    ``model``: a timm name (``regnety_160``) whose ``weights`` file holds a classifier (DeiT's
    ``{'model': ...}`` files, timm files, plain state dicts), or ``"checkpoint"`` for an XCiT
    classifier in any scheme our loader reads (our supervised/distilled checkpoints: the EMA
    weights with ``checkpoint_key="ema"``).
    """
    if model != CHECKPOINT_TEACHER:
        _check_timm_name(model)  # a misspelt name first: its weight file's name is the next question
    if not weights or not Path(weights).expanduser().exists():
        # name the flag that fixes it: the recipes' paths (a teacher run's checkpoint, DeiT's RegNet file)
        # exist only once the user has trained or downloaded that teacher
        found = (f"the teacher's weights {weights} do not exist (relative paths start at {Path.cwd()})" if weights
                 else f"the teacher '{model}' has no weights")  # fmt: skip
        deit = " (DeiT: regnety_160-a5fe301d.pth)" if model == "regnety_160" else ""
        what = ("one of our classifier checkpoints (`xcit-ssl fit --recipe sup_nano_fmnist` writes "
                "runs/sup_nano_fmnist/checkpoints/last.ckpt)" if model == CHECKPOINT_TEACHER
                else f"the weights of timm's {model}{deit}; nothing is downloaded")  # fmt: skip
        raise UserError(f"{found}. Pass the teacher's weight file with --model.teacher_weights PATH "
                        f"(teacher_weights=PATH in Python): {what}")  # fmt: skip
    if model == CHECKPOINT_TEACHER:
        state = read_state_dict(weights, checkpoint_key=checkpoint_key)
        if "head.weight" not in state:
            raise UserError(
                f"teacher checkpoint {weights} has no classifier head (a DINO or exported backbone?): a teacher "
                "must predict classes; train one with a sup_* recipe"
            )
        teacher: nn.Module = load_backbone(weights, checkpoint_key=checkpoint_key, num_classes=int(state["head.weight"].shape[0]))
    else:
        teacher = _timm_teacher(model, weights)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_num_classes(teacher: nn.Module) -> int:
    """Number of outputs of a classifier (timm's ``num_classes`` attribute, or a probe forward)."""
    n = getattr(teacher, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise UserError(f"cannot tell how many classes the teacher {type(teacher).__name__} predicts")


class Distilled(Supervised):
    """Supervised training plus DeiT distillation from a frozen teacher (no distillation token).

    Args:
        backbone: the student, an XCiT with a classifier head.
        teacher_model: a timm model name (DeiT/XCiT: ``regnety_160``), or ``"checkpoint"`` for an
            XCiT classifier file (e.g. ``runs/sup_nano_fmnist/checkpoints/last.ckpt``).
        teacher_weights: the teacher's weight file (required; nothing is downloaded).
        teacher_checkpoint_key: which network of a ``checkpoint`` teacher file (``ema``/``backbone``).
        distillation: ``hard`` (DeiT default: CE against the teacher's arg-max) or ``soft``
            (``tau**2``-scaled KL at temperature ``tau``).
        alpha: weight of the distillation term (DeiT/XCiT 0.5).
        tau: temperature of soft distillation (DeiT 1.0).
        other arguments: as :class:`Supervised`.
    """

    method_name = "distilled"

    def __init__(
        self,
        backbone: XCiT,
        teacher_model: str,
        teacher_weights: str | None = None,
        teacher_checkpoint_key: str = "ema",
        distillation: Literal["hard", "soft"] = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        optim: SupervisedOptimConfig | None = None,
        label_smoothing: float = 0.1,
        mixup: MixupConfig | None = None,
        model_ema_decay: float | None = 0.99996,
        pretrained: str | None = None,
        checkpoint_key: str = "teacher",
    ) -> None:
        super().__init__(backbone, optim, label_smoothing, mixup, model_ema_decay, pretrained, checkpoint_key)
        if distillation not in ("hard", "soft"):
            raise UserError(f"distillation={distillation!r}: use 'hard' (DeiT default) or 'soft'")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha={alpha}: the distillation weight lies in [0, 1] (DeiT: 0.5)")
        if tau <= 0:
            raise UserError(f"tau={tau}: the distillation temperature must be positive (DeiT: 1.0)")
        self.save_hyperparameters(
            {
                **self.hparams,
                "teacher_model": teacher_model,
                "teacher_weights": teacher_weights,
                "teacher_checkpoint_key": teacher_checkpoint_key,
                "distillation": distillation,
                "alpha": alpha,
                "tau": tau,
            }
        )
        teacher = build_teacher(teacher_model, teacher_weights, teacher_checkpoint_key)
        n_teacher = teacher_num_classes(teacher)
        if n_teacher != self.num_classes:
            raise UserError(
                f"the teacher {teacher_model} ({teacher_weights}) predicts {n_teacher} classes but the student head "
                f"has {self.num_classes}: distil from a teacher trained on the same classes"
            )
        # not a submodule: see the module docstring
        object.__setattr__(self, "teacher", teacher)
        self.distill_loss = DistillationLoss(distillation, alpha, tau, label_smoothing)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Distilled:
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn)
        return self

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != teacher_num_classes(self.teacher):
            raise UserError(
                f"the teacher {self.hparams['teacher_model']} predicts {teacher_num_classes(self.teacher)} classes "
                f"but the data has {data_classes}: use a teacher trained on this data set"
            )
        super().setup(stage)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        """The frozen teacher's logits ``[B, C]`` on the (mixed) batch, always in eval mode."""
        self.teacher.eval()
        return self.teacher(images).float()

    def training_loss(self, images: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total, base, distill = self.distill_loss(logits, targets, self.teacher_logits(images))
        return total, {"train/base_loss": base, "train/distill_loss": distill}
