"""Supervised classification of an XCiT backbone as a LightningModule (REFERENCE.md section 4).

The XCiT/DeiT recipe: cross-entropy with label smoothing, mixup/CutMix on the batch (timm's
``Mixup``), AdamW with ``lr = base_lr * batch / 512``, warm-up + cosine (planned by
:func:`xcit_ssl.methods.plan.plan_supervised`, the plan ``xcit-ssl doctor`` shows), and a model EMA
(``ema_backbone``) updated after every optimizer step and validated alongside the raw model.
Augmentation and repeated augmentation live in :mod:`xcit_ssl.data.supervised`.

Checkpoints: ``state_dict`` holds ``backbone.*`` (with head) and ``ema_backbone.*``; the
``xcit_ssl`` entry names the variant. Fine-tuning: ``pretrained`` loads any weight file (DINO,
timm, official, ours) strictly into the backbone before the EMA copy is made; a head of another
shape is left at its initialisation, with a notice.
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

from ..config import as_config
from ..errors import UserError
from ..evaluation.metrics import top1_top5_correct
from ..losses.distillation import classification_loss
from ..models.checkpoints import load_backbone, load_backbone_weights, read_state_dict
from ..models.xcit import XCiT
from .checkpointing import backbone_spec, stop_if_not_finite
from .ema import update_ema
from .optim import apply_schedules, is_regularised
from .plan import RunShape, TrainingPlan, plan_supervised, shape_from_trainer
from .sup_config import MixupConfig, SupervisedOptimConfig

logger = logging.getLogger(__name__)


class Supervised(L.LightningModule):
    """Train an injected XCiT classifier on labelled images.

    Args:
        backbone: an XCiT with a classifier head (``num_classes > 0``).
        optim: AdamW and schedule settings (``base_lr`` per 512 images).
        label_smoothing: smoothing of the targets (XCiT: 0.1); folded into mixed targets.
        mixup: mixup/CutMix settings; None trains on the unmixed batch.
        model_ema_decay: decay of the model EMA per optimizer step (XCiT: 0.99996, which assumes
            ~500k steps; short runs need e.g. 0.999); None keeps no EMA.
        pretrained: weights to start from (fine-tuning): a DINO checkpoint, one of ours, a timm /
            official / mmpretrain file or an export.
        checkpoint_key: which network of a multi-network ``pretrained`` file to take
            (``teacher``/``student`` for DINO, ``ema``/``backbone`` for ours).
    Batches are ``(images [B, 3, H, W], labels [B] int64)``.
    """

    method_name = "supervised"

    def __init__(
        self,
        backbone: XCiT,
        optim: SupervisedOptimConfig | None = None,
        label_smoothing: float = 0.1,
        mixup: MixupConfig | None = None,
        model_ema_decay: float | None = 0.99996,
        pretrained: str | None = None,
        checkpoint_key: str = "teacher",
    ) -> None:
        super().__init__()
        # dicts arrive from Lightning's load_from_checkpoint, which passes the saved hyper-parameters back
        self.optim = as_config(SupervisedOptimConfig, optim) or SupervisedOptimConfig()
        self.mixup = mixup = as_config(MixupConfig, mixup)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing={label_smoothing}: use a value in [0, 1) (XCiT: 0.1)")
        if model_ema_decay is not None and not 0.0 <= model_ema_decay <= 1.0:
            raise UserError(f"model_ema_decay={model_ema_decay}: use a value in [0, 1] or null for no EMA")
        # plain dicts keep checkpoints loadable with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "optim": asdict(self.optim),
                "label_smoothing": label_smoothing,
                "mixup": asdict(mixup) if mixup is not None else None,
                "model_ema_decay": model_ema_decay,
                "pretrained": pretrained,
                "checkpoint_key": checkpoint_key,
            }
        )
        if not getattr(backbone, "num_classes", 0):
            raise UserError(
                f"{type(self).__name__} needs a classifier head: set `num_classes` (e.g. 1000, or 10 for "
                "Fashion-MNIST) in model.backbone"
            )
        if pretrained:
            report = load_backbone_weights(backbone, pretrained, checkpoint_key=checkpoint_key)
            logger.info("fine-tuning from %s: %s", pretrained, report)
        self.backbone = backbone
        self.num_classes = int(backbone.num_classes)
        self.label_smoothing = label_smoothing
        self.model_ema_decay = model_ema_decay
        self.ema_backbone: XCiT | None = None
        if model_ema_decay is not None:
            self.ema_backbone = copy.deepcopy(backbone)
            for p in self.ema_backbone.parameters():
                p.requires_grad_(False)
        self.mixup_fn = self._build_mixup(mixup, label_smoothing)
        self.training_plan: TrainingPlan | None = None  # set by configure_optimizers
        self._val_counts: dict[str, Tensor] = {}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Supervised:
        """Lightning's reload of a ``xcit-ssl fit`` checkpoint: ``Supervised.load_from_checkpoint(path)``
        (and ``Distilled``'s, whose teacher is rebuilt from its saved ``teacher_weights``: pass
        ``teacher_weights=`` where that file moved).

        Without ``backbone=``, the classifier is built from the variant the checkpoint records, with
        its head's number of classes; with it, that network is used. ``pretrained`` defaults to None:
        the checkpoint's own weights replace any starting weights, so that file is not read again.
        """
        if "backbone" not in kwargs and isinstance(checkpoint_path, (str, Path)):
            classes = int(read_state_dict(checkpoint_path, checkpoint_key="backbone")["head.weight"].shape[0])
            kwargs["backbone"] = load_backbone(checkpoint_path, checkpoint_key="backbone", num_classes=classes)
        kwargs.setdefault("pretrained", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _build_mixup(self, cfg: MixupConfig | None, smoothing: float) -> Any:
        if cfg is None or not cfg.active:
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob, switch_prob=cfg.switch_prob,
            mode=cfg.mode, label_smoothing=smoothing, num_classes=self.num_classes,
        )  # fmt: skip

    # -- networks ---------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, C]`` of the trained (raw) backbone."""
        return self.backbone(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Features for evaluation: pre-logits CLS ``[B, D]`` of the EMA backbone (raw if no EMA)."""
        net = self.ema_backbone if self.ema_backbone is not None else self.backbone
        was_training = net.training
        net.eval()
        out = net.forward_head(net.forward_features(images), pre_logits=True)
        net.train(was_training)
        return out

    def mix(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mixup/CutMix: mixed images ``[B, 3, H, W]`` and soft targets ``[B, C]`` summing to one.

        Without mixup the labels ``[B]`` pass through (smoothing is applied by the loss).
        """
        if self.mixup_fn is None:
            return images, labels
        if images.shape[0] % 2:
            raise UserError(
                f"mixup/CutMix pairs images within a batch and needs an even batch size, got {images.shape[0]}; "
                "set data.batch_size to an even number and keep data.drop_last true"
            )
        return self.mixup_fn(images, labels)

    def training_loss(self, images: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise and extra values to log; ``images`` is the (mixed) input batch."""
        return classification_loss(logits, targets, self.label_smoothing), {}

    # -- training ---------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise UserError(
                f"the model's head has {self.num_classes} classes but the data has {data_classes}: set "
                f"--model.backbone.init_args.num_classes {data_classes} (or point --data.root at the right data)"
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        images, targets = self.mix(images, labels)
        logits = self.backbone(images)
        loss, parts = self.training_loss(images, logits, targets)
        stop_if_not_finite(
            self,
            loss,
            "Lower optim.base_lr, set --trainer.gradient_clip_val 1.0 or use --trainer.precision bf16-mixed "
            "instead of 16-mixed",
        )
        batch_size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({k: v.detach() for k, v in parts.items()}, batch_size=batch_size)
        return loss  # train/lr is logged by optimizer_step, from the param groups it writes

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        plan, step = self._plan(), self.global_step
        lrs = apply_schedules(optimizer, lr=plan.lr_at(step), weight_decay=plan.weight_decay_at(step), freeze_active=False)
        self.log_dict(lrs)  # the lr this optimizer step uses, once per step (not per accumulated micro-batch)
        optimizer.step(closure=optimizer_closure)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * backbone``, parameters and BatchNorm statistics."""
        if self.ema_backbone is not None and self.model_ema_decay is not None:
            update_ema(self.ema_backbone, self.backbone, self.model_ema_decay, average_buffers=True)

    # -- optimizer and schedule -------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decayed weights, and biases / 1-D / ``no_weight_decay()`` parameters undecayed.

        The XCA temperatures are decayed unless ``optim.decay_temperature`` is false (see
        :class:`SupervisedOptimConfig`: the published XCiT recipe decays them).
        """
        skip = set(self.backbone.no_weight_decay())
        if self.optim.decay_temperature:
            skip = {name for name in skip if not name.endswith("attn.temperature")}
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.backbone.named_parameters():
            if not p.requires_grad:
                continue
            (decay if is_regularised(name, p) and name not in skip else no_decay).append(p)
        groups = [{"params": decay, "regularised": True}, {"params": no_decay, "regularised": False}]
        return [g for g in groups if g["params"]]

    def plan_training(self, shape: RunShape) -> TrainingPlan:
        """This module's lr schedule for a run of ``shape`` (also what ``xcit-ssl doctor`` reports)."""
        return plan_supervised(self.optim, shape)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        plan = self.training_plan = self.plan_training(shape_from_trainer(self.trainer))
        o = self.optim
        logger.info(
            "%s: global batch %d, peak lr %.3g (base_lr %.3g per 512), %d steps (%d per epoch), lr per %s",
            type(self).__name__, plan.global_batch, plan.peak_lr, o.base_lr, plan.total_steps, plan.steps_per_epoch,
            o.schedule_unit,
        )  # fmt: skip
        return torch.optim.AdamW(
            self.param_groups(), lr=plan.peak_lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )

    def _plan(self) -> TrainingPlan:
        if self.training_plan is None:
            raise RuntimeError(
                f"{type(self).__name__}'s lr schedule is planned in configure_optimizers: train it with a Trainer"
            )
        return self.training_plan

    # -- validation: top-1 / top-5 of the raw and the EMA model ----------------------------------

    def _networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"val": self.backbone}
        if self.ema_backbone is not None:
            nets["val_ema"] = self.ema_backbone
        return nets

    def on_validation_epoch_start(self) -> None:
        self._val_counts = {
            prefix: torch.zeros(4, dtype=torch.float32, device=self.device) for prefix in self._networks()
        }  # per network: [top-1 hits, top-5 hits, summed loss, images]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        for prefix, net in self._networks().items():
            logits = net(images).float()
            top1, top5 = top1_top5_correct(logits, labels)
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            acc = self._val_counts[prefix]
            acc[0] += top1.to(acc.dtype)
            acc[1] += top5.to(acc.dtype)
            acc[2] += loss.to(acc.dtype)
            acc[3] += len(labels)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            # Lightning's check that validation runs at all, on a few batches before epoch 0 trains:
            # not an epoch's validation, so nothing is logged or printed as one
            return
        for prefix, counts in self._val_counts.items():
            total = self.trainer.strategy.reduce(counts.clone(), reduce_op="sum")  # exact, not a mean of means
            n = float(total[3])
            if n == 0:
                continue
            values = {
                f"{prefix}/top1": 100.0 * float(total[0]) / n,
                f"{prefix}/top5": 100.0 * float(total[1]) / n,
                f"{prefix}/loss": float(total[2]) / n,
            }
            self.log_dict(values, prog_bar=prefix == "val", sync_dist=False, rank_zero_only=False)
            logger.info("epoch %d %s: top-1 %.2f top-5 %.2f", self.current_epoch, prefix, values[f"{prefix}/top1"],
                        values[f"{prefix}/top5"])  # fmt: skip

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["xcit_ssl"] = backbone_spec(self.backbone, method=self.method_name, trainer=self._trainer)
