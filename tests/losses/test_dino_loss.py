"""DINOLoss and diagnostics against loop-based references written from the formulas in the test."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xcit_ssl.losses.dino import DINOLoss, collapse_kind, dino_diagnostics


def reference_loss(student, teacher, center, teacher_temp, student_temp, n_global):
    """Explicit loops over (teacher view i, student view v != i) and over samples, in float64."""
    student, teacher, center = student.double(), teacher.double(), center.double().flatten()
    batch = teacher.shape[0] // n_global
    n_views = student.shape[0] // batch
    total, pairs = 0.0, 0
    for i in range(n_global):
        for v in range(n_views):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                t = (teacher[i * batch + b] - center) / teacher_temp
                p_t = torch.exp(t - t.max()) / torch.exp(t - t.max()).sum()
                s = student[v * batch + b] / student_temp
                log_q = s - (s.max() + torch.log(torch.exp(s - s.max()).sum()))
                pair += float(-(p_t * log_q).sum())
            total += pair / batch
            pairs += 1
    assert pairs == n_global * n_views - n_global
    return total / pairs


@pytest.mark.parametrize(
    "n_views, n_global, batch, k",
    [(4, 2, 3, 7), (10, 2, 2, 16), (2, 2, 5, 5), (3, 1, 4, 9), (5, 3, 2, 11)],
)
def test_loss_matches_loop_reference(n_views, n_global, batch, k):
    loss_fn = DINOLoss(k, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, k))
    student = torch.randn(n_views * batch, k) * 2
    teacher = torch.randn(n_global * batch, k) * 2
    got = loss_fn(student, teacher, teacher_temp=0.05, n_global=n_global)
    want = reference_loss(student, teacher, loss_fn.center, 0.05, 0.1, n_global)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gradient_flows_to_student_only_and_center_untouched():
    loss_fn = DINOLoss(8)
    student = torch.randn(6 * 2, 8, requires_grad=True)
    teacher = torch.randn(2 * 2, 8, requires_grad=True)
    loss_fn(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # the teacher target is detached
    assert torch.all(loss_fn.center == 0)  # forward does not update the center


def test_center_update_formula_and_state_dict():
    loss_fn = DINOLoss(5, center_momentum=0.9)
    assert "center" in loss_fn.state_dict() and loss_fn.center.shape == (1, 5)
    t1, t2 = torch.randn(6, 5), torch.randn(4, 5)
    c = torch.zeros(1, 5)
    for t in (t1, t2):
        loss_fn.update_center(t)
        c = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, c)
    loss_fn.update_center(t1.bfloat16())  # half-precision teacher output, float32 center
    assert loss_fn.center.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[G\*B, 5\]"):
        loss_fn.update_center(torch.randn(4, 6))


def test_accumulated_micro_batches_update_the_center_once_as_one_big_batch():
    """k micro-batches accumulated then flushed = one update from their concatenation."""
    g = torch.Generator().manual_seed(2)
    micro = [torch.randn(4, 7, generator=g) + i for i in range(3)]
    student = torch.randn(8, 7, generator=g)
    acc, big = DINOLoss(7, center_momentum=0.9), DINOLoss(7, center_momentum=0.9)
    start = torch.randn(1, 7, generator=g)
    acc.center.copy_(start)
    big.center.copy_(start)
    losses = []
    for t in micro:
        losses.append(acc(student, t, 0.04))
        acc.accumulate_center(t)
        torch.testing.assert_close(acc.center, start, rtol=0, atol=0)  # moves only at the flush
    acc.flush_center()
    for t, loss in zip(micro, losses):  # every micro-batch's loss used the pre-step center
        torch.testing.assert_close(loss, big(student, t, 0.04), rtol=0, atol=0)
    big.update_center(torch.cat(micro))
    torch.testing.assert_close(acc.center, big.center, rtol=1e-6, atol=1e-7)
    # 0.9 once, not 0.9**3: today's per-micro-batch update would land elsewhere
    per_micro = start.clone()
    for t in micro:
        per_micro = 0.9 * per_micro + 0.1 * t.mean(0, keepdim=True)
    assert not torch.allclose(acc.center, per_micro, atol=1e-3)
    assert acc.pending_count == 0 and torch.all(acc.pending_sum == 0)
    acc.flush_center()  # nothing pending: the center stays
    torch.testing.assert_close(acc.center, big.center, rtol=1e-6, atol=1e-7)


def test_pending_sums_survive_a_state_dict_round_trip_and_old_checkpoints_load():
    g = torch.Generator().manual_seed(3)
    t1, t2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    a = DINOLoss(5)
    a.accumulate_center(t1)  # a checkpoint written mid-window
    b = DINOLoss(5)
    b.load_state_dict(a.state_dict())
    for loss_fn in (a, b):
        loss_fn.accumulate_center(t2)
        loss_fn.flush_center()
    torch.testing.assert_close(a.center, b.center, rtol=0, atol=0)
    torch.testing.assert_close(a.center, 0.1 * torch.cat([t1, t2]).mean(0, keepdim=True))
    old = {"center": torch.randn(1, 5, generator=g)}  # a checkpoint from before pending sums
    c = DINOLoss(5)
    c.load_state_dict(old)  # strict
    torch.testing.assert_close(c.center, old["center"])
    assert c.pending_count == 0 and torch.all(c.pending_sum == 0)
    with pytest.raises(RuntimeError, match="center"):
        c.load_state_dict({"pending_sum": torch.zeros(1, 5), "pending_count": torch.zeros(())})


def test_centering_changes_the_target():
    """Subtracting the center c from the teacher logits is what the loss uses (not adding)."""
    loss_fn = DINOLoss(6)
    student, teacher = torch.randn(6, 6), torch.randn(4, 6)
    c = torch.randn(1, 6)
    loss_fn.center.copy_(c)
    centred = loss_fn(student, teacher, 0.07)
    loss_fn.center.zero_()
    torch.testing.assert_close(centred, loss_fn(student, teacher - c, 0.07))


@pytest.mark.parametrize(
    "student_shape, teacher_shape, n_global, fragment",
    [
        ((8, 5), (4, 6), 2, "K=5 and teacher K=6"),
        ((8, 6), (4, 6), 2, "built for K=5"),
        ((7, 5), (4, 5), 2, "multiple of the per-view batch 2"),
        ((5, 5), (5, 5), 2, "multiple of n_global=2"),
        ((2, 5), (4, 5), 2, "1 views but the teacher 2"),
        ((3, 5), (3, 5), 1, "single view"),
        ((8, 5, 1), (4, 5), 2, "2-D"),
    ],
)
def test_shape_errors_are_loud(student_shape, teacher_shape, n_global, fragment):
    with pytest.raises(ValueError, match=fragment):
        DINOLoss(5)(torch.randn(student_shape), torch.randn(teacher_shape), 0.04, n_global)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_stable(dtype):
    """Large half-precision logits: exp/sum would overflow in fp16 at tau_t = 0.04."""
    loss_fn = DINOLoss(32)
    student = (torch.randn(8, 32) * 30).to(dtype)
    teacher = (torch.randn(4, 32) * 30).to(dtype)
    got = loss_fn(student, teacher, 0.04)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    want = reference_loss(student.float(), teacher.float(), loss_fn.center, 0.04, 0.1, 2)
    assert got.item() == pytest.approx(want, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(loss_fn(student.float(), teacher.float(), 0.04))


def test_diagnostics_uniform_output():
    k = 64
    zeros_s, zeros_t = torch.zeros(6 * 3, k), torch.zeros(2 * 3, k)
    loss_fn = DINOLoss(k)
    d = dino_diagnostics(zeros_s, zeros_t, loss_fn.center, 0.04, 0.1)
    assert loss_fn(zeros_s, zeros_t, 0.04).item() == pytest.approx(math.log(k), rel=1e-6)
    assert d["ln_k"].item() == pytest.approx(math.log(k))
    assert d["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert d["student_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert d["cross_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert abs(d["kl_teacher_student"].item()) < 1e-5
    assert d["center_norm"].item() == 0.0
    assert collapse_kind(d) == "uniform"


def test_diagnostics_one_hot_teacher():
    k, batch = 50, 4
    teacher = torch.zeros(2 * batch, k)
    teacher[torch.arange(2 * batch), torch.arange(2 * batch) % k] = 10.0  # gap 250 at tau 0.04
    d = dino_diagnostics(torch.randn(4 * batch, k), teacher, torch.zeros(1, k), 0.04, 0.1)
    assert 0.0 <= d["teacher_entropy"].item() < 1e-6
    assert d["kl_teacher_student"].item() > 0.5  # a random student is far from the teacher
    assert collapse_kind(d) == "one-hot"


def test_diagnostics_decompose_the_loss():
    """cross_entropy == loss == teacher_entropy + KL, with KL from a loop-based reference."""
    k, batch, n_views = 12, 3, 5
    student, teacher = torch.randn(n_views * batch, k), torch.randn(2 * batch, k)
    center = torch.randn(1, k) * 0.1
    loss_fn = DINOLoss(k, student_temp=0.2)
    loss_fn.center.copy_(center)
    d = dino_diagnostics(student, teacher, center, 0.06, 0.2)
    loss = loss_fn(student, teacher, 0.06).item()
    assert d["cross_entropy"].item() == pytest.approx(loss, rel=1e-6)
    kl, pairs = 0.0, 0
    for i in range(2):
        for v in range(n_views):
            if v != i:
                t = teacher[i * batch:(i + 1) * batch].double()
                p = torch.softmax((t - center.double()) / 0.06, -1)
                q = torch.softmax(student[v * batch:(v + 1) * batch].double() / 0.2, -1)
                kl += float((p * (p.log() - q.log())).sum(-1).mean())
                pairs += 1
    assert d["kl_teacher_student"].item() == pytest.approx(kl / pairs, rel=1e-4, abs=1e-5)
    assert d["center_norm"].item() == pytest.approx(center.norm().item())
    assert collapse_kind(d) is None
    assert all(not t.requires_grad for t in d.values())


def test_collapse_rule_is_the_papers_signatures():
    """REFERENCE.md section 2: loss stuck at ln(K) (11.09 for K=65536) = uniform; teacher entropy -> 0 = one-hot."""
    ln_k = math.log(65536)
    assert ln_k == pytest.approx(11.09, abs=5e-3)

    def kind(cross_entropy: float, teacher_entropy: float) -> str | None:
        d = {"ln_k": torch.tensor(ln_k), "cross_entropy": torch.tensor(cross_entropy),
             "teacher_entropy": torch.tensor(teacher_entropy)}  # fmt: skip
        return collapse_kind(d)

    assert kind(11.09, 11.0) == "uniform"  # within 0.1 % of ln K (0.011 nats)
    assert kind(11.07, 11.0) is None  # 0.02 nats below ln K: still learning
    assert kind(11.11, 11.0) is None  # and above it
    assert kind(3.0, 0.01) == "one-hot"  # teacher entropy below 0.1 % of ln K
    assert kind(3.0, 0.02) is None
    assert kind(3.0, 1.0) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, chunks: list, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        loss_fn = DINOLoss(chunks[0][0].shape[1], center_momentum=0.8)
        calls = []
        all_reduce = dist.all_reduce

        def counted(*args, **kw):
            calls.append(1)
            return all_reduce(*args, **kw)

        dist.all_reduce = counted
        for step in chunks:  # two steps: the EMA compounds identically on every rank
            local = step[rank]
            half = local.shape[0] // 2
            # gradient accumulation: two micro-batches per step, one collective per step
            loss_fn.accumulate_center(local[:half])
            loss_fn.accumulate_center(local[half:])
            loss_fn.flush_center()
        dist.all_reduce = all_reduce
        assert len(calls) == len(chunks), calls
        torch.save(loss_fn.center, os.path.join(out_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_center_all_reduces_once_per_step_across_two_gloo_processes(tmp_path):
    k = 9
    g = torch.Generator().manual_seed(1)
    # uneven per-rank batches (6 and 10 rows) to check the global count, not world_size * local
    chunks = [
        [torch.randn(6, k, generator=g), torch.randn(10, k, generator=g) + 1.0] for _ in range(2)
    ]
    mp.spawn(_ddp_worker, args=(2, _free_port(), chunks, str(tmp_path)), nprocs=2, join=True)
    c0 = torch.load(tmp_path / "center0.pt")
    c1 = torch.load(tmp_path / "center1.pt")
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)

    single = DINOLoss(k, center_momentum=0.8)
    for step in chunks:
        single.update_center(torch.cat(step))
    torch.testing.assert_close(c0, single.center)
    # and differs from a rank's local-only center (what a missing all-reduce would give)
    local_only = DINOLoss(k, center_momentum=0.8)
    for step in chunks:
        local_only.update_center(step[0])
    assert not torch.allclose(c0, local_only.center)
