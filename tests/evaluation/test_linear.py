"""Linear probe: learns a separable problem, keeps the backbone frozen in eval mode, DINO's lr rule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xcit_ssl.evaluation.linear import (
    LinearProbe,
    ProbeHistory,
    _init_linear,
    sweep_linear_on_features,
    train_linear_on_features,
)


def separable(n: int, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    return centers[y] + 0.3 * torch.randn(n, dim, generator=g), y


class FrozenFeatures(nn.Module):
    """Stands in for a backbone: a BatchNorm (whose running stats must not move) and a Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bn(x))


def test_probe_learns_separable_problem_with_frozen_backbone() -> None:
    x, y = separable(256)
    xv, yv = separable(64, seed=0)
    features = FrozenFeatures(16)
    before = {k: v.clone() for k, v in features.state_dict().items()}
    probe = LinearProbe(features, 16, 4, epochs=6, base_lr=2.0, batch_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(probe, DataLoader(TensorDataset(x, y), 32, shuffle=True), DataLoader(TensorDataset(xv, yv), 50))
    summary = probe.history.summary()
    assert summary["epochs_evaluated"] == 6
    assert summary["top1"] == probe.history.top1[-1] and summary["epoch"] == 6  # the headline: the last epoch
    assert summary["best_on_val"]["top1"] == 100.0 and "diagnostic" in summary["best_on_val"]["note"]
    assert probe.history.top1[0] < 100.0 or summary["best_on_val"]["epoch"] == 1  # best is tracked, not assumed
    assert summary["top5"] is None and summary["best_on_val"]["top5"] is None  # 4 classes: no top-5
    # frozen: no parameter or BatchNorm statistic of the feature model moved, and it stayed in eval
    for k, v in features.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not features.training and probe.linear.training
    # DINO: lr = base_lr x global batch / 256, cosine to 0 per epoch, SGD momentum 0.9, no wd
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(2.0 * 32 / 256)
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0


def test_init_is_dino_linear_classifier() -> None:
    layer = _init_linear(384, 1000)
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(layer.bias) == 0


def test_fast_variant_learns_and_reports_curve() -> None:
    x, y = separable(400)
    xv, yv = separable(100, seed=0)
    seen = []
    layer, history = train_linear_on_features(x, y, xv, yv, epochs=5, base_lr=5.0, batch_size=64,
                                              on_epoch=lambda e, t1, t5: seen.append(e))  # fmt: skip
    assert isinstance(history, ProbeHistory) and seen == [1, 2, 3, 4, 5]
    assert history.summary()["top1"] == 100.0
    assert (layer(xv).argmax(1) == yv).all()
    # noise with random labels stays near chance (25 %): the reported numbers are held-out accuracy
    _, chance = train_linear_on_features(torch.randn(400, 16), torch.randint(0, 4, (400,)), torch.randn(200, 16),
                                         torch.randint(0, 4, (200,)), epochs=3, base_lr=5.0, batch_size=64)  # fmt: skip
    assert chance.summary()["top1"] < 45.0


def test_lr_sweep_chooses_on_held_out_training_images_never_the_test_set() -> None:
    """A 1e-6 base lr cannot move a 0.01-std layer in 3 epochs; 5.0 separates the classes. The sweep
    must pick 5.0 from the held-out training features, then train on all of them; scrambling the test
    labels changes the reported accuracy but not the choice."""
    x, y = separable(400)
    xv, yv = separable(100, seed=0)
    kw = {"epochs": 3, "batch_size": 64}
    layer, history, sweep = sweep_linear_on_features(x, y, xv, yv, base_lrs=[5.0, 1e-6], holdout=0.25, **kw)
    assert sweep["holdout_images"] == 100
    assert [c["base_lr"] for c in sweep["candidates"]] == [1e-6, 5.0]  # tried in increasing order
    low, high = (c["holdout_top1"] for c in sweep["candidates"])
    assert high == 100.0 and low < 60.0 and sweep["chosen_base_lr"] == 5.0
    # the final probe is the plain fast probe at the chosen lr on every training feature
    ref_layer, ref = train_linear_on_features(x, y, xv, yv, base_lr=5.0, **kw)
    assert history.top1 == ref.top1 and history.num_train == 400
    torch.testing.assert_close(layer.weight, ref_layer.weight)
    _, scrambled, sweep2 = sweep_linear_on_features(x, y, xv, (yv + 1) % 4, base_lrs=[5.0, 1e-6], holdout=0.25, **kw)
    assert sweep2 == sweep and history.top1[-1] == 100.0 and scrambled.top1[-1] == 0.0
    # a tie goes to the smaller lr
    _, _, tie = sweep_linear_on_features(x, y, xv, yv, base_lrs=[5.0, 10.0], holdout=0.25, **kw)
    assert [c["holdout_top1"] for c in tie["candidates"]] == [100.0, 100.0] and tie["chosen_base_lr"] == 5.0
    with pytest.raises(ValueError, match="holdout"):
        sweep_linear_on_features(x, y, xv, yv, base_lrs=[1.0], holdout=1.0, **kw)


def _bare_probe(x, y, xv, base_lr, epochs, batch_size, momentum, seed):
    """An independent probe from REFERENCE.md's formulas: N(0, 0.01) weight, zero bias, SGD with
    heavy-ball momentum (buf = m * buf + grad; w -= lr * buf), lr = base_lr * batch / 256 following
    the cosine 0.5 * (1 + cos(pi * epoch / epochs)) per epoch, batches in a seeded random order."""
    torch.manual_seed(seed)
    w = _init_linear(x.shape[1], 4).weight.detach().clone()  # its N(0, 0.01) draw: test_init_is_dino_linear_classifier
    b = torch.zeros(4)
    bufs = [torch.zeros_like(w), torch.zeros_like(b)]
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        lr = base_lr * batch_size / 256 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        order = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], batch_size):
            idx = order[s : s + batch_size]
            p = torch.softmax(x[idx] @ w.T + b, 1)
            p[torch.arange(len(idx)), y[idx]] -= 1  # d(mean CE)/d logits
            grads = [p.T @ x[idx] / len(idx), p.sum(0) / len(idx)]
            for param, buf, grad in zip((w, b), bufs, grads):
                buf.mul_(momentum).add_(grad)
                param.sub_(lr * buf)
    return w, (xv @ w.T + b)


def test_an_lr_sweep_trains_each_candidate_as_a_bare_run_of_its_own_would() -> None:
    """The sweep trains its candidates side by side in one pass; each must still be exactly the
    probe a separate run gives: compared with the bare loop above for three rates at once, on
    features that a high rate overshoots and a low one barely moves."""
    from xcit_ssl.evaluation.linear import _train_linears_jointly

    x, y = separable(300)
    xv, yv = separable(80, seed=1)
    lrs = (0.01, 0.5, 20.0)
    runs = _train_linears_jointly(x, y, xv, yv, lrs, epochs=4, batch_size=48, momentum=0.9, weight_decay=0.0,
                                  device="cpu", seed=3)  # fmt: skip
    for lr, (layer, history) in zip(lrs, runs):
        w, logits = _bare_probe(x, y, xv, lr, 4, 48, 0.9, 3)
        torch.testing.assert_close(layer.weight, w, atol=1e-5, rtol=1e-4)
        assert history.top1[-1] == pytest.approx(100.0 * float((logits.argmax(1) == yv).float().mean()))
    assert not torch.allclose(runs[0][0].weight, runs[2][0].weight, atol=1e-3)  # the rates did differ
