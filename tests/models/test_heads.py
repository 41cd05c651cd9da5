"""DINOHead: shapes, the weight-normalised last layer, its frozen gain, deepcopy and param lists."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xcit_ssl.models.heads import LAST_LAYER_PREFIX, DINOHead

SMALL = dict(in_dim=24, out_dim=40, hidden_dim=32, bottleneck_dim=16)


def test_output_shape_and_layers():
    head = DINOHead(**SMALL)
    assert head(torch.randn(5, 24)).shape == (5, 40)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 32), (32, 32), (32, 16)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2  # none after the bottleneck
    one = DINOHead(**SMALL, num_layers=1)
    assert [type(m) for m in one.mlp] == [nn.Linear]
    bn = DINOHead(**SMALL, use_bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.mlp) == 2
    assert bn(torch.randn(4, 24)).shape == (4, 40)
    with pytest.raises(ValueError, match=r"\[B, 24\]"):
        head(torch.randn(5, 23))


def test_forward_matches_formula():
    """logits = (v / ||v||_row * g) @ normalize(mlp(x)), written out by hand."""
    head = DINOHead(**SMALL, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    x = torch.randn(6, 24)
    h = x
    for m in head.mlp:
        h = m(h)
    h = h / h.norm(dim=1, keepdim=True)
    g = head.last_layer.parametrizations.weight.original0  # [K, 1]
    v = head.last_layer.parametrizations.weight.original1  # [K, bottleneck]
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)


def test_init_matches_dino():
    """MLP: N(0, 0.02^2) cut at +-2 in absolute value (so untruncated), bias 0; last layer: default.

    DINO calls trunc_normal_(std=.02) with the default a=-2, b=2 (absolute bounds, 100 sigma) and
    creates the weight-normalised last layer after its init, so that one keeps nn.Linear's
    kaiming-uniform init: v ~ U(-1/sqrt(bottleneck), 1/sqrt(bottleneck)), std 1/sqrt(3*bottleneck).
    """
    torch.manual_seed(0)
    head = DINOHead(in_dim=256, out_dim=2048, hidden_dim=512, bottleneck_dim=256)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            w = m.weight
            assert 0.0195 < w.std() < 0.0205  # untruncated: a 2-sigma cut would give 0.0176
            assert w.abs().max() > 0.06  # 3+ sigma values exist among 131k draws
            assert torch.all(m.bias == 0)
    v = head.last_layer.parametrizations.weight.original1
    bound = 1 / 256**0.5
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound  # uniform, full range
    assert abs(v.std() - bound / 3**0.5) < 0.001  # 0.036
    torch.testing.assert_close(v.norm(dim=1).mean(), torch.tensor(3**-0.5), atol=0.01, rtol=0)
    # the gain is 1, so the effective prototypes have unit norm whatever ||v|| is
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(2048))


def test_init_draws_in_dino_order():
    """Same seed, same numbers as DINO's construction order (MLP built, MLP initialised, last layer)."""
    torch.manual_seed(3)
    head = DINOHead(**SMALL)
    torch.manual_seed(3)
    linears = [nn.Linear(24, 32), nn.Linear(32, 32), nn.Linear(32, 16)]
    for m in linears:
        nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
    last = nn.Linear(16, 40, bias=False)
    got = [m.weight for m in head.mlp if isinstance(m, nn.Linear)]
    for a, b in zip(got, linears):
        assert torch.equal(a, b.weight)
    assert torch.equal(head.last_layer.parametrizations.weight.original1, last.weight)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_gain_is_one_and_frozen_only_when_norm_last_layer(norm_last_layer):
    head = DINOHead(**SMALL, norm_last_layer=norm_last_layer)
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.shape == (40, 1)
    assert torch.all(gain == 1.0)
    assert gain.requires_grad is (not norm_last_layer)
    # rows of the effective weight have unit norm at init either way
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))
    head(torch.randn(3, 24)).square().sum().backward()
    assert (gain.grad is None) is norm_last_layer
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deepcopy_keeps_parametrization_and_frozen_gain():
    student = DINOHead(**SMALL, norm_last_layer=True)
    teacher = copy.deepcopy(student)
    assert torch.nn.utils.parametrize.is_parametrized(teacher.last_layer, "weight")
    t_gain = teacher.last_layer.parametrizations.weight.original0
    assert not t_gain.requires_grad and torch.all(t_gain == 1.0)
    assert set(teacher.state_dict()) == set(student.state_dict())
    # independent storage: changing the student's direction leaves the teacher alone
    x = torch.randn(4, 24)
    before = teacher(x).detach().clone()
    torch.testing.assert_close(before, student(x).detach())
    with torch.no_grad():
        student.last_layer.parametrizations.weight.original1.mul_(-1.0)
    torch.testing.assert_close(teacher(x).detach(), before)
    t_direction = teacher.last_layer.parametrizations.weight.original1
    assert teacher.last_layer_parameters()[0] is t_direction
    assert all(
        p is not q for p, q in zip(teacher.last_layer_parameters(), student.last_layer_parameters())
    )


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_parameters_are_exactly_the_trainable_last_layer(norm_last_layer):
    head = DINOHead(**SMALL, norm_last_layer=norm_last_layer)
    got = {id(p) for p in head.last_layer_parameters()}
    by_name = {
        id(p)
        for n, p in head.named_parameters()
        if n.startswith(LAST_LAYER_PREFIX) and p.requires_grad
    }
    assert got == by_name and len(got) == (1 if norm_last_layer else 2)
    mlp_ids = {id(p) for p in head.mlp.parameters()}
    assert not got & mlp_ids
    # the answer follows the constructor flag, not requires_grad: a frozen teacher copy agrees
    teacher = copy.deepcopy(head).requires_grad_(False)
    assert len(teacher.last_layer_parameters()) == len(got)


def test_bf16_autocast_and_bf16_weights():
    head = DINOHead(**SMALL)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x)
    assert out.shape == (4, 40) and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), head(x), atol=0.05, rtol=0.05)
    bf16 = copy.deepcopy(head).to(torch.bfloat16)  # "bf16-true" precision
    out = bf16(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bottleneck_is_l2_normalised_before_last_layer():
    """Scaling the bottleneck input by a positive constant cannot change the logits."""
    head = DINOHead(**SMALL, num_layers=1)
    x = torch.randn(3, 24)
    with torch.no_grad():
        head.mlp[0].bias.zero_()  # single linear without bias: mlp(c x) = c mlp(x)
    torch.testing.assert_close(head(7.0 * x), head(x))
    z = F.normalize(head.mlp(x), dim=-1)
    assert torch.all(head(x).abs() <= z.norm(dim=-1, keepdim=True) + 1e-5)  # |<z, w_k>| <= 1
