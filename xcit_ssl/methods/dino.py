"""DINO self-distillation as a LightningModule (REFERENCE.md section 2).

The student (backbone + DINO head) sees all crops, one backbone call per resolution group; the
teacher (an EMA of the student, never trained by gradients) sees only the global crops. Schedules
(lr, weight decay, teacher momentum per iteration; teacher temperature per epoch) are planned once
in :meth:`configure_optimizers` (:func:`xcit_ssl.methods.plan.plan_dino`, the plan ``xcit-ssl
doctor`` shows) and applied as data before each optimizer step. The center moves once per
optimizer step from all its micro-batches (gradient accumulation included).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ..config import DINOConfig, OptimConfig, as_config
from ..errors import UserError
from ..losses.dino import DINOLoss, collapse_kind, dino_diagnostics
from ..models.checkpoints import load_backbone, load_backbone_weights
from ..models.heads import DINOHead
from ..models.xcit import XCiT
from ..models.xcit_layers import DropPath
from .checkpointing import backbone_spec, stop_if_not_finite
from .ema import update_ema
from .optim import FROZEN_LR_NAME, apply_schedules, build_param_groups, clip_gradients_per_parameter
from .plan import RunShape, TrainingPlan, plan_dino, shape_from_trainer

logger = logging.getLogger(__name__)


_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def remove_stochastic_layers(network: nn.Module) -> int:
    """Make ``network`` deterministic in train mode: drop-path modules become ``Identity``, dropout p 0.

    BatchNorm (batch statistics in train mode) is kept: it is deterministic for a given batch.
    Dropout modules are kept with ``p = 0`` because attention code reads their ``p``. Returns how
    many modules were changed. Neither has state, so the state-dict keys do not change.
    """
    changed = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            # our DropPath, and timm's (same class name) should a timm module be injected
            if isinstance(child, DropPath) or type(child).__name__ == "DropPath":
                setattr(parent, name, nn.Identity())
                changed += 1
            elif isinstance(child, _DROPOUT) and child.p > 0:
                child.p = 0.0
                changed += 1
    return changed


class DINO(L.LightningModule):
    """Student/teacher self-distillation of an injected XCiT backbone.

    Args:
        backbone: a headless backbone (``num_classes=0``) returning ``[B, D]``; the teacher is a
            deep copy of it without drop-path or dropout (:func:`remove_stochastic_layers`).
        dino: head, loss, temperature and teacher-momentum settings.
        optim: optimizer and schedules (``base_lr`` is per 256 images).
        collapse_patience: logged steps in a row at a collapse signature
            (:func:`xcit_ssl.losses.dino.collapse_kind`) before warning.
        pretrained: optional weights to start from, in any scheme the backbone loader reads
            (timm, official XCiT, DINO, mmpretrain, our checkpoints and exports); loaded strictly
            into the student before the teacher is copied from it.
        checkpoint_key: which network of a two-network ``pretrained`` file to take.
        compile: compile the student and teacher backbones with ``torch.compile`` at fit start (one
            graph per crop resolution, same parameter names; eager with a warning where compile is
            unavailable; :mod:`xcit_ssl.methods.compiling`).
    Batches are ``(views, labels)`` with ``views`` a list of ``[B, 3, S, S]`` tensors: the first
    ``n_global_crops`` are global crops, the rest local crops (labels are ignored).
    """

    n_global_crops = 2

    def __init__(
        self,
        backbone: XCiT,
        dino: DINOConfig | None = None,
        optim: OptimConfig | None = None,
        collapse_patience: int = 20,
        pretrained: str | None = None,
        checkpoint_key: str = "teacher",
        compile: bool = False,
    ) -> None:
        super().__init__()
        # dicts arrive from Lightning's load_from_checkpoint, which passes the saved hyper-parameters back
        self.dino = as_config(DINOConfig, dino) or DINOConfig()
        self.optim = as_config(OptimConfig, optim) or OptimConfig()
        # plain dicts keep checkpoints loadable with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "dino": asdict(self.dino),
                "optim": asdict(self.optim),
                "collapse_patience": collapse_patience,
                "pretrained": pretrained,
                "checkpoint_key": checkpoint_key,
                "compile": compile,
            }
        )
        if getattr(backbone, "num_classes", 0):
            raise UserError("DINO needs a headless backbone: set `num_classes: 0` in model.backbone")
        if pretrained:
            report = load_backbone_weights(backbone, pretrained, checkpoint_key=checkpoint_key)
            logger.info("DINO starts from %s: %s", pretrained, report)
        embed_dim = backbone.num_features
        self.student_backbone = backbone
        self.student_head = DINOHead(
            embed_dim,
            out_dim=self.dino.out_dim,
            hidden_dim=self.dino.hidden_dim,
            bottleneck_dim=self.dino.bottleneck_dim,
            norm_last_layer=self.dino.norm_last_layer,
            use_bn=self.dino.use_bn_in_head,
        )
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        # DINO builds the teacher without drop_path_rate: its targets must not depend on random
        # masks. Removing the modules (not zeroing a rate) keeps it so after pretrained loading,
        # resume and any later change of rates on the student; state-dict keys are unchanged
        remove_stochastic_layers(self.teacher_backbone)
        self.compile_backbones = compile
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(self.dino.out_dim, self.dino.student_temp, self.dino.center_momentum)
        self.collapse_patience = collapse_patience
        self._collapse_counts = {"uniform": 0, "one-hot": 0}
        self.training_plan: TrainingPlan | None = None  # set by configure_optimizers

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> DINO:
        """Lightning's reload of a ``xcit-ssl fit`` checkpoint: ``DINO.load_from_checkpoint(path)``.

        Without ``backbone=``, the network is built from the variant the checkpoint records; with
        it, that network is used. ``pretrained`` defaults to None: the checkpoint's own weights
        replace any starting weights, so the file a run started from is not read again (nor needed).
        Other keyword arguments override the saved hyper-parameters, as in Lightning.
        """
        if "backbone" not in kwargs and isinstance(checkpoint_path, (str, Path)):
            kwargs["backbone"] = load_backbone(checkpoint_path, checkpoint_key="student")
        kwargs.setdefault("pretrained", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_model(self) -> None:
        if self.compile_backbones and not getattr(self, "_compiled", False):
            from .compiling import compile_backbones

            self._compiled = compile_backbones({"student_backbone": self.student_backbone, "teacher_backbone": self.teacher_backbone})

    # -- networks ---------------------------------------------------------------------------

    def student_forward(self, views: list[Tensor]) -> Tensor:
        """All views through the student, one backbone call per run of equal-size views.

        Keeping resolution groups separate means BatchNorm statistics of 224 and 96 px crops are
        never mixed. Returns ``[V*B, K]`` in view order.
        """
        feats = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            feats.append(self.student_backbone(torch.cat(views[start:end])))
            start = end
        return self.student_head(torch.cat(feats))

    @torch.no_grad()
    def teacher_forward(self, global_views: list[Tensor]) -> Tensor:
        """Global views through the teacher, ``[G*B, K]``, no gradient."""
        return self.teacher_head(self.teacher_backbone(torch.cat(global_views)))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Features for evaluation: the teacher backbone's normalised CLS, ``[B, D]``."""
        was_training = self.teacher_backbone.training
        self.teacher_backbone.eval()
        out = self.teacher_backbone(images)
        self.teacher_backbone.train(was_training)
        return out

    # -- schedules and optimizer ------------------------------------------------------------

    def plan_training(self, shape: RunShape) -> TrainingPlan:
        """This module's schedules for a run of ``shape`` (also what ``xcit-ssl doctor`` reports)."""
        return plan_dino(self.optim, self.dino, shape)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        plan = self.training_plan = self.plan_training(shape_from_trainer(self.trainer))
        logger.info(
            "DINO: global batch %d, peak lr %.3g (base_lr %.3g per 256), %d steps (%d per epoch)",
            plan.global_batch, plan.peak_lr, self.optim.base_lr, plan.total_steps, plan.steps_per_epoch,
        )  # fmt: skip
        groups = build_param_groups(
            {"student_backbone": self.student_backbone, "student_head": self.student_head},
            frozen_first=self.student_head.last_layer_parameters(),
        )
        for g in groups:
            g.pop("names")
        return torch.optim.AdamW(groups, lr=plan.peak_lr, betas=self.optim.betas)

    def _plan(self) -> TrainingPlan:
        if self.training_plan is None:
            raise RuntimeError("DINO's schedules are planned in configure_optimizers: train it with a Trainer")
        return self.training_plan

    # -- training ---------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views = batch[0]
        if not isinstance(views, (list, tuple)) or len(views) < self.n_global_crops:
            raise UserError(
                "DINO expects batches of multi-crop views (a list of >= 2 image tensors); set "
                "data.train_transform to xcit_ssl.data.transforms.MultiCropTransform"
            )
        plan = self._plan()
        teacher_temp = plan.teacher_temp_at(self.current_epoch)
        teacher_out = self.teacher_forward(list(views[: self.n_global_crops]))
        student_out = self.student_forward(list(views))
        loss = self.loss_fn(student_out, teacher_out, teacher_temp, n_global=self.n_global_crops)
        stop_if_not_finite(
            self,
            loss,
            "Lower optim.base_lr, raise dino.momentum_teacher or use --trainer.precision bf16-mixed instead of "
            "16-mixed (fp16 is a known NaN source with 8x8 patches)",
        )
        # summed here, folded into the center once per optimizer step (optimizer_step): under
        # gradient accumulation every micro-batch's loss and diagnostics use the same center
        self.loss_fn.accumulate_center(teacher_out)

        batch_size = views[0].shape[0]
        step = self.global_step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {  # train/lr is logged by optimizer_step, from the param groups it writes
                "train/wd": plan.weight_decay_at(step),
                "train/teacher_momentum": plan.teacher_momentum_at(step),
                "train/teacher_temp": teacher_temp,
            },
            batch_size=batch_size,
        )
        if step % max(1, self.trainer.log_every_n_steps) == 0:
            self._monitor_collapse(student_out.detach(), teacher_out, teacher_temp, batch_size)
        return loss

    @torch.no_grad()
    def _monitor_collapse(self, student_out: Tensor, teacher_out: Tensor, teacher_temp: float, batch_size: int) -> None:
        # the center is still the one the loss used: it moves only in optimizer_step, so the logged
        # teacher entropy + KL add up to this step's train/loss, and the collapse rule
        # (losses.dino.collapse_kind) reads this step's loss from the diagnostics' cross-entropy
        stats = dino_diagnostics(
            student_out, teacher_out, self.loss_fn.center, teacher_temp, self.dino.student_temp, self.n_global_crops
        )
        self.log_dict(
            {
                "collapse/teacher_entropy": float(stats["teacher_entropy"]),
                "collapse/kl_teacher_student": float(stats["kl_teacher_student"]),
                "collapse/center_norm": float(stats["center_norm"]),
            },
            batch_size=batch_size,
        )
        found = collapse_kind(stats)
        for kind in self._collapse_counts:
            self._collapse_counts[kind] = self._collapse_counts[kind] + 1 if found == kind else 0
            if self._collapse_counts[kind] == self.collapse_patience:
                what = (
                    f"loss has sat at ln(K) = {float(stats['ln_k']):.2f} (uniform output)"
                    if kind == "uniform"
                    else "teacher entropy is ~0 (one-hot output)"
                )
                logger.warning(
                    "possible DINO collapse at step %d: %s for %d checks; consider a lower teacher_temp, "
                    "a higher momentum_teacher or a smaller lr",
                    self.global_step, what, self.collapse_patience,
                )  # fmt: skip

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step, plan = self.global_step, self._plan()
        lrs = apply_schedules(
            optimizer,
            lr=plan.lr_at(step),
            weight_decay=plan.weight_decay_at(step),
            freeze_active=plan.last_layer_frozen(epoch),
        )
        if not plan.freeze_last_layer_epochs:  # the last layer then always has train/lr: no second name
            lrs.pop(FROZEN_LR_NAME, None)
        # the lr of this step as the optimizer uses it, once per optimizer step (not per micro-batch)
        self.log_dict(lrs)
        optimizer.step(closure=optimizer_closure)  # runs the last micro-batch's training_step
        # one center update per optimizer step from all its micro-batches (all ranks, one
        # all-reduce), as one large batch would give; Lightning also steps on an epoch's last,
        # partial accumulation window, so nothing is left pending across epochs
        self.loss_fn.flush_center()
        self.update_teacher(plan.teacher_momentum_at(step))

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # runs after AMP unscaling; DINO clips each parameter on its own, not the global norm
        params = [p for g in optimizer.param_groups for p in g["params"]]
        clip_gradients_per_parameter(params, self.optim.clip_grad)
        if self._plan().last_layer_frozen(self.current_epoch):
            # the zero-lr group already keeps the last layer fixed; dropping its gradients as well keeps
            # AdamW's moments untouched during the frozen epochs, as in DINO
            for group in optimizer.param_groups:
                if group.get("freeze_at_start"):
                    for p in group["params"]:
                        p.grad = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher, after each optimizer step."""
        average_buffers = self.dino.teacher_bn == "ema"
        update_ema(self.teacher_backbone, self.student_backbone, momentum, average_buffers)
        update_ema(self.teacher_head, self.student_head, momentum, average_buffers)

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["xcit_ssl"] = backbone_spec(self.student_backbone, method="dino", trainer=self._trainer)
