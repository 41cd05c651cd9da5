"""Behaviour of the Distilled module: the frozen teacher, its inputs, the loss, teachers from files, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch.nn import functional as F

from xcit_ssl.data.datasets import FashionMNIST
from xcit_ssl.errors import UserError
from xcit_ssl.methods.distilled import Distilled
from xcit_ssl.methods.sup_config import MixupConfig, SupervisedOptimConfig

from sup_helpers import NUM_CLASSES, images_and_labels, loader, save_supervised_checkpoint, tiny_backbone, trainer


@pytest.fixture(scope="module")
def sup_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_supervised_checkpoint(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def timm_teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small timm CNN trained for a few steps on real Fashion-MNIST images, saved as DeiT does."""
    torch.manual_seed(0)
    data = FashionMNIST(train=True)
    images = torch.from_numpy(data.images[:32]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    labels = torch.from_numpy(data.targets[:32])
    model = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    path = tmp_path_factory.mktemp("timm") / "test_resnet_fmnist.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _distilled(weights: Path, kind: str = "hard", **kw) -> Distilled:
    kw.setdefault("optim", SupervisedOptimConfig(base_lr=1e-2, warmup_epochs=0))
    kw.setdefault("mixup", MixupConfig())
    return Distilled(tiny_backbone(), teacher_model="checkpoint", teacher_weights=str(weights), distillation=kind, **kw)


def test_teacher_from_our_checkpoint_is_the_ema_network_frozen(sup_checkpoint: Path) -> None:
    model = _distilled(sup_checkpoint)
    ema = torch.load(sup_checkpoint, weights_only=True)["state_dict"]
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, ema[f"ema_backbone.{key}"]), key
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(name.startswith("teacher") for name, _ in model.named_parameters())  # not a submodule


def test_teacher_frozen_in_eval_mode_and_fed_the_same_mixed_batch(tmp_path: Path, sup_checkpoint: Path) -> None:
    model = _distilled(sup_checkpoint)
    before = copy.deepcopy(model.teacher.state_dict())
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    model.teacher.register_forward_hook(lambda m, i, o: seen["teacher"].append(i[0].detach().clone()))
    model.backbone.register_forward_hook(lambda m, i, o: seen["student"].append(i[0].detach().clone()))
    trainer(tmp_path, max_steps=2).fit(model, loader())
    assert len(seen["teacher"]) == 2
    for t_in, s_in in zip(seen["teacher"], seen["student"]):
        assert torch.equal(t_in, s_in)
    originals = torch.cat([x for x, _ in loader()])[:4]
    assert not torch.equal(seen["student"][0], originals)  # the batch was mixed
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included: eval mode
    assert not model.teacher.training
    assert "teacher.head.weight" not in model.state_dict()  # checkpoints stay the student's size


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_training_loss_is_the_deit_formula(sup_checkpoint: Path, kind: str) -> None:
    model = _distilled(sup_checkpoint, kind, alpha=0.5, tau=2.0, label_smoothing=0.1)
    images, labels = images_and_labels(8)
    mixed, targets = model.mix(images, labels)
    logits = model(mixed)
    loss, parts = model.training_loss(mixed, logits, targets)
    with torch.no_grad():
        teacher = model.teacher(mixed)
    base = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    if kind == "hard":
        distill = F.cross_entropy(logits, teacher.argmax(dim=-1))
    else:
        p_t = F.softmax(teacher / 2.0, dim=-1)
        distill = (p_t * (p_t.log() - F.log_softmax(logits / 2.0, dim=-1))).sum(-1).mean() * 4.0
    torch.testing.assert_close(loss, 0.5 * base + 0.5 * distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["train/distill_loss"], distill, rtol=1e-5, atol=1e-6)


def test_timm_cnn_teacher_from_a_weight_file(timm_teacher_file: Path) -> None:
    model = Distilled(tiny_backbone(), teacher_model="test_resnet", teacher_weights=str(timm_teacher_file))
    saved = torch.load(timm_teacher_file, weights_only=True)["model"]
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key
    images, labels = images_and_labels(4)
    loss, parts = model.training_loss(images, model(images), labels)
    assert torch.isfinite(loss) and set(parts) == {"train/base_loss", "train/distill_loss"}
    model.to(torch.float64)  # the teacher follows the module's dtype/device
    assert next(model.teacher.parameters()).dtype == torch.float64


class _Data(L.LightningDataModule):
    num_classes = 3

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return loader()


def test_refusals(tmp_path: Path, sup_checkpoint: Path, timm_teacher_file: Path) -> None:
    with pytest.raises(UserError, match="predicts 10 classes but the student head has 5"):
        Distilled(tiny_backbone(num_classes=5), teacher_model="checkpoint", teacher_weights=str(sup_checkpoint))
    with pytest.raises(UserError, match="predicts 10 classes but the data has 3"):
        trainer(tmp_path, max_steps=1).fit(_distilled(sup_checkpoint), datamodule=_Data())
    with pytest.raises(UserError, match="unknown teacher model 'regnety_16'.*regnety_160"):
        Distilled(tiny_backbone(), teacher_model="regnety_16", teacher_weights=str(timm_teacher_file))
    with pytest.raises(UserError, match="has no weights. Pass the teacher's weight file with --model.teacher_weights"):
        Distilled(tiny_backbone(), teacher_model="regnety_160")
    with pytest.raises(UserError, match="do not exist .*--model.teacher_weights PATH"):
        Distilled(tiny_backbone(), teacher_model="checkpoint", teacher_weights=str(tmp_path / "missing.ckpt"))
    with pytest.raises(UserError, match="does not fit timm's test_efficientnet"):
        Distilled(tiny_backbone(), teacher_model="test_efficientnet", teacher_weights=str(timm_teacher_file))
    headless = tiny_backbone(num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "dino_backbone.pth")
    with pytest.raises(UserError, match="no classifier head"):
        Distilled(tiny_backbone(), teacher_model="checkpoint", teacher_weights=str(tmp_path / "dino_backbone.pth"))
    with pytest.raises(UserError, match="alpha"):
        _distilled(sup_checkpoint, alpha=2.0)


def test_checkpoint_records_the_method_and_teacher(tmp_path: Path, sup_checkpoint: Path) -> None:
    model = _distilled(sup_checkpoint, mixup=None)
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "distilled.ckpt")
    ckpt = torch.load(tmp_path / "distilled.ckpt", weights_only=True)
    assert ckpt["xcit_ssl"]["method"] == "distilled"
    assert ckpt["hyper_parameters"]["teacher_model"] == "checkpoint"
    assert ckpt["hyper_parameters"]["distillation"] == "hard" and ckpt["hyper_parameters"]["alpha"] == 0.5
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
