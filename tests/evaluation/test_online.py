"""OnlineKNN callback on a tiny LightningModule that exposes ``embed``."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from xcit_ssl.evaluation.knn import knn_evaluate
from xcit_ssl.evaluation.online import OnlineKNN
from xcit_ssl.evaluation.protocol import build_feature_transform
from xcit_ssl.models.registry import create_backbone


class Patterns(Dataset):
    """32 px grey images: class c has a bright bar at row 4c, plus noise (labels learnable by k-NN)."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            c = i % 4
            img = rng.integers(0, 60, (32, 32), dtype=np.uint8)
            img[4 * c + 4 : 4 * c + 8, 3:25] = 230
            self.items.append((Image.fromarray(img, mode="L"), c))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.items[i]


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_backbone("xcit_nano_12_p16_224", depth=1, num_classes=0)
        self.frozen = nn.BatchNorm1d(4).eval()  # deliberately eval: the callback must keep it so
        self.embed_modes: list[bool] = []

    def embed(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, D]`` normalised CLS."""
        self.embed_modes.append(self.backbone.training or torch.is_grad_enabled())
        return F.normalize(self.backbone.forward_features(images)[:, 0], dim=-1)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.backbone(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_callback_logs_knn_and_restores_modes() -> None:
    train, val = Patterns(48, 0), Patterns(20, 1)
    kwargs = dict(every_n_epochs=2, k=5, resize_size=32, crop_size=32, batch_size=16)
    callback = OnlineKNN.from_datasets(train, val, **kwargs)
    calls = []
    evaluate = callback.evaluate
    callback.evaluate = lambda t, m: calls.append(t.current_epoch) or evaluate(t, m)  # type: ignore[method-assign]
    module = TinyModule()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=4))
    assert calls == [1]  # epochs are 0-based: after the 2nd of 3 epochs only
    # 4 classes: top-5 (every class voted for at all) would read ~100 %, so it is not logged
    assert "knn/top1" in trainer.callback_metrics and "knn/top5" not in trainer.callback_metrics
    assert not any(module.embed_modes)  # embedded in eval mode without autograd
    assert module.training and module.backbone.training and not module.frozen.training

    # the logged value equals an independent computation with the final weights
    module.eval()
    tf = build_feature_transform(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    with torch.no_grad():
        ftr = module.embed(torch.stack([tf(x) for x, _ in train.items]))
        fval = module.embed(torch.stack([tf(x) for x, _ in val.items]))
    ref = knn_evaluate(ftr, torch.tensor([y for _, y in train.items]), fval,
                       torch.tensor([y for _, y in val.items]), ks=(5,), backend="torch")  # fmt: skip
    again = callback.evaluate(trainer, module)
    assert again["knn/top1"] == pytest.approx(ref.top1[5])
    assert ref.top1[5] > 50.0  # bars are separable even with random weights: the monitor sees signal


def test_bad_every_n_epochs() -> None:
    with pytest.raises(ValueError, match="every_n_epochs"):
        OnlineKNN(every_n_epochs=0)
