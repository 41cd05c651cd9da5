"""The XCiT backbone (Cross-Covariance Image Transformer, arXiv 2106.09681).

Data flow: image -> conv patch embedding -> + Fourier positional encoding -> XCA blocks
-> late CLS token -> 2 class-attention blocks -> LayerNorm -> CLS -> head.

State-dict keys are timm's (``timm/models/xcit.py``), so weights move both ways without
conversion. The implementation is our own; see ``REFERENCE.md`` section 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .grad_checkpoint import checkpoint_module
from .xcit_layers import LAYER_NORM_EPS, ClassAttentionBlock, ConvPatchEmbed, FourierPositionalEncoding, XCABlock


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """(absolute block indices, the largest) for ``indices`` as timm reads it: None: all blocks;
    n: the last n; a sequence: those indices, negative ones counted from the end."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"cannot take the last {indices} of {num_blocks} blocks; ask for 1 to {num_blocks}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < num_blocks]
        if bad or not take:
            raise ValueError(f"block indices {list(indices)} are not all within 0..{num_blocks - 1}")
    return take, max(take)


@dataclass
class XCiTFeatures:
    """Everything a pipeline reads from one forward pass.

    cls: normalised CLS token ``[B, D]``; patch_tokens: output of the last XCA block ``[B, N, D]``;
    grid: ``(Hp, Wp)`` with ``N = Hp * Wp``; blocks: per-XCA-block outputs ``[B, N, D]`` when asked.
    """

    cls: Tensor
    patch_tokens: Tensor
    grid: tuple[int, int]
    blocks: list[Tensor] = field(default_factory=list)


class XCiT(nn.Module):
    """The XCiT family; constructor arguments and state-dict keys follow timm's ``Xcit``.

    Input ``[B, in_chans, H, W]`` with H and W multiples of the patch size (any resolution).
    ``forward`` returns logits ``[B, num_classes]`` (or the CLS feature ``[B, D]`` with
    ``num_classes=0``); ``forward_intermediates`` gives XCA-block outputs ``[B, D, Hp, Wp]`` for
    dense tasks (see :mod:`.dense` for the 4-level pyramid).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        cls_attn_layers: int = 2,
        use_pos_embed: bool = True,
        eta: float = 1.0,
        tokens_norm: bool = False,
    ) -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"XCiT supports patch_size 8 or 16, got {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.arch_args: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, eta=eta, tokens_norm=tokens_norm,
        )  # fmt: skip
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = FourierPositionalEncoding(embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # XCiT uses the same drop-path rate in every XCA block (not a linear ramp) and none in CA blocks
        self.blocks = nn.ModuleList(
            XCABlock(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, drop_path_rate, eta)
            for _ in range(depth)
        )
        self.cls_attn_blocks = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, eta, tokens_norm
            )
            for _ in range(cls_attn_layers)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Linear: trunc-normal std 0.02, bias 0; LayerNorm 1/0; CLS trunc-normal 0.02; convs/BN default."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- timm backbone contract -------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} | {
            f"blocks.{i}.attn.temperature" for i in range(len(self.blocks))
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh ``Linear(D, num_classes)`` (``Identity`` when 0)."""
        self.num_classes = num_classes
        device = self.cls_token.device
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=device)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    # -- forward ------------------------------------------------------------------------------

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                "resize or crop the images to a multiple of it"
            )
        x, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(grid)
        return self.pos_drop(x), grid

    def _run_xca_blocks(
        self, x: Tensor, grid: tuple[int, int], keep: bool | Sequence[int], stop: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Tokens ``[B, N, D]`` after the XCA blocks (up to index ``stop``), and the outputs of the
        blocks in ``keep`` (all of them when True), in block order."""
        outputs: list[Tensor] = []
        for i, blk in enumerate(self.blocks[: None if stop is None else stop + 1]):
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_module(blk, x, grid)
            else:
                x = blk(x, grid)
            if keep is True or (keep is not False and i in keep):
                outputs.append(x)
        return x, outputs

    def _class_attention(self, x: Tensor) -> Tensor:
        if self.cls_token is None:  # pruned by prune_intermediate_layers: no class attention left
            return self.norm(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint_module(blk, x)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x: Tensor, return_dict: bool = False, return_blocks: bool = False) -> Any:
        """Normalised tokens ``[B, 1+N, D]`` (timm's contract), or an :class:`XCiTFeatures`.

        With ``return_dict=True`` the result carries the normalised CLS ``[B, D]``, the last XCA
        block's patch tokens ``[B, N, D]``, the grid, and (``return_blocks=True``) every XCA
        block's output.
        """
        tokens, grid = self._embed(x)
        patch_tokens, blocks = self._run_xca_blocks(tokens, grid, keep=return_blocks)
        out = self._class_attention(patch_tokens)
        if not return_dict:
            return out
        return XCiTFeatures(cls=out[:, 0], patch_tokens=patch_tokens, grid=grid, blocks=blocks)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- dense features (timm's forward_intermediates contract) -----------------------------------

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Outputs of chosen XCA blocks (dense features), with timm's arguments and semantics.

        Args:
            x: images ``[B, C, H, W]``, H and W multiples of the patch size.
            indices: None: every XCA block; n: the last n; a sequence: those blocks (negative
                counts from the end). Outputs come in block order.
            norm: apply the final LayerNorm to each intermediate.
            stop_early: run no XCA block after the last one asked for (as in timm, the final
                tokens then come from the shortened stack).
            output_fmt: ``NCHW``: ``[B, D, Hp, Wp]`` each; ``NLC``: ``[B, N, D]``.
            intermediates_only: return the list alone; the class-attention blocks and the XCA
                blocks after the last index are skipped (use this for detection/segmentation:
                post-class-attention patch tokens are not clean features).
        Returns:
            the list, or (normalised tokens ``[B, 1+N, D]`` as ``forward_features`` gives, list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = take_indices(len(self.blocks), indices)
        tokens, grid = self._embed(x)
        stop = last if stop_early or intermediates_only else None
        tokens, feats = self._run_xca_blocks(tokens, grid, keep=take, stop=stop)
        if norm:
            feats = [self.norm(f) for f in feats]
        if output_fmt == "NCHW":  # [B, N, D] -> [B, D, Hp, Wp]
            feats = [f.transpose(1, 2).reshape(f.shape[0], f.shape[2], *grid).contiguous() for f in feats]
        if intermediates_only:
            return feats
        return self._class_attention(tokens), feats

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what ``forward_intermediates(indices)`` does not need: the XCA blocks after the last
        index and (``prune_head``) the CLS token, class-attention blocks and classifier; with
        ``prune_norm`` the final LayerNorm becomes the identity. Returns the absolute indices."""
        take, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
            self.cls_attn_blocks = nn.ModuleList()
            self.cls_token = None
        return take

    @torch.no_grad()
    def get_last_attention(self, x: Tensor) -> Tensor:
        """CLS attention over the patches in the last class-attention block, ``[B, heads, Hp, Wp]``."""
        tokens, grid = self._embed(x)
        tokens, _ = self._run_xca_blocks(tokens, grid, keep=False)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for blk in self.cls_attn_blocks[:-1]:
            tokens = blk(tokens)
        last = self.cls_attn_blocks[-1]
        attn = last.attn.attention_map(last.norm1(tokens))  # [B, heads, 1+N]
        return attn[:, :, 1:].reshape(attn.shape[0], attn.shape[1], grid[0], grid[1])
