"""AttentionSnapshots: sheets of fixed eval images from the datamodule, into PNG files and
TensorBoard, from the teacher in eval mode, leaving BatchNorm statistics and modes as they were;
folders named by the 0-based epoch, as Lightning's metrics and our checkpoints name it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from xcit_ssl.analysis.callback import AttentionSnapshots
from xcit_ssl.analysis.sheets import attention_layout, pca_layout
from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.transforms import MultiCropTransform
from xcit_ssl.models import build_backbone
from xcit_ssl.runs.checkpoints import RunCheckpoints


class RecordingTB(TensorBoardLogger):
    """A TensorBoard logger that records add_image calls instead of writing event files."""

    def __init__(self, save_dir: str) -> None:
        super().__init__(save_dir)
        self.images: list[tuple[str, tuple[int, ...], int]] = []

    @property
    def experiment(self):  # noqa: ANN201
        rec = self
        return SimpleNamespace(add_image=lambda tag, img, global_step, dataformats: rec.images.append(
            (tag, np.asarray(img).shape, global_step)), add_scalar=lambda *a, **k: None,
            add_scalars=lambda *a, **k: None, flush=lambda: None)  # fmt: skip

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, *args, **kwargs) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> ImageDataModule:
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    crops = MultiCropTransform(global_crop_size=16, local_crop_size=8, n_local_crops=0)
    return ImageDataModule(root=str(root), dataset="imagefolder", train_transform=crops, batch_size=2,
                           num_workers=0, persistent_workers=False, val_crop_size=16)  # fmt: skip


class TinyDINO(pl.LightningModule):
    """Just what the callback reads: a teacher backbone (with BatchNorm) beside a student."""

    def __init__(self) -> None:
        super().__init__()
        self.student_backbone = build_backbone("xcit_nano_12_p8_224", depth=2, embed_dim=32, num_heads=2)
        self.teacher_backbone = build_backbone("xcit_nano_12_p8_224", depth=2, embed_dim=32, num_heads=2)
        self.teacher_backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        views, _ = batch
        loss = self.student_backbone(views[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.student_backbone.parameters(), lr=0.0)


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers() if "running" in k or "num_batches" in k}


def test_draw_leaves_batchnorm_and_modes_unchanged_and_writes_sheets(datamodule: ImageDataModule,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    module = TinyDINO().train()
    module.teacher_backbone.cls_attn_blocks[0].eval()  # a submodule kept in eval on purpose stays so
    before = _bn_buffers(module.teacher_backbone)
    assert before, "the backbone should have BatchNorm (conv stem, LPI)"
    modes = {n: m.training for n, m in module.named_modules()}
    tb = RecordingTB(str(tmp_path / "tb"))
    trainer = SimpleNamespace(datamodule=datamodule, current_epoch=9, global_step=123, loggers=[tb],
                              default_root_dir=str(tmp_path / "run"), sanity_checking=False, is_global_zero=True)  # fmt: skip
    callback = AttentionSnapshots(every_n_epochs=10, n_images=4)
    callback.on_train_epoch_end(trainer, module)
    for k, v in _bn_buffers(module.teacher_backbone).items():
        assert torch.equal(v, before[k]), k
    assert {n: m.training for n, m in module.named_modules()} == modes
    folder = tmp_path / "run" / "attention" / "epoch_0009"  # the 10th epoch, index 9
    assert callback.last_dir == folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"attention_{i:02d}.png" for i in range(4)] + [f"pca_{i:02d}.png" for i in range(4)]
    with Image.open(folder / "attention_00.png") as img:
        assert img.size == attention_layout(16, 16, 2).size  # eval crop 16 px, 2 heads
    with Image.open(folder / "pca_03.png") as img:
        assert img.size == pca_layout(16, 16).size
    tags = {t: (shape, step) for t, shape, step in tb.images}
    assert set(tags) == {"attention/sheets", "attention/pca"}
    assert tags["attention/sheets"][0] == (4 * attention_layout(16, 16, 2).size[1], attention_layout(16, 16, 2).size[0], 3)
    assert tags["attention/sheets"][1] == 123
    # the same backbone run in train mode would have moved the statistics: the check above can fail
    module.teacher_backbone(torch.randn(2, 3, 16, 16))
    assert any(not torch.equal(v, before[k]) for k, v in _bn_buffers(module.teacher_backbone).items())


def test_other_epochs_and_other_ranks_draw_nothing(datamodule: ImageDataModule, tmp_path: Path) -> None:
    module = TinyDINO()
    callback = AttentionSnapshots(every_n_epochs=2, n_images=2, pca=False)
    base = dict(datamodule=datamodule, global_step=0, loggers=[], default_root_dir=str(tmp_path), sanity_checking=False)
    callback.on_train_epoch_end(SimpleNamespace(current_epoch=0, is_global_zero=True, **base), module)
    callback.on_train_epoch_end(SimpleNamespace(current_epoch=1, is_global_zero=False, **base), module)
    assert not (tmp_path / "attention").exists()
    callback.on_train_epoch_end(SimpleNamespace(current_epoch=1, is_global_zero=True, **base), module)
    assert sorted(p.name for p in (tmp_path / "attention" / "epoch_0001").iterdir()) == ["attention_00.png", "attention_01.png"]


def test_runs_inside_a_real_fit(datamodule: ImageDataModule, tmp_path: Path) -> None:
    """Drawn after the 2nd of 2 epochs: the folder carries the epoch that metrics.csv and the
    periodic checkpoint of the same epoch carry (0-based: 1), not a count of epochs done."""
    tb = RecordingTB(str(tmp_path / "tb"))
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", every_n_epochs=2, every_minutes=0)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", logger=[tb, csv],
                         callbacks=[AttentionSnapshots(every_n_epochs=2, n_images=2), checkpoints],
                         enable_checkpointing=False, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    module = TinyDINO()
    before = _bn_buffers(module.teacher_backbone)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(p.name for p in (tmp_path / "attention").iterdir()) == ["epoch_0001"]
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged_epochs = [int(r.split(",")[header.index("epoch")]) for r in rows[1:]]
    assert logged_epochs == [0, 1]  # one training step per epoch, as Lightning numbers them
    assert (tmp_path / "checkpoints" / "epoch_0001.ckpt").is_file()
    assert [t for t, _, _ in tb.images] == ["attention/sheets", "attention/pca"]
    for k, v in _bn_buffers(module.teacher_backbone).items():
        assert torch.equal(v, before[k]), k
