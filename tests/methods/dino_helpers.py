"""Tiny DINO set-ups shared by the method tests (deterministic views, tiny backbones)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.methods.dino import DINO
from xcit_ssl.models import build_backbone


class FixedViews(Dataset):
    """Deterministic multi-crop samples: 2 global [3,32,32] + n local [3,16,16] views per index."""

    def __init__(self, n: int = 16, n_local: int = 2) -> None:
        self.n, self.n_local = n, n_local

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        views = [torch.randn(3, 32, 32, generator=g) for _ in range(2)]
        views += [torch.randn(3, 16, 16, generator=g) for _ in range(self.n_local)]
        return views, i % 3


def tiny_dino(drop_path_rate: float = 0.0, pretrained: str | None = None, **dino_kw) -> DINO:
    backbone = build_backbone("xcit_nano_12_p8_224", depth=1, embed_dim=32, num_heads=2, drop_path_rate=drop_path_rate)
    dino = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, **dino_kw)
    optim = OptimConfig(base_lr=1e-3, warmup_epochs=1, freeze_last_layer=1)
    return DINO(backbone, dino=dino, optim=optim, pretrained=pretrained)


def loader(batch_size: int = 4, n: int = 16, **kw) -> DataLoader:
    return DataLoader(FixedViews(n), batch_size=batch_size, shuffle=False, **kw)
