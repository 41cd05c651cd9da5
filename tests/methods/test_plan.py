"""The run plan (xcit_ssl.methods.plan) against numbers written out by hand and against Lightning."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.errors import UserError
from xcit_ssl.methods.plan import RunShape, count_steps, plan_dino, plan_supervised
from xcit_ssl.methods.sup_config import SupervisedOptimConfig

from dino_helpers import loader, tiny_dino

# ImageNet-1k on 8 GPUs x 128 images: ceil(1,281,167 / 8) = 160,146 images per GPU, floor(/ 128)
# = 1,251 batches per epoch (drop_last), 300 epochs = 375,300 steps
IMAGENET_BATCHES_AT_8X128 = 1251


def test_dino_small_p16_plan_is_the_papers() -> None:
    """REFERENCE.md section 2: lr = base_lr x batch / 256, 10 warm-up epochs, cosine to min_lr; XCiT-S12/16
    peak lr 2e-3 at batch 1024; wd 0.04 -> 0.4; momentum 0.996 -> 1; teacher temp 0.04 -> 0.07 over 30
    epochs; last layer frozen during the first epoch."""
    optim = OptimConfig(base_lr=0.0005, min_lr=1e-5, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4)
    dino = DINOConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30)
    shape = RunShape(world_size=8, accumulate=1, batch_size=128, batches_per_epoch=1251, max_epochs=300)
    plan = plan_dino(optim, dino, shape)
    assert plan.global_batch == 1024
    assert plan.peak_lr == pytest.approx(2e-3, rel=1e-12)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == (1251, 375_300, 300)
    assert plan.warmup_steps == 12_510  # 10 epochs x 1251 steps
    # linear warm-up from 0: half-way at half the peak, the peak right after it, min_lr at the end
    assert plan.lr_at(0) == 0.0
    assert plan.lr_at(6255) == pytest.approx(1e-3, rel=1e-12)
    assert plan.lr_at(12_510) == pytest.approx(2e-3, rel=1e-12)
    assert plan.lr_at(375_299) == pytest.approx(1e-5, rel=1e-12)
    # cosine half-way through the decay: the mean of peak and min_lr
    assert plan.lr_at(12_510 + 181_394) == pytest.approx((2e-3 + 1e-5) / 2, rel=1e-4)
    assert plan.weight_decay_at(0) == pytest.approx(0.04) and plan.weight_decay_at(375_299) == pytest.approx(0.4)
    assert plan.teacher_momentum_at(0) == pytest.approx(0.996) and plan.teacher_momentum_at(375_299) == 1.0
    assert plan.teacher_temp_at(0) == pytest.approx(0.04)
    assert plan.teacher_temp_at(15) == pytest.approx(0.055)  # half-way through 30 warm-up epochs
    assert plan.teacher_temp_at(30) == pytest.approx(0.07) and plan.teacher_temp_at(299) == pytest.approx(0.07)
    assert plan.last_layer_frozen(0) and not plan.last_layer_frozen(1)
    # a resumed run that goes past the plan holds the last values
    assert plan.lr_at(10**7) == pytest.approx(1e-5) and plan.teacher_momentum_at(10**7) == 1.0


def test_dino_global_batch_counts_devices_nodes_and_accumulation() -> None:
    # 64 per device x 8 devices x 2 nodes x 2 micro-batches = 2048 images per step: lr 5e-4 x 8 = 4e-3
    shape = RunShape(world_size=16, accumulate=2, batch_size=64, batches_per_epoch=1251, max_epochs=100)
    plan = plan_dino(OptimConfig(base_lr=5e-4, warmup_epochs=0.5), DINOConfig(), shape)
    assert plan.global_batch == 2048 and plan.peak_lr == pytest.approx(4e-3, rel=1e-12)
    assert plan.steps_per_epoch == 626  # ceil(1251 / 2): Lightning also steps on the last, partial window
    assert plan.total_steps == 62_600 and plan.warmup_steps == 313  # round(0.5 x 626)


def test_supervised_plan_is_the_xcit_recipe_per_epoch() -> None:
    """REFERENCE.md section 4: lr 5e-4 x batch / 512 (batch 1024 -> 1e-3), 400 epochs, 5 warm-up epochs
    from 1e-6, cosine to 1e-5 per epoch."""
    optim = SupervisedOptimConfig(base_lr=5e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, schedule_unit="epoch")
    shape = RunShape(world_size=8, accumulate=1, batch_size=128, batches_per_epoch=1251, max_epochs=400)
    plan = plan_supervised(optim, shape)
    assert plan.global_batch == 1024 and plan.peak_lr == pytest.approx(1e-3, rel=1e-12)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (1251, 500_400, 6255)
    # one lr per epoch: 1e-6 for all of epoch 0, 1e-6 + (1e-3 - 1e-6) / 5 in epoch 1, the peak from epoch 5
    assert plan.lr_at(0) == plan.lr_at(1250) == pytest.approx(1e-6)
    assert plan.lr_at(1251) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 5)
    assert plan.lr_at(5 * 1251) == pytest.approx(1e-3) and plan.lr_at(500_399) == pytest.approx(1e-5)
    assert plan.weight_decay_at(0) == plan.weight_decay_at(500_399) == 0.05  # constant
    with pytest.raises(ValueError, match="only DINO"):
        plan.teacher_temp_at(0)


def test_supervised_plan_per_step_rounds_the_warmup_to_steps() -> None:
    # sup_nano_fmnist: 250 steps of 128 images, warm-up 0.1 epoch = 25 steps, 4e-3 per 512 -> 1e-3
    optim = SupervisedOptimConfig(base_lr=4e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=0.1)
    plan = plan_supervised(optim, RunShape(world_size=1, accumulate=1, batch_size=128, batches_per_epoch=250, max_epochs=1))
    assert plan.global_batch == 128 and plan.peak_lr == pytest.approx(1e-3, rel=1e-12)
    assert (plan.total_steps, plan.warmup_steps) == (250, 25)
    assert plan.lr_at(0) == pytest.approx(1e-6) and plan.lr_at(25) == pytest.approx(1e-3) and plan.lr_at(249) == 1e-5


def test_warmup_longer_than_the_run_is_cut_to_the_run() -> None:
    shape = RunShape(world_size=1, accumulate=1, batch_size=8, batches_per_epoch=10, max_epochs=2)
    assert plan_dino(OptimConfig(warmup_epochs=10), DINOConfig(), shape).warmup_steps == 20
    epoch = SupervisedOptimConfig(warmup_epochs=5, schedule_unit="epoch")
    assert plan_supervised(epoch, shape).warmup_steps == 20
    temp = plan_dino(OptimConfig(), DINOConfig(teacher_temp=0.07, warmup_teacher_temp_epochs=30), shape)
    assert temp.teacher_temp_at(1) == pytest.approx(0.04 + 0.03 / 2)  # warm-up cut to the run's 2 epochs


@pytest.mark.parametrize(
    "shape, expected",
    [
        (RunShape(1, 1, 4, 10, max_epochs=3), (10, 30)),
        (RunShape(1, 3, 4, 10, max_epochs=3), (4, 12)),  # ceil(10 / 3) steps per epoch
        (RunShape(1, 1, 4, 10, max_epochs=3, max_steps=7), (10, 7)),
        (RunShape(1, 1, 4, 10, max_epochs=-1, max_steps=25), (10, 25)),
        (RunShape(1, 1, 4, 10, max_epochs=None, max_steps=None), (10, 10_000)),  # Lightning's 1000 epochs
        (RunShape(1, 1, 4, math.inf, max_epochs=4, max_steps=100), (25, 100)),  # no length: epochs from max_epochs
        (RunShape(1, 1, 4, 0, max_epochs=3), (1, 1)),  # at least one step
    ],
)
def test_count_steps(shape: RunShape, expected: tuple[int, int]) -> None:
    assert count_steps(shape) == expected


@pytest.mark.parametrize(
    "shape", [RunShape(1, 1, 4, 10, max_epochs=-1), RunShape(1, 1, 4, math.inf, max_epochs=3)]
)
def test_a_run_without_end_has_no_schedule(shape: RunShape) -> None:
    with pytest.raises(UserError, match="finite run"):
        count_steps(shape)


class _Stop(Exception):
    pass


class _StopAtStart(L.Callback):
    """Records Lightning's own step estimate, then ends the fit before its first step."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.estimated = trainer.estimated_stepping_batches
        self.batches = trainer.num_training_batches
        raise _Stop


@pytest.mark.parametrize(
    "limits",
    [
        dict(max_epochs=3),
        dict(max_epochs=3, accumulate_grad_batches=3),
        dict(max_epochs=5, max_steps=7),
        dict(max_epochs=-1, max_steps=9),
        dict(max_epochs=2, limit_train_batches=0.5),
        dict(max_epochs=2, limit_train_batches=3, accumulate_grad_batches=2),
    ],
)
def test_configure_optimizers_plans_lightnings_step_count(tmp_path: Path, limits: dict) -> None:
    """The plan the method logs counts the steps Lightning will run (``estimated_stepping_batches``)."""
    model, stop = tiny_dino(), _StopAtStart()
    trainer = L.Trainer(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, callbacks=[stop], **limits,
    )  # fmt: skip
    with pytest.raises(_Stop):
        trainer.fit(model, loader(batch_size=4, n=16))  # 4 batches per epoch
    plan = model.training_plan
    assert plan is not None and plan.total_steps == stop.estimated
    assert plan.steps_per_epoch == math.ceil(stop.batches / trainer.accumulate_grad_batches)
    assert plan.global_batch == 4 * trainer.accumulate_grad_batches
    assert plan.peak_lr == pytest.approx(1e-3 * plan.global_batch / 256, rel=1e-12)  # tiny_dino's base_lr
    assert plan.warmup_steps == min(plan.steps_per_epoch, plan.total_steps)  # tiny_dino: 1 warm-up epoch
