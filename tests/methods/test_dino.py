"""Behaviour of the DINO LightningModule: gradients, EMA, frozen last layer, clipping, resume, NaN."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from xcit_ssl.errors import UserError
from xcit_ssl.losses.dino import collapse_kind, dino_diagnostics
from xcit_ssl.methods.ema import update_ema
from xcit_ssl.methods.optim import clip_gradients_per_parameter

from dino_helpers import loader, tiny_dino


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    opts = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    opts.update(kw)
    return L.Trainer(**opts)


def test_student_gets_gradients_teacher_none() -> None:
    model = tiny_dino()
    views, _ = next(iter(loader()))
    t_out = model.teacher_forward(views[:2])
    s_out = model.student_forward(views)
    loss = model.loss_fn(s_out, t_out, 0.04)
    loss.backward()
    for name, p in list(model.student_backbone.named_parameters()) + list(model.student_head.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in list(model.teacher_backbone.parameters()) + list(model.teacher_head.parameters()):
        assert not p.requires_grad and p.grad is None


def test_student_groups_views_by_resolution() -> None:
    model = tiny_dino()
    calls: list[tuple[int, ...]] = []
    model.student_backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    views, _ = next(iter(loader(batch_size=4)))
    out = model.student_forward(views)
    assert calls == [(8, 3, 32, 32), (8, 3, 16, 16)]  # one call per resolution group
    assert out.shape == (16, 64)


def test_ema_momentum_one_changes_nothing_and_zero_copies() -> None:
    a, b = tiny_dino().student_backbone, tiny_dino().student_backbone
    before = copy.deepcopy(a.state_dict())
    update_ema(a, b, momentum=1.0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])
    update_ema(a, b, momentum=0.0)
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), k


def test_ema_formula_and_buffer_policy() -> None:
    a, b = tiny_dino().student_backbone, tiny_dino().student_backbone
    for buf in b.buffers():
        if buf.dtype.is_floating_point:
            buf.add_(1.0)
    pa, pb = [p.clone() for p in a.parameters()], [p.clone() for p in b.parameters()]
    bufs = [x.clone() for x in a.buffers()]
    update_ema(a, b, momentum=0.9, average_buffers=False)
    for p, x, y in zip(a.parameters(), pa, pb):
        torch.testing.assert_close(p, 0.9 * x + 0.1 * y)
    for buf, old in zip(a.buffers(), bufs):  # own statistics kept
        assert torch.equal(buf, old)
    update_ema(a, b, momentum=0.5, average_buffers=True)
    for buf, old, src in zip(a.buffers(), bufs, b.buffers()):
        if buf.dtype.is_floating_point:
            torch.testing.assert_close(buf, 0.5 * old + 0.5 * src)


def test_per_parameter_clipping() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    p1.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    p2.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    norms = clip_gradients_per_parameter([p1, p2], max_norm=1.0)
    assert norms == pytest.approx([5.0, 0.5])
    torch.testing.assert_close(p1.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(p2.grad, torch.tensor([0.3, 0.4]))


def test_last_layer_frozen_during_first_epoch_only(tmp_path: Path) -> None:
    model = tiny_dino()
    last = model.student_head.last_layer_parameters()
    start = [p.detach().clone() for p in last]
    other = next(model.student_backbone.parameters()).detach().clone()
    _trainer(tmp_path, max_epochs=1).fit(model, loader())
    for p, s in zip(last, start):
        assert torch.equal(p, s)
    assert not torch.equal(next(model.student_backbone.parameters()), other)
    _trainer(tmp_path, max_epochs=2).fit(model, loader())  # epoch 1 from a fresh trainer: not frozen
    assert any(not torch.equal(p, s) for p, s in zip(last, start))


def test_teacher_follows_student_by_ema(tmp_path: Path) -> None:
    model = tiny_dino()
    _trainer(tmp_path, max_steps=2, max_epochs=1).fit(model, loader())
    # after training the teacher differs from its init and from the student, but is close to both
    s = torch.cat([p.flatten() for p in model.student_backbone.parameters()])
    t = torch.cat([p.flatten() for p in model.teacher_backbone.parameters()])
    assert not torch.equal(s, t)
    assert torch.isfinite(model.loss_fn.center).all() and model.loss_fn.center.abs().sum() > 0


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    L.seed_everything(0)
    full = tiny_dino()
    _trainer(tmp_path / "a", max_epochs=2).fit(full, loader())

    class Interrupt(L.Callback):  # a 2-epoch run killed after its first epoch
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = True

    L.seed_everything(0)
    first = tiny_dino()
    t1 = _trainer(tmp_path / "b", max_epochs=2, callbacks=[Interrupt()])
    t1.fit(first, loader())
    assert t1.current_epoch == 1 and t1.global_step == 4
    ckpt = tmp_path / "b" / "mid.ckpt"
    t1.save_checkpoint(ckpt)
    L.seed_everything(123)  # a resumed run must not depend on the fresh init
    resumed = tiny_dino()
    _trainer(tmp_path / "b", max_epochs=2).fit(resumed, loader(), ckpt_path=str(ckpt))

    for (k, a), b in zip(full.teacher_backbone.state_dict().items(), resumed.teacher_backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(full.loss_fn.center, resumed.loss_fn.center, rtol=1e-5, atol=1e-6)


def _assert_teacher_deterministic(model) -> None:
    model.train()
    views, _ = next(iter(loader(batch_size=4)))
    rng = torch.get_rng_state()
    first, second = model.teacher_forward(views[:2]), model.teacher_forward(views[:2])
    assert torch.equal(first, second)  # BatchNorm uses batch statistics: deterministic too
    assert torch.equal(rng, torch.get_rng_state())  # and it draws no random numbers
    assert not torch.equal(model.student_forward(views), model.student_forward(views))  # student: drop-path


def test_teacher_has_no_stochastic_depth_after_init_pretrained_and_resume(tmp_path: Path) -> None:
    """DINO passes drop_path_rate to the student only: teacher targets are deterministic in train mode."""
    model = tiny_dino(drop_path_rate=0.15)
    _assert_teacher_deterministic(model)
    # resume compatibility: same keys as before (the student's, which keeps its DropPath modules)
    assert list(model.teacher_backbone.state_dict()) == list(model.student_backbone.state_dict())
    assert any(type(m).__name__ == "DropPath" for m in model.student_backbone.modules())
    assert not any(type(m).__name__ == "DropPath" for m in model.teacher_backbone.modules())

    weights = tmp_path / "student.pth"
    torch.save(model.student_backbone.state_dict(), weights)
    from_file = tiny_dino(drop_path_rate=0.15, pretrained=str(weights))
    torch.testing.assert_close(
        dict(from_file.teacher_backbone.state_dict()), dict(model.student_backbone.state_dict()), rtol=0, atol=0
    )
    _assert_teacher_deterministic(from_file)

    t = _trainer(tmp_path, max_steps=1)
    t.fit(model, loader())
    t.save_checkpoint(tmp_path / "a.ckpt")
    resumed = tiny_dino(drop_path_rate=0.15)
    _trainer(tmp_path, max_steps=2).fit(resumed, loader(), ckpt_path=str(tmp_path / "a.ckpt"))
    _assert_teacher_deterministic(resumed)


class _Metrics(L.Callback):
    """Logged values after every training batch (micro-batch under accumulation)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_collapse_diagnostics_use_the_center_of_the_loss(tmp_path: Path, accumulate: int) -> None:
    """teacher entropy + KL(teacher || student) is the cross-entropy, i.e. the step's loss."""
    model = tiny_dino(center_momentum=0.5)  # a fast-moving center makes a stale one visible
    metrics = _Metrics()
    _trainer(tmp_path, max_steps=3, accumulate_grad_batches=accumulate, callbacks=[metrics]).fit(model, loader())
    assert len(metrics.rows) == 3 * accumulate
    for row in metrics.rows:
        total = row["collapse/teacher_entropy"] + row["collapse/kl_teacher_student"]
        assert total == pytest.approx(row["train/loss"], rel=1e-6, abs=1e-6)


def test_collapse_warning_follows_the_loss_modules_rule_after_patience(caplog: pytest.LogCaptureFixture) -> None:
    """DINO warns once a signature of ``collapse_kind`` has persisted for ``collapse_patience`` checks."""
    model = tiny_dino()
    model.collapse_patience = 2
    uniform_s, uniform_t = torch.zeros(4 * 3, 64), torch.zeros(2 * 3, 64)  # every output uniform
    one_hot_t = torch.zeros(2 * 3, 64)
    one_hot_t[:, 0] = 10.0
    student = torch.randn(4 * 3, 64)
    stats = dino_diagnostics(uniform_s, uniform_t, model.loss_fn.center, 0.04, model.dino.student_temp)
    assert collapse_kind(stats) == "uniform"
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.methods.dino"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        model._monitor_collapse(uniform_s, uniform_t, 0.04, batch_size=3)
        assert "collapse" not in caplog.text
        model._monitor_collapse(student, one_hot_t, 0.04, batch_size=3)  # another signature resets the count
        model._monitor_collapse(uniform_s, uniform_t, 0.04, batch_size=3)
        assert "collapse" not in caplog.text
        model._monitor_collapse(uniform_s, uniform_t, 0.04, batch_size=3)
        assert "possible DINO collapse" in caplog.text and "uniform output" in caplog.text
        caplog.clear()
        for _ in range(2):
            model._monitor_collapse(student, one_hot_t, 0.04, batch_size=3)
        assert "one-hot output" in caplog.text


def test_nan_loss_stops_with_message_and_saves_last_good(tmp_path: Path) -> None:
    model = tiny_dino()
    good = {k: v.detach().clone() for k, v in model.student_backbone.named_parameters()}
    original = model.student_forward

    def poisoned(views):
        return original(views) * float("nan")

    model.student_forward = poisoned  # type: ignore[method-assign]
    with pytest.raises(UserError, match="non-finite DINO loss"):
        _trainer(tmp_path, max_epochs=1).fit(model, loader())
    saved = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", weights_only=False)
    for k, v in good.items():
        assert torch.equal(saved["state_dict"][f"student_backbone.{k}"], v)
    assert saved["xcit_ssl"]["backbone"]["name"] == "xcit_nano_12_p8_224"
