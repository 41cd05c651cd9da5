"""Behaviour of the Supervised LightningModule: mixup targets, EMA, optimiser, validation, checkpoints."""

from __future__ import annotations

import copy
import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from xcit_ssl.errors import UserError
from xcit_ssl.methods.sup_config import MixupConfig, SupervisedOptimConfig
from xcit_ssl.methods.supervised import Supervised
from xcit_ssl.models.checkpoints import load_backbone
from xcit_ssl.schedules import cosine_schedule

from sup_helpers import NUM_CLASSES, images_and_labels, loader, save_supervised_checkpoint, tiny_backbone, tiny_supervised, trainer


def _smoothed(labels: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.full((len(labels), NUM_CLASSES), eps / NUM_CLASSES)
    out[torch.arange(len(labels)), labels] += 1 - eps
    return out


@pytest.mark.parametrize(
    "cfg", [MixupConfig(), MixupConfig(mixup_alpha=0.0), MixupConfig(cutmix_alpha=0.0), MixupConfig(mode="elem")]
)
def test_mixup_targets_sum_to_one(cfg: MixupConfig) -> None:
    model = Supervised(tiny_backbone(), mixup=cfg, label_smoothing=0.1)
    images, labels = images_and_labels(8)
    for _ in range(5):
        mixed, targets = model.mix(images.clone(), labels)
        assert mixed.shape == images.shape and targets.shape == (8, NUM_CLASSES)
        torch.testing.assert_close(targets.sum(dim=-1), torch.ones(8))
        assert targets.min() >= 0.1 / NUM_CLASSES - 1e-7  # smoothing mass on every class


def test_mixup_mixes_pairs_with_one_lambda() -> None:
    # mixup only, per batch: image i is blended with image B-1-i, and so are its smoothed targets
    model = Supervised(tiny_backbone(), mixup=MixupConfig(cutmix_alpha=0.0), label_smoothing=0.1)
    images, labels = images_and_labels(8, seed=1)
    mixed, targets = model.mix(images.clone(), labels)
    flipped = images.flip(0)
    lam = ((mixed - flipped) / (images - flipped))[0, 0, 0, 0]
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * flipped, atol=1e-5, rtol=1e-4)
    expected = lam * _smoothed(labels, 0.1) + (1 - lam) * _smoothed(labels.flip(0), 0.1)
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-4)


def test_mixup_needs_an_even_batch_and_none_passes_labels_through() -> None:
    images, labels = images_and_labels(5)
    with pytest.raises(UserError, match="even batch size"):
        tiny_supervised().mix(images, labels)
    same_images, same_labels = tiny_supervised(mixup=False).mix(images, labels)
    assert same_images is images and same_labels is labels


def test_every_backbone_parameter_gets_a_gradient_and_the_ema_none() -> None:
    model = tiny_supervised()
    images, labels = images_and_labels(8)
    images, targets = model.mix(images, labels)
    loss, _ = model.training_loss(images, model(images), targets)
    loss.backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in model.ema_backbone.parameters():
        assert not p.requires_grad and p.grad is None


def test_ema_decay_one_keeps_the_initial_weights(tmp_path: Path) -> None:
    model = tiny_supervised(model_ema_decay=1.0)
    start = copy.deepcopy(model.ema_backbone.state_dict())
    trainer(tmp_path, max_steps=2).fit(model, loader())
    for key, value in model.ema_backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # integer counters are copied, not averaged
        assert torch.equal(value, start[key]), key
    assert not torch.equal(model.backbone.head.weight, start["head.weight"])  # the raw model did train


def test_ema_decay_zero_tracks_the_backbone_including_batchnorm_statistics(tmp_path: Path) -> None:
    model = tiny_supervised(model_ema_decay=0.0)
    trainer(tmp_path, max_steps=2).fit(model, loader())
    raw = model.backbone.state_dict()
    for key, value in model.ema_backbone.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_ema_update_formula() -> None:
    model = tiny_supervised(model_ema_decay=0.9)
    before = {k: v.clone() for k, v in model.ema_backbone.state_dict().items()}
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
        for b in model.backbone.buffers():
            if b.dtype.is_floating_point:
                b.add_(1.0)
    model.update_ema()
    raw = model.backbone.state_dict()
    for key, value in model.ema_backbone.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * raw[key])


def test_no_ema_and_embed_shapes() -> None:
    model = tiny_supervised(model_ema_decay=None)
    assert model.ema_backbone is None
    images, _ = images_and_labels(3)
    assert model.embed(images).shape == (3, 32)
    ema_model = tiny_supervised()
    with torch.no_grad():
        for p in ema_model.backbone.parameters():
            p.add_(1.0)  # raw and EMA now differ: embed must use the EMA
    ema = ema_model.ema_backbone.eval()
    expected = ema.forward_head(ema.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ema_model.embed(images), expected)
    assert ema_model.backbone.training  # embed leaves the training state alone


def test_param_groups_skip_decay_for_biases_norms_and_no_weight_decay_names() -> None:
    model = tiny_supervised()
    decay, no_decay = model.param_groups()
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["regularised"] and not no_decay["regularised"]
    assert decayed | undecayed == set(names.values()) and not decayed & undecayed
    assert {"cls_token", "head.bias", "norm.weight", "blocks.0.gamma1"} <= undecayed
    assert {"head.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} <= decayed


def test_xca_temperature_is_decayed_by_default_as_in_the_xcit_recipe() -> None:
    """XCiT's main.py (timm create_optimizer): only biases, 1-D params, cls/pos/dist tokens exempt."""
    assert SupervisedOptimConfig().decay_temperature is True
    model = tiny_supervised()
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    decay, no_decay = model.param_groups()
    undecayed = {names[id(p)] for p in no_decay["params"]}
    official = {n for n, p in model.backbone.named_parameters() if p.ndim <= 1 or n.endswith(".bias")}
    assert undecayed == official | {"cls_token"}
    assert "blocks.0.attn.temperature" in {names[id(p)] for p in decay["params"]}
    opt_out = tiny_supervised(optim=SupervisedOptimConfig(decay_temperature=False))
    names = {id(p): n for n, p in opt_out.backbone.named_parameters()}
    assert "blocks.0.attn.temperature" in {names[id(p)] for p in opt_out.param_groups()[1]["params"]}


class _LrLog(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_lr_scales_with_batch_over_512_and_follows_the_schedule(tmp_path: Path, unit: str) -> None:
    optim = SupervisedOptimConfig(base_lr=0.01, min_lr=1e-6, warmup_lr=1e-7, warmup_epochs=1, schedule_unit=unit)
    model = tiny_supervised(mixup=False, optim=optim)
    log = _LrLog()
    trainer(tmp_path, max_epochs=3, callbacks=[log]).fit(model, loader(n=8, batch_size=4))  # 2 steps per epoch
    peak = 0.01 * 4 / 512
    if unit == "step":
        expected = cosine_schedule(peak, 1e-6, 6, warmup_steps=2, warmup_start=1e-7)
    else:
        expected = cosine_schedule(peak, 1e-6, 3, warmup_steps=1, warmup_start=1e-7).repeat(2)
    assert log.lrs == pytest.approx(list(expected))
    assert max(log.lrs) == pytest.approx(peak)


def test_validation_reports_exact_top1_top5_for_raw_and_ema(tmp_path: Path) -> None:
    model = tiny_supervised(model_ema_decay=0.5)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))  # raw and EMA differ
    images, labels = images_and_labels(10, seed=3)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    metrics = trainer(tmp_path).validate(model, val, verbose=False)[0]
    for prefix, net in (("val", model.backbone), ("val_ema", model.ema_backbone)):
        with torch.no_grad():
            logits = net.eval()(images)
        top5 = logits.topk(5, dim=-1).indices
        assert metrics[f"{prefix}/top1"] == pytest.approx(100.0 * (top5[:, 0] == labels).float().mean().item())
        assert metrics[f"{prefix}/top5"] == pytest.approx(100.0 * (top5 == labels[:, None]).any(-1).float().mean().item())
        assert metrics[f"{prefix}/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_sanity_check_is_not_reported_as_epoch_0(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Lightning's sanity check validates 2 batches before any training; only the validation after
    epoch 0 (all 10 images, the trained weights) is logged and printed as "epoch 0"."""
    model = tiny_supervised(mixup=False, model_ema_decay=0.5)
    images, labels = images_and_labels(10, seed=3)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    with caplog.at_level(logging.INFO, logger="xcit_ssl.methods.supervised"):
        trainer(tmp_path, max_epochs=1, num_sanity_val_steps=2, logger=csv_logger).fit(model, loader(), val)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0 val", "epoch 0 val_ema"], lines
    with torch.no_grad():
        top1 = 100.0 * (model.backbone.eval()(images).argmax(-1) == labels).float().mean().item()
    assert f"top-1 {top1:.2f} " in lines[0]  # the trained network on every image, not the sanity batches
    with (tmp_path / "csv" / "version_0" / "metrics.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/top1")]
    assert [(r["epoch"], float(r["val/top1"])) for r in rows] == [("0", pytest.approx(top1))]


def test_checkpoint_loads_weights_only_and_names_the_variant(tmp_path: Path) -> None:
    path = save_supervised_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    spec = ckpt["xcit_ssl"]
    assert spec["method"] == "supervised" and spec["backbone"]["name"] == "xcit_nano_12_p8_224"
    assert spec["backbone"]["overrides"]["num_classes"] == NUM_CLASSES
    keys = ckpt["state_dict"]
    assert "backbone.head.weight" in keys and "ema_backbone.head.weight" in keys
    ema = load_backbone(path, checkpoint_key="ema", num_classes=NUM_CLASSES)
    torch.testing.assert_close(ema.state_dict()["head.weight"], keys["ema_backbone.head.weight"])


def test_fine_tune_from_a_dino_checkpoint_keeps_the_new_head(tmp_path: Path) -> None:
    dino_teacher = tiny_backbone(num_classes=0)
    state = {f"teacher_backbone.{k}": v for k, v in dino_teacher.state_dict().items()}
    state.update({f"student_backbone.{k}": torch.zeros_like(v) for k, v in dino_teacher.state_dict().items()})
    state["teacher_head.last_layer.weight"] = torch.zeros(64, 16)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "dino.ckpt")
    model = tiny_supervised(pretrained=str(tmp_path / "dino.ckpt"), checkpoint_key="teacher")
    for key, value in dino_teacher.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
        assert torch.equal(model.ema_backbone.state_dict()[key], value), key  # the EMA starts from it too
    assert model.backbone.head.weight.shape == (NUM_CLASSES, 32)
    assert model.hparams["pretrained"].endswith("dino.ckpt")


class _Data(L.LightningDataModule):
    num_classes = 3

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return loader()


def test_refuses_a_headless_backbone_and_a_class_mismatch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="classifier head"):
        Supervised(tiny_backbone(num_classes=0))
    with pytest.raises(UserError, match="10 classes but the data has 3"):
        trainer(tmp_path, max_steps=1).fit(tiny_supervised(), datamodule=_Data())
    with pytest.raises(UserError, match="mixup_alpha"):
        MixupConfig(mixup_alpha=-1.0)
    with pytest.raises(UserError, match="label_smoothing"):
        tiny_supervised(label_smoothing=1.0)
