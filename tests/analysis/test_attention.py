"""Class-attention maps against softmax(q_cls . k^T * scale) computed here from the block's own
weights, and DINO's threshold masks (enough mass, and minimal)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xcit_ssl.analysis.attention import capture_class_attention, threshold_masks
from xcit_ssl.errors import UserError
from xcit_ssl.models import build_backbone


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone("xcit_nano_12_p8_224", depth=2, embed_dim=32, num_heads=4).eval()
    with torch.no_grad():  # sharpen q/k so the maps are far from uniform (a stronger comparison)
        for blk in model.cls_attn_blocks:
            blk.attn.q.weight.mul_(25)
            blk.attn.k.weight.mul_(25)
    return model


def reference_maps(model: torch.nn.Module, x: torch.Tensor, block: int) -> torch.Tensor:
    """CLS attention of class-attention block ``block`` from the weights: [B, heads, Hp, Wp]."""
    tokens, grid = model.patch_embed(x)
    tokens = tokens + model.pos_embed(grid)
    for blk in model.blocks:
        tokens = blk(tokens, grid)
    tokens = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    for blk in model.cls_attn_blocks[:block]:
        tokens = blk(tokens)
    ca = model.cls_attn_blocks[block]
    h = F.layer_norm(tokens, (tokens.shape[-1],), ca.norm1.weight, ca.norm1.bias, ca.norm1.eps)
    heads = ca.attn.num_heads
    d = h.shape[-1] // heads
    q = (h[:, 0] @ ca.attn.q.weight.T + ca.attn.q.bias).reshape(x.shape[0], heads, d)  # [B, heads, d]
    k = (h @ ca.attn.k.weight.T + ca.attn.k.bias).reshape(x.shape[0], -1, heads, d)  # [B, 1+N, heads, d]
    logits = torch.einsum("bhd,bnhd->bhn", q, k) * d**-0.5
    weights = logits.softmax(dim=-1)
    return weights[:, :, 1:].reshape(x.shape[0], heads, *grid)


@pytest.mark.parametrize("block", [0, 1, -1])
def test_maps_equal_softmax_of_q_cls_k_for_a_non_square_image(backbone: torch.nn.Module, block: int) -> None:
    x = torch.randn(2, 3, 24, 40)  # 3 x 5 patches of 8 px
    cap = capture_class_attention(backbone, x, block=block)
    with torch.no_grad():
        ref = reference_maps(backbone, x, block % 2)
    assert cap.attention.shape == (2, 4, 3, 5) and cap.grid == (3, 5)
    assert cap.block == block % 2
    torch.testing.assert_close(cap.attention, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.attention.sum(dim=(-2, -1)) + cap.cls_weight, torch.ones(2, 4))
    assert cap.attention.max() > 5 * cap.attention.mean()  # not a flat map: the comparison means something


def test_maps_of_the_two_blocks_differ_and_the_last_matches_get_last_attention(backbone: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 32, 16)
    first, last = capture_class_attention(backbone, x, 0), capture_class_attention(backbone, x, -1)
    assert not torch.allclose(first.attention, last.attention)
    torch.testing.assert_close(last.attention, backbone.get_last_attention(x))


def test_block_out_of_range_is_a_user_error(backbone: torch.nn.Module) -> None:
    with pytest.raises(UserError, match=r"--block 2: the backbone has 2 class-attention blocks"):
        capture_class_attention(backbone, torch.randn(1, 3, 16, 16), block=2)


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
def test_masks_hold_the_threshold_and_are_minimal(threshold: float) -> None:
    torch.manual_seed(1)
    maps = (torch.randn(3, 5, 6, 7) * 2).exp()  # unnormalised, like attention without its CLS share
    masks = threshold_masks(maps, threshold)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    share = maps.double() / maps.double().sum(dim=(-2, -1), keepdim=True)
    for s, m in zip(share.reshape(-1, 42), masks.reshape(-1, 42)):
        kept = s[m]
        assert kept.sum() >= threshold - 1e-12
        assert kept.sum() - kept.min() < threshold  # drop the smallest kept patch: below the threshold
        if (~m).any():
            assert kept.min() >= s[~m].max()  # the largest patches are the ones kept


def test_bad_threshold_names_the_flag() -> None:
    with pytest.raises(UserError, match="--threshold 1.5"):
        threshold_masks(torch.rand(2, 3, 3), 1.5)
