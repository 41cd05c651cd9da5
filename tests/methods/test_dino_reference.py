"""The DINO LightningModule, trained by a real Trainer, against a bare loop written from REFERENCE.md §2.

The reference loop reuses only the backbone and head modules (deep copies with the same init; the
teacher backbone is rebuilt *without* drop-path and given the student's weights, as DINO builds it).
Schedules, the loss, the center EMA, the AdamW parameter groups, per-parameter clipping, the frozen
last layer and the teacher EMA are written here from the formulas, not imported. Drop-path draws
random numbers, so both loops seed torch before each step; the teacher must draw none.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.methods.dino import DINO
from xcit_ssl.models import build_backbone

from dino_helpers import FixedViews

TINY = dict(name="xcit_nano_12_p8_224", depth=1, embed_dim=32, num_heads=2)
SEED = 1000


# -- the reference, from the formulas ----------------------------------------------------------


def warmup_cosine(start: float, end: float, total: int, warmup: int, s: int) -> float:
    """Linear warm-up 0 -> start over `warmup` steps, then a half cosine start -> end (inclusive)."""
    if s < warmup:
        return start * s / warmup
    n = total - warmup
    return start if n == 1 else end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / (n - 1)))


def teacher_temp(warm: float, final: float, warm_epochs: int, epoch: int) -> float:
    return warm + (final - warm) * epoch / warm_epochs if epoch < warm_epochs else final


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, t_temp: float, s_temp: float, n_views: int) -> Tensor:
    """Mean over the pairs (teacher view i, student view v != i) of the batch-mean cross-entropy."""
    batch = teacher.shape[0] // 2
    p_t = torch.softmax((teacher.double() - center) / t_temp, dim=-1).chunk(2)
    log_p_s = torch.log_softmax(student.double() / s_temp, dim=-1).chunk(n_views)
    terms = [-(p_t[i] * log_p_s[v]).sum(-1).mean() for i in range(2) for v in range(n_views) if v != i]
    assert len(terms) == 2 * n_views - 2 and log_p_s[0].shape[0] == batch
    return torch.stack(terms).mean()


def is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Reference:
    """Student/teacher DINO in plain PyTorch, one `step` per batch (no accumulation)."""

    def __init__(self, student_backbone: nn.Module, student_head: nn.Module, drop_path_free: nn.Module,
                 dino: DINOConfig, optim: OptimConfig, batch: int, steps_per_epoch: int, epochs: int) -> None:
        self.dino, self.optim = dino, optim
        self.student_backbone, self.student_head = student_backbone, student_head
        self.teacher_backbone = drop_path_free
        self.teacher_backbone.load_state_dict(student_backbone.state_dict())
        self.teacher_head = copy.deepcopy(student_head)
        for p in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            p.requires_grad_(False)
        self.center = torch.zeros(1, dino.out_dim, dtype=torch.float64)
        self.total = steps_per_epoch * epochs
        self.warmup = int(optim.warmup_epochs * steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.peak_lr = optim.base_lr * batch / 256
        # one AdamW group per parameter: weight decay only on > 1-D non-bias tensors
        self.named = [(f"{prefix}.{n}", p) for prefix, mod in (("backbone", student_backbone), ("head", student_head))
                      for n, p in mod.named_parameters() if p.requires_grad]
        self.groups = [{"params": [p], "decay": p.ndim > 1 and not n.endswith(".bias"), "last": "last_layer" in n}
                       for n, p in self.named]
        self.opt = torch.optim.AdamW(self.groups, lr=self.peak_lr, betas=optim.betas)
        self.clipped: list[int] = []  # per step, how many parameters were clipped
        for m in (student_backbone, student_head, self.teacher_backbone, self.teacher_head):
            m.train()  # the teacher stays in train mode too (its BatchNorm uses batch statistics)

    def step(self, views: list[Tensor], s: int) -> float:
        d, o = self.dino, self.optim
        epoch = s // self.steps_per_epoch
        torch.manual_seed(SEED + s)
        with torch.no_grad():
            t_out = self.teacher_head(self.teacher_backbone(torch.cat(views[:2])))
        feats = [self.student_backbone(torch.cat(views[:2])), self.student_backbone(torch.cat(views[2:]))]
        s_out = self.student_head(torch.cat(feats))
        temp = teacher_temp(d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs, epoch)
        loss = dino_loss(s_out, t_out, self.center, temp, d.student_temp, len(views))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clipped = 0
        for _, p in self.named:  # clip every parameter on its own
            norm = float(p.grad.norm())
            if o.clip_grad / (norm + 1e-6) < 1:
                p.grad.mul_(o.clip_grad / (norm + 1e-6))
                clipped += 1
        self.clipped.append(clipped)
        lr = warmup_cosine(self.peak_lr, o.min_lr, self.total, self.warmup, s)
        wd = warmup_cosine(o.weight_decay, o.weight_decay_end, self.total, 0, s)
        for g in self.groups:
            frozen = g["last"] and epoch < o.freeze_last_layer
            if frozen:
                g["params"][0].grad = None  # no update, and AdamW's moments stay untouched
            g["lr"] = 0.0 if frozen else lr
            g["weight_decay"] = wd if g["decay"] else 0.0
        self.opt.step()
        m = warmup_cosine(d.momentum_teacher, 1.0, self.total, 0, s)
        with torch.no_grad():
            for tgt, src in ((self.teacher_backbone, self.student_backbone), (self.teacher_head, self.student_head)):
                for pt, ps in zip(tgt.parameters(), src.parameters()):
                    pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            cm = d.center_momentum
            self.center = cm * self.center + (1 - cm) * t_out.double().mean(0, keepdim=True)
        return float(loss.detach())


# -- the Lightning side -------------------------------------------------------------------------


class Seeder(L.Callback):
    """Seed before every optimizer step's batch, as the reference does; record the logged loss."""

    def __init__(self, freeze_bn: bool = False) -> None:
        self.freeze_bn = freeze_bn
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        torch.manual_seed(SEED + trainer.global_step)
        if self.freeze_bn:
            for m in pl_module.modules():
                if is_bn(m):
                    m.eval()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(model: DINO, loader: DataLoader, tmp_path: Path, epochs: int, accumulate: int = 1,
        freeze_bn: bool = False) -> Seeder:
    seeder = Seeder(freeze_bn)
    L.Trainer(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1, max_epochs=epochs,
        accumulate_grad_batches=accumulate, callbacks=[seeder],
    ).fit(model, loader)  # fmt: skip
    return seeder


def close(a: Tensor, b: Tensor, what: str) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=what)


def assert_same_state(model: DINO, student_backbone: nn.Module, student_head: nn.Module, teacher_backbone: nn.Module,
                      teacher_head: nn.Module, center: Tensor) -> None:
    pairs = ((model.student_backbone, student_backbone), (model.student_head, student_head),
             (model.teacher_backbone, teacher_backbone), (model.teacher_head, teacher_head))  # fmt: skip
    for ours, ref in pairs:
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):  # params and BN buffers
            close(a, b, name)
    close(model.loss_fn.center, center, "center")


def freeze_zero_gradient_parameters(model: DINO) -> list[str]:
    """Freeze the student parameters whose gradient is exactly zero by construction.

    Their computed gradients are pure round-off, different in the two loops (the loss is summed
    in another order), and AdamW turns any gradient into a step of ~lr: the class-attention key
    bias (a logit shift the softmax over keys ignores) and, with BatchNorm in the head, what adds
    the same vector to every sample before a BatchNorm (the Linear biases feeding one, and the
    backbone's final LayerNorm bias, which feeds the first). Frozen, they stay equal in both.
    """
    n_ca = len(model.student_backbone.cls_attn_blocks)
    names = [f"student_backbone.cls_attn_blocks.{i}.attn.k.bias" for i in range(n_ca)]
    layers = list(model.student_head.mlp)
    before_bn = [i for i, m in enumerate(layers[:-1]) if isinstance(m, nn.Linear) and is_bn(layers[i + 1])]
    if before_bn:
        names += ["student_backbone.norm.bias"] + [f"student_head.mlp.{i}.bias" for i in before_bn]
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


def config(use_bn_in_head: bool, norm_last_layer: bool) -> tuple[DINOConfig, OptimConfig]:
    dino = DINOConfig(
        out_dim=64, hidden_dim=32, bottleneck_dim=16, use_bn_in_head=use_bn_in_head, norm_last_layer=norm_last_layer,
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3, momentum_teacher=0.9,
    )  # fmt: skip
    # peak lr 1e-3 at batch 4; a small clip so that some parameters are clipped and others not
    optim = OptimConfig(base_lr=0.064, min_lr=1e-5, warmup_epochs=1, clip_grad=0.3, freeze_last_layer=1)
    return dino, optim


@pytest.mark.parametrize(("use_bn_in_head", "norm_last_layer"), [(False, True), (True, False)])
def test_lightning_dino_equals_the_reference_loop(tmp_path: Path, use_bn_in_head: bool, norm_last_layer: bool) -> None:
    """12 steps, 3 epochs of 4: across the frozen last layer epoch, inside the teacher-temp warm-up (0.04..0.06)."""
    dino, optim = config(use_bn_in_head, norm_last_layer)
    torch.manual_seed(0)
    model = DINO(build_backbone(**TINY, drop_path_rate=0.2), dino=dino, optim=optim)
    frozen = freeze_zero_gradient_parameters(model)
    assert len(frozen) == (5 if use_bn_in_head else 2)
    ref = Reference(copy.deepcopy(model.student_backbone), copy.deepcopy(model.student_head),
                    build_backbone(**TINY, drop_path_rate=0.0), dino, optim, batch=4, steps_per_epoch=4, epochs=3)
    loader = DataLoader(FixedViews(16), batch_size=4, shuffle=False)
    batches = [b[0] for b in loader]
    last_init = [p.detach().clone() for p in ref.student_head.last_layer.parameters()]

    ref_losses = []
    for s in range(12):
        ref_losses.append(ref.step(batches[s % 4], s))
        if s == 3:  # the reference itself: the last layer did not move in the frozen epoch, then does
            assert all(torch.equal(p, q) for p, q in zip(ref.student_head.last_layer.parameters(), last_init))
    assert not all(torch.equal(p, q) for p, q in zip(ref.student_head.last_layer.parameters(), last_init))
    assert 0 < min(ref.clipped) and max(ref.clipped) < len(ref.named)  # clipping acts, per parameter

    seeder = fit(model, loader, tmp_path, epochs=3)
    assert len(seeder.losses) == 12
    for s, (a, b) in enumerate(zip(seeder.losses, ref_losses)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), f"step {s}"
    assert_same_state(model, ref.student_backbone, ref.student_head, ref.teacher_backbone, ref.teacher_head, ref.center)
    if use_bn_in_head:  # the teacher's own BatchNorm statistics moved, and agree
        bn = next(m for m in model.teacher_head.modules() if is_bn(m))
        assert int(bn.num_batches_tracked) == 12 and bn.running_var.ne(1).any()


def test_accumulating_two_batches_of_b_equals_one_batch_of_2b(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 at batch 4 vs batch 8: same losses, parameters and center.

    BatchNorm is held in eval mode in both (its statistics would differ per micro-batch) and the
    student has no drop-path (its masks are drawn per sample): what remains must be identical.
    """
    dino, optim = config(use_bn_in_head=False, norm_last_layer=False)
    torch.manual_seed(0)
    acc = DINO(build_backbone(**TINY), dino=dino, optim=optim)
    freeze_zero_gradient_parameters(acc)
    big = copy.deepcopy(acc)
    data = FixedViews(16)
    acc_run = fit(acc, DataLoader(data, batch_size=4), tmp_path / "acc", epochs=3, accumulate=2, freeze_bn=True)
    big_run = fit(big, DataLoader(data, batch_size=8), tmp_path / "big", epochs=3, freeze_bn=True)
    assert len(acc_run.losses) == 12 and len(big_run.losses) == 6
    for s, b in enumerate(big_run.losses):  # the big batch's loss is the mean of its two halves'
        assert (acc_run.losses[2 * s] + acc_run.losses[2 * s + 1]) / 2 == pytest.approx(b, rel=1e-5, abs=1e-5), s
    assert_same_state(acc, big.student_backbone, big.student_head, big.teacher_backbone, big.teacher_head,
                      big.loss_fn.center)
    assert acc.loss_fn.pending_count == 0


def test_last_partial_accumulation_window_updates_the_center_at_epoch_end(tmp_path: Path) -> None:
    """3 micro-batches with accumulation 2: Lightning steps on [0, 1] and on the lone [2].

    The center then equals that of batches of 8 and 4 without accumulation, and nothing is left
    pending. (Parameters may differ at the second step: Lightning divides a partial window's loss
    by 2 all the same.)
    """
    dino, optim = config(use_bn_in_head=False, norm_last_layer=True)
    torch.manual_seed(0)
    acc = DINO(build_backbone(**TINY), dino=dino, optim=optim)
    big = copy.deepcopy(acc)
    data = FixedViews(12)
    fit(acc, DataLoader(data, batch_size=4), tmp_path / "acc", epochs=1, accumulate=2, freeze_bn=True)
    fit(big, DataLoader(data, batch_size=8), tmp_path / "big", epochs=1, freeze_bn=True)
    assert acc.trainer.global_step == big.trainer.global_step == 2
    assert acc.loss_fn.pending_count == 0 and torch.all(acc.loss_fn.pending_sum == 0)
    close(acc.loss_fn.center, big.loss_fn.center, "center")
