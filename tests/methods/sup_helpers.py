"""Tiny supervised set-ups shared by the supervised and distilled method tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from xcit_ssl.methods.sup_config import MixupConfig, SupervisedOptimConfig
from xcit_ssl.methods.supervised import Supervised
from xcit_ssl.models import build_backbone

NUM_CLASSES = 10


def tiny_backbone(num_classes: int = NUM_CLASSES):
    return build_backbone("xcit_nano_12_p8_224", depth=1, embed_dim=32, num_heads=2, num_classes=num_classes)


def tiny_supervised(mixup: bool = True, **kw: Any) -> Supervised:
    kw.setdefault("optim", SupervisedOptimConfig(base_lr=1e-2, warmup_epochs=0))
    return Supervised(tiny_backbone(), mixup=MixupConfig() if mixup else None, **kw)


def images_and_labels(n: int = 8, seed: int = 0, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def loader(n: int = 8, batch_size: int = 4, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*images_and_labels(n, seed)), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, **kw: Any) -> L.Trainer:
    opts: dict[str, Any] = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
    )  # fmt: skip
    opts.update(kw)
    return L.Trainer(**opts)


def save_supervised_checkpoint(tmp_path: Path, model: Supervised | None = None) -> Path:
    """A real Lightning checkpoint of a tiny supervised model after one training step."""
    model = model or tiny_supervised(mixup=False, model_ema_decay=0.5)
    t = trainer(tmp_path, max_steps=1)
    t.fit(model, loader())
    path = tmp_path / "sup.ckpt"
    t.save_checkpoint(path)
    return path
