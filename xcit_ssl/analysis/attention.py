"""The CLS-to-patch attention of XCiT's class-attention blocks, and DINO's thresholded masks.

XCiT's XCA blocks attend across channels, so there is no token-to-token map; the map DINO shows
for ViTs lives in the class-attention blocks, where the CLS query attends to CLS + N patches.
:func:`capture_class_attention` reads it for any class-attention block (not only the last): a
forward pre-hook on that block's attention module catches its (LayerNorm-ed) input during one
ordinary ``forward_features`` pass, and the block's own ``attention_map`` turns it into the
softmax weights. The same pass gives the last XCA block's patch tokens for the patch PCA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError


@dataclass
class AttentionCapture:
    """One forward pass, read out.

    attention: CLS-to-patch softmax weights ``[B, heads, Hp, Wp]`` (the raw weights: with the
    CLS-to-CLS share ``cls_weight`` ``[B, heads]`` they sum to 1 per head); patch_tokens: the
    last XCA block's output ``[B, N, D]``, ``N = Hp * Wp``; grid: ``(Hp, Wp)``; block: the
    absolute index of the class-attention block read.
    """

    attention: Tensor
    cls_weight: Tensor
    patch_tokens: Tensor
    grid: tuple[int, int]
    block: int


def resolve_block(backbone: nn.Module, block: int) -> int:
    """Absolute index of class-attention block ``block`` (negative counts from the end)."""
    blocks = getattr(backbone, "cls_attn_blocks", None)
    n = len(blocks) if blocks is not None else 0
    if n == 0:
        raise UserError("the backbone has no class-attention blocks, so it has no CLS-to-patch attention; "
                        "load an XCiT checkpoint with its cls_attn_blocks")  # fmt: skip
    if not -n <= block < n:
        raise UserError(f"--block {block}: the backbone has {n} class-attention blocks; use 0..{n - 1} or -{n}..-1")
    return block % n


@torch.no_grad()
def capture_class_attention(backbone: nn.Module, images: Tensor, block: int = -1) -> AttentionCapture:
    """CLS attention of class-attention block ``block`` and the patch tokens, for ``images [B, 3, H, W]``.

    Runs in whatever mode the backbone is in; callers put it in eval mode (dropout, BatchNorm).
    """
    index = resolve_block(backbone, block)
    attn_module = backbone.cls_attn_blocks[index].attn
    seen: list[Tensor] = []
    handle = attn_module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        feats = backbone.forward_features(images, return_dict=True)
    finally:
        handle.remove()
    weights = attn_module.attention_map(seen[-1]).float()  # [B, heads, 1 + N]
    b, heads = weights.shape[:2]
    hp, wp = feats.grid
    return AttentionCapture(
        attention=weights[:, :, 1:].reshape(b, heads, hp, wp),
        cls_weight=weights[:, :, 0],
        patch_tokens=feats.patch_tokens,
        grid=(hp, wp),
        block=index,
    )


def threshold_masks(attention: Tensor, threshold: float = 0.6) -> Tensor:
    """DINO's masks: per map, the smallest set of patches holding ``threshold`` of its mass.

    ``attention [..., Hp, Wp]`` (non-negative); the mass is that of the patches (the map is
    renormalised to sum 1, as DINO's ``visualize_attention`` does). Returns a bool tensor of the
    same shape. The patches are taken largest first until their share reaches ``threshold``.
    """
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: give the kept share of attention mass in (0, 1], e.g. 0.6")
    shape = attention.shape
    flat = attention.reshape(-1, shape[-2] * shape[-1]).double()
    share = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-30)
    values, order = share.sort(dim=1, descending=True)
    # exclusive running sum: the mass of the larger patches taken before this one
    before = torch.cat([torch.zeros_like(values[:, :1]), values.cumsum(dim=1)[:, :-1]], dim=1)
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep.reshape(shape)
