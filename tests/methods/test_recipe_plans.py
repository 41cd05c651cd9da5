"""Every shipped recipe at 1 and 8 devices: ``xcit-ssl doctor``'s plan is what the method runs and logs.

No process group is started: the recipe is resolved as ``xcit-ssl fit`` resolves it, the method is
built on the ``meta`` device, and its ``configure_optimizers`` runs against a trainer stand-in that
holds what Lightning would give it at that world size: the data module's own training loader
(sharded for rank 0 of 8) and ``num_training_batches`` after ``limit_train_batches``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from torch import nn

import xcit_ssl.methods.distilled as distilled_module
import xcit_ssl.methods.supervised as supervised_module
from xcit_ssl.commands import fit
from xcit_ssl.doctor.plan import build_plan

RECIPES = sorted(p.stem for p in Path("recipes").glob("*.yaml"))
# one of each family and schedule (DINO, supervised, distilled, fine-tune; per step and per epoch; the
# small CPU recipes with their batch limits) by default, all of them under -m slow
QUICK = {
    "dino_small_p16", "dino_large_p8", "dino_nano_fmnist", "sup_small_p16", "sup_nano_fmnist",
    "distill_tiny24_p8", "distill_nano_fmnist", "finetune_medium_p16_384",
}  # fmt: skip
IMAGENET_TRAIN = 1_281_167
FMNIST_TRAIN = 60_000


def test_recipe_list() -> None:
    assert len(RECIPES) >= 55 and QUICK <= set(RECIPES)


class _Sized(torch.utils.data.Dataset):
    """A training set of ``n`` images that are never read (only its length matters here)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        raise AssertionError("no image is read when planning")


def _resolve(name: str, devices: int) -> Any:
    return fit.resolve_config(["--recipe", name, "--trainer.devices", str(devices)])


def _instantiate(cli: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The recipe's method and data module on ``meta``, without the weight files the recipes name."""
    cfg = cli.config[cli.subcommand]
    classes = cfg.model.init_args.backbone.init_args.get("num_classes") or 0
    stub = nn.Linear(1, 1)
    stub.num_classes = classes  # type: ignore[assignment]
    # distilled recipes name a teacher weight file and fine-tunes a checkpoint: neither exists here,
    # and neither changes the plan
    monkeypatch.setattr(distilled_module, "build_teacher", lambda *args, **kwargs: stub)
    monkeypatch.setattr(supervised_module, "load_backbone_weights", lambda *args, **kwargs: "not loaded (test)")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        init = cli.parser.instantiate_classes(cli.config)[cli.subcommand]
    return init["model"], init["data"]


def _method_plan(model: Any, datamodule: Any, trainer_cfg: dict[str, Any], world: int, samples: int) -> Any:
    """Run the method's ``configure_optimizers`` as rank 0 of ``world`` processes would."""
    trainer = SimpleNamespace(
        world_size=world, global_rank=0, current_epoch=0, datamodule=datamodule,
        accumulate_grad_batches=int(trainer_cfg.get("accumulate_grad_batches") or 1),
        max_epochs=trainer_cfg.get("max_epochs"), max_steps=-1 if trainer_cfg.get("max_steps") is None else trainer_cfg["max_steps"],
    )  # fmt: skip
    datamodule.trainer = trainer
    datamodule.train_dataset = lambda: _Sized(samples)
    with warnings.catch_warnings():  # "10 workers on 2 cores": none is started, only its length is read
        warnings.simplefilter("ignore", UserWarning)
        trainer.train_dataloader = datamodule.train_dataloader()  # its sampler shards for this world size
    limit = trainer_cfg.get("limit_train_batches")
    trainer.num_training_batches = _parse_num_batches(
        RunningStage.TRAINING, len(trainer.train_dataloader), 1.0 if limit is None else limit
    )
    model.trainer = trainer
    try:
        model.configure_optimizers()
    finally:
        model.trainer = None
    return model.training_plan


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in RECIPES])
def test_doctor_plans_what_the_method_runs_at_1_and_8_devices(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fit, "check_trainer_config", lambda trainer: None)  # GPU-only settings on a CPU host
    samples = FMNIST_TRAIN if "fmnist" in name else IMAGENET_TRAIN
    model = datamodule = None
    for devices in (1, 8):
        cli = _resolve(name, devices)
        cfg = cli.config[cli.subcommand]
        if model is None:
            model, datamodule = _instantiate(cli, monkeypatch)
        trainer_cfg = dict(cfg.trainer)
        world = devices * int(trainer_cfg.get("num_nodes") or 1)
        doctor = build_plan(cfg, model, datamodule, samples, "test", str(cfg.config[0]))
        assert doctor.world == world, name
        with caplog.at_level(logging.INFO):
            caplog.clear()
            method = _method_plan(model, datamodule, trainer_cfg, world, samples)
        what = f"{name} at {devices} devices"
        assert method.global_batch == doctor.global_batch == datamodule.batch_size * world, what
        assert method.peak_lr == doctor.peak_lr, what
        assert method.lr_reference == doctor.lr_per, what
        assert method.total_steps == doctor.total_steps, what
        assert method.steps_per_epoch == doctor.steps_per_epoch, what
        assert method.warmup_steps == doctor.warmup_steps, what
        # the run-plan line the method logs at fit start carries the same numbers
        line = next(r.getMessage() for r in caplog.records if "global batch" in r.getMessage())
        assert f"global batch {doctor.global_batch}, peak lr {doctor.peak_lr:.3g}" in line, line
        assert f"{doctor.total_steps} steps ({doctor.steps_per_epoch} per epoch)" in line, line
        # and train/lr reaches the doctor's peak right after the warm-up (where the run is longer than it)
        if doctor.warmup_steps < doctor.total_steps:
            assert method.lr_at(doctor.warmup_steps) == pytest.approx(doctor.peak_lr, rel=1e-12), what
