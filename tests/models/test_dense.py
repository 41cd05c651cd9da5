"""Dense features: ``forward_intermediates`` (timm's contract) and the 4-level pyramid."""

from __future__ import annotations

import pytest
import timm
import torch
from model_helpers import randomise_stats

from xcit_ssl.models import create_backbone
from xcit_ssl.models.dense import XCiTPyramid, dense_indices

H, W = 160, 224  # non-square, and not the training size


def _model(name: str = "xcit_nano_12_p16_224", **kw: int) -> torch.nn.Module:
    model = create_backbone(name, num_classes=0, **kw).eval()
    randomise_stats(model)
    return model


@torch.no_grad()
def _blocks_by_hand(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every XCA block's output as ``[B, D, Hp, Wp]``, run step by step from the model's parts."""
    stem = model.patch_embed.proj(x)  # [B, D, Hp, Wp]
    b, d, hp, wp = stem.shape
    tokens = stem.flatten(2).transpose(1, 2) + model.pos_embed((hp, wp))
    outs = []
    for blk in model.blocks:
        tokens = blk(tokens, (hp, wp))
        outs.append(tokens.reshape(b, hp, wp, d).permute(0, 3, 1, 2))
    return outs


def test_intermediates_equal_the_blocks_run_by_hand() -> None:
    model = _model()
    x = torch.randn(2, 3, H, W)
    expected = _blocks_by_hand(model, x)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=[3, 5, 7, 11], intermediates_only=True)
        tokens, last2 = model.forward_intermediates(x, indices=2)
        nlc = model.forward_intermediates(x, indices=[-1, 0], output_fmt="NLC", norm=True, intermediates_only=True)
        reference_tokens = model.forward_features(x)
    assert [f.shape for f in feats] == [(2, 128, H // 16, W // 16)] * 4
    for f, i in zip(feats, [3, 5, 7, 11]):
        assert (f - expected[i]).abs().max() <= 1e-6
    assert all((f - expected[i]).abs().max() <= 1e-6 for f, i in zip(last2, [10, 11]))
    assert torch.allclose(tokens, reference_tokens, atol=1e-6)  # the rest of the pass is forward_features'
    # block order, whatever order the indices come in; norm is the final LayerNorm
    for f, i in zip(nlc, [0, 11]):
        assert torch.allclose(f, model.norm(expected[i].flatten(2).transpose(1, 2)), atol=1e-5)


def test_intermediates_only_skips_class_attention_and_later_blocks() -> None:
    model = _model()
    ran = []
    for name, m in [("block11", model.blocks[11]), ("cls_attn", model.cls_attn_blocks[0])]:
        m.register_forward_hook(lambda *_a, name=name: ran.append(name))
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 64, 96), indices=[3, 5], intermediates_only=True)
        assert ran == []
        model.forward_intermediates(torch.randn(1, 3, 64, 96), indices=[3, 5], stop_early=True)
        assert ran == ["cls_attn"]


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_nano_12_p8_224"])
def test_intermediates_equal_timms(name: str) -> None:
    ours = _model(name)
    theirs = timm.create_model(name, pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        for kw in (dict(indices=[3, 5, 7, 11]), dict(indices=3, norm=True), dict(indices=[1, -2], stop_early=True)):
            ours_final, ours_feats = ours.forward_intermediates(x, **kw)
            timm_final, timm_feats = theirs.forward_intermediates(x, **kw)
            assert (ours_final - timm_final).abs().max() <= 1e-5, kw
            assert len(ours_feats) == len(timm_feats)
            for a, b in zip(ours_feats, timm_feats):
                assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, kw


def test_prune_keeps_the_intermediates() -> None:
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
        assert model.prune_intermediate_layers([1, 4]) == [1, 4]
        after = model.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    assert len(model.blocks) == 5 and len(model.cls_attn_blocks) == 0 and model.cls_token is None
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_official_dense_indices() -> None:
    assert dense_indices(12) == (3, 5, 7, 11)
    assert dense_indices(24) == (7, 11, 15, 23)


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_nano_12_p8_224"])
def test_pyramid_levels_at_strides_4_to_32(name: str) -> None:
    model = _model(name, depth=4)
    pyramid = XCiTPyramid(model, indices=[0, 1, 2, 3]).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        levels = pyramid(x)
        feats = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert [tuple(lv.shape) for lv in levels] == [(2, 128, H // s, W // s) for s in (4, 8, 16, 32)]
    # the level at the grid's own stride is the block output itself (p16: 1/16, p8: 1/8)
    same = 2 if model.patch_size == 16 else 1
    assert torch.equal(levels[same], feats[same])
    assert torch.equal(levels[3], torch.nn.functional.max_pool2d(feats[3], 32 // model.patch_size))
    pyramid(x[:1])[0].sum().backward()  # the adapters are trainable
    assert pyramid.fpn1[0].weight.grad is not None
