"""Lightning's own way back to a module, ``Method.load_from_checkpoint``, on the checkpoints of real
``xcit-ssl fit`` runs of the nano Fashion-MNIST recipes (DINO, supervised, distilled).

The methods save their configs as plain dicts; Lightning hands those back to ``__init__``, which
used to raise ``TypeError: asdict() should be called on dataclass instances``. Without
``backbone=`` the network is built from the variant the checkpoint records.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_cli_supervised import TINY, _fit_args, fmnist_folder, sup_run  # noqa: F401 - module fixtures
from xcit_ssl.cli import main
from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.errors import UserError
from xcit_ssl.methods.dino import DINO
from xcit_ssl.methods.distilled import Distilled
from xcit_ssl.methods.sup_config import MixupConfig, SupervisedOptimConfig
from xcit_ssl.methods.supervised import Supervised
from xcit_ssl.models.registry import create_backbone


@pytest.fixture(scope="module")
def dino_run(fmnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """``xcit-ssl fit --recipe dino_nano_fmnist`` for two steps on the image folder, tiny network and head."""
    run = tmp_path_factory.mktemp("runs") / "dino"
    args = ["fit", "--recipe", "dino_nano_fmnist", *TINY, "--data.dataset", "imagefolder",
            "--data.root", str(fmnist_folder), "--data.pad_to", "null", "--data.batch_size", "8",
            "--data.num_workers", "0", "--trainer.limit_train_batches", "2", "--trainer.callbacks", "[]",
            "--model.dino.out_dim", "64", "--model.dino.hidden_dim", "32", "--model.dino.bottleneck_dim", "16",
            "--run_dir", str(run)]  # fmt: skip
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def distill_run(sup_run: Path, fmnist_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """``xcit-ssl fit --recipe distill_nano_fmnist`` taught by the supervised run's checkpoint."""
    run = tmp_path_factory.mktemp("runs") / "distill"
    teacher = str(sup_run / "checkpoints" / "last.ckpt")
    assert main(_fit_args("distill_nano_fmnist", fmnist_folder, run, "--model.teacher_weights", teacher)) == 0
    return run


def _assert_holds_the_checkpoint(module: nn.Module, path: Path) -> None:
    saved = torch.load(path, weights_only=True)["state_dict"]
    state = module.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def _recorded_backbone(path: Path) -> nn.Module:
    """The network the checkpoint records, built by hand as a Lightning user would pass it."""
    record = torch.load(path, weights_only=True)["xcit_ssl"]["backbone"]
    return create_backbone(record["name"], **record["overrides"])


def test_dino_reloads_with_and_without_a_backbone(dino_run: Path) -> None:
    path = dino_run / "checkpoints" / "last.ckpt"
    images = torch.randn(2, 3, 32, 32)
    embeddings = []
    for module in (DINO.load_from_checkpoint(path, backbone=_recorded_backbone(path)), DINO.load_from_checkpoint(path)):
        assert isinstance(module.dino, DINOConfig) and isinstance(module.optim, OptimConfig)
        assert module.dino.out_dim == 64 and module.dino.momentum_teacher == 0.99  # the run's, not the defaults
        _assert_holds_the_checkpoint(module, path)
        embeddings.append(module.embed(images))
    torch.testing.assert_close(embeddings[0], embeddings[1], rtol=0, atol=0)
    # the reloaded module saves hyper-parameters that reload again
    assert DINO.load_from_checkpoint(path, collapse_patience=3).hparams["dino"]["out_dim"] == 64


def test_supervised_reloads_with_and_without_a_backbone(sup_run: Path) -> None:  # noqa: F811
    path = sup_run / "checkpoints" / "last.ckpt"
    images = torch.randn(2, 3, 32, 32)
    logits = []
    for module in (Supervised.load_from_checkpoint(path, backbone=_recorded_backbone(path)),
                   Supervised.load_from_checkpoint(path)):  # fmt: skip
        assert isinstance(module.optim, SupervisedOptimConfig) and isinstance(module.mixup, MixupConfig)
        assert module.mixup.prob == 1.0 and module.num_classes == 10  # the run's flags
        _assert_holds_the_checkpoint(module, path)
        logits.append(module.eval()(images))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_distilled_reloads_and_rebuilds_its_teacher(distill_run: Path, sup_run: Path, tmp_path: Path) -> None:  # noqa: F811
    path = distill_run / "checkpoints" / "last.ckpt"
    module = Distilled.load_from_checkpoint(path)
    _assert_holds_the_checkpoint(module, path)  # the teacher is rebuilt, never saved
    assert module.hparams["teacher_weights"] == str(sup_run / "checkpoints" / "last.ckpt")
    assert module.teacher_logits(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # the teacher's file moved: the saved path fails with the argument to pass, which then works
    moved = tmp_path / "teacher.ckpt"
    shutil.copy(sup_run / "checkpoints" / "last.ckpt", moved)
    missing = str(tmp_path / "gone.ckpt")
    with pytest.raises(UserError, match=r"teacher's weights .*gone.ckpt do not exist.*teacher_weights=PATH in Python"):
        Distilled.load_from_checkpoint(path, teacher_weights=missing)
    again = Distilled.load_from_checkpoint(path, teacher_weights=str(moved), backbone=_recorded_backbone(path))
    _assert_holds_the_checkpoint(again, path)
