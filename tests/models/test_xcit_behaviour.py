"""Behaviour of the backbone beyond timm parity: gradients, checkpointing, attention maps, features."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import randomise_stats

from xcit_ssl.errors import UserError
from xcit_ssl.models import create_backbone


def _tiny(**overrides: int) -> torch.nn.Module:
    return create_backbone("xcit_nano_12_p16_224", depth=2, **overrides)


def test_every_parameter_receives_a_gradient() -> None:
    model = _tiny(num_classes=5).train()
    # small layer scales would still give gradients; 1.0 makes a vanishing one stand out
    model(torch.randn(2, 3, 48, 32)).logsumexp(dim=1).sum().backward()
    starved = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not starved


@pytest.mark.parametrize("momentum", [0.1, None])  # None: BN's cumulative average reads num_batches_tracked
def test_gradient_checkpointing_gives_the_same_gradients_and_batchnorm_buffers(momentum: float | None) -> None:
    plain = _tiny(num_classes=5, drop_path_rate=0.2).train()
    randomise_stats(plain)  # running stats far from this batch's, so a second update would show
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
            m.num_batches_tracked.fill_(3)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 48)
    for model in (plain, ckpt):
        torch.manual_seed(7)  # the same drop-path masks in both runs
        model(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), name
    lpi = dict(ckpt.named_buffers())["blocks.0.local_mp.bn.num_batches_tracked"]
    assert lpi.item() == 4  # one update per step, inside a checkpointed block


def test_last_attention_is_the_cls_softmax_over_patches_and_cls() -> None:
    model = _tiny(num_classes=0).eval()
    x = torch.randn(2, 3, 48, 64)
    attn = model.get_last_attention(x)
    assert attn.shape == (2, 4, 3, 4)  # [B, heads, Hp, Wp]

    # reference written from the formula: softmax(q_cls . k / sqrt(d_h)) over 1 + N tokens,
    # on the input of the last class-attention block after its norm1
    seen = {}
    last = model.cls_attn_blocks[-1]
    hook = last.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    tokens = last.norm1(seen["x"])  # [B, 1+N, D]
    b, n, d = tokens.shape
    heads, dh = 4, d // 4
    q = last.attn.q(tokens[:, :1]).reshape(b, 1, heads, dh).transpose(1, 2)
    k = last.attn.k(tokens).reshape(b, n, heads, dh).transpose(1, 2)
    full = ((q @ k.transpose(-2, -1)) / dh**0.5).softmax(-1).squeeze(2)  # [B, heads, 1+N]
    assert torch.allclose(full.sum(-1), torch.ones(b, heads))
    assert torch.allclose(attn.flatten(2), full[:, :, 1:], atol=1e-6)
    assert torch.allclose(attn.flatten(2).sum(-1) + full[:, :, 0], torch.ones(b, heads), atol=1e-6)


def test_forward_features_dict_and_blocks() -> None:
    model = _tiny(num_classes=0).eval()
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        feats = model.forward_features(x, return_dict=True, return_blocks=True)
    assert tokens.shape == (2, 1 + 2 * 4, 128)
    assert feats.grid == (2, 4)
    assert feats.cls.shape == (2, 128) and torch.equal(feats.cls, tokens[:, 0])
    assert feats.patch_tokens.shape == (2, 8, 128)
    assert len(feats.blocks) == 2 and all(blk.shape == (2, 8, 128) for blk in feats.blocks)
    assert torch.equal(feats.blocks[-1], feats.patch_tokens)
    assert not model.forward_features(x, return_dict=True).blocks  # only kept when asked


def test_input_not_a_multiple_of_the_patch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        _tiny()(torch.randn(1, 3, 40, 32))


def test_unknown_backbone_name_suggests_close_matches() -> None:
    with pytest.raises(UserError, match="did you mean xcit_small_12_p16_224"):
        create_backbone("xcit_smal_12_p16_224")
