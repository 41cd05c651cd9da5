"""The XCiT backbone (Cross-Covariance Image Transformer, arXiv 2106.09681).

Data flow: image -> conv patch embedding -> + Fourier positional encoding -> XCA blocks
-> late CLS token -> 2 class-attention blocks -> LayerNorm -> CLS -> head.

State-dict keys are timm's (``timm/models/xcit.py``), so weights move both ways without
conversion. The implementation is our own; see ``REFERENCE.md`` section 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LAYER_NORM_EPS = 1e-6


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _conv3x3_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    # keys: ``<i>.0`` conv (no bias, BN follows), ``<i>.1`` BatchNorm
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class ConvPatchEmbed(nn.Module):
    """Stack of stride-2 3x3 conv+BN stages with GELU between them.

    p16: 3 -> D/8 -> D/4 -> D/2 -> D (4 stages); p8: 3 -> D/4 -> D/2 -> D (3 stages).
    Input ``[B, C, H, W]``; output tokens ``[B, N, D]`` and the grid ``(Hp, Wp)``.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if patch_size == 16:
            widths = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        elif patch_size == 8:
            widths = [in_chans, embed_dim // 4, embed_dim // 2, embed_dim]
        else:
            raise ValueError(f"XCiT supports patch_size 8 or 16, got {patch_size}")
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            if i:
                layers.append(nn.GELU())
            layers.append(_conv3x3_bn(widths[i], widths[i + 1]))
        self.proj = nn.Sequential(*layers)
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class FourierPositionalEncoding(nn.Module):
    """Sine/cosine features of normalised (y, x) positions, projected to D by a 1x1 conv.

    Recomputed for every grid, so any input resolution works without interpolation.
    Returns ``[1, Hp*Wp, D]``.
    """

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.scale = 2 * math.pi
        self.eps = 1e-6

    def _features(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        h, w = grid
        ys = torch.arange(1, h + 1, device=device, dtype=torch.float32)
        xs = torch.arange(1, w + 1, device=device, dtype=torch.float32)
        ys = ys / (ys[-1] + self.eps) * self.scale
        xs = xs / (xs[-1] + self.eps) * self.scale
        idx = torch.arange(self.hidden_dim, device=device, dtype=torch.float32)
        freqs = self.temperature ** (2 * torch.div(idx, 2, rounding_mode="floor") / self.hidden_dim)

        def encode(pos: Tensor) -> Tensor:  # [L] -> [L, hidden_dim]; sin on even, cos on odd
            angles = pos[:, None] / freqs
            return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)

        enc_y = encode(ys)[:, None, :].expand(h, w, self.hidden_dim)
        enc_x = encode(xs)[None, :, :].expand(h, w, self.hidden_dim)
        return torch.cat([enc_y, enc_x], dim=-1).permute(2, 0, 1).unsqueeze(0)  # [1, 2h, H, W]

    def forward(self, grid: tuple[int, int]) -> Tensor:
        weight = self.token_projection.weight
        feats = self._features(grid, weight.device).to(weight.dtype)
        return self.token_projection(feats).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class XCA(nn.Module):
    """Cross-covariance attention: channels attend to channels, cost O(N d^2).

    Per head, q and k are L2-normalised along the token axis; the ``[d_h, d_h]`` attention is
    ``softmax(q_hat k_hat^T * temperature)`` and is applied to v. Input and output ``[B, N, D]``.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # [3, B, heads, d_h, N]: tokens last, so normalising over dim -1 is "along the token axis"
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"temperature"}


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv on the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)


class XCABlock(nn.Module):
    """x += γ1·XCA(norm1 x); x += γ3·LPI(norm3 x); x += γ2·MLP(norm2 x), each under drop-path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = XCA(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.local_mp = LPI(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma3 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma3 * self.local_mp(self.norm3(x), grid))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """Only the CLS query attends to all N+1 tokens. Input ``[B, 1+N, D]``, output ``[B, 1, D]``."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, x: Tensor) -> Tensor:  # [B, L, D] -> [B, heads, L, d_h]
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def attention_map(self, x: Tensor) -> Tensor:
        """Softmax weights of the CLS query over all tokens, ``[B, heads, 1+N]``."""
        q = self._split(self.q(x[:, :1])) * self.scale
        k = self._split(self.k(x))
        return (q @ k.transpose(-2, -1)).softmax(dim=-1).squeeze(2)

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        q, k, v = self._split(self.q(x[:, :1])), self._split(self.k(x)), self._split(self.v(x))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, 1, c)))


class ClassAttentionBlock(nn.Module):
    """CaiT-style class-attention block with XCiT's residual quirk on patch tokens.

    Patch tokens get ``+γ1·norm1(x)`` and are added to themselves again in the MLP residual, so
    post-CA patch tokens are not clean features (use the XCA-block outputs for dense work).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        eta: float = 1.0,
        tokens_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm1(x)
        x = x + self.gamma1 * torch.cat([self.attn(normed), normed[:, 1:]], dim=1)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        # the MLP residual adds the patch tokens to themselves (XCiT's quirk, kept for weight parity)
        branch = torch.cat([self.gamma2 * self.mlp(x[:, :1]), x[:, 1:]], dim=1)
        return x + branch


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
    ``num_classes=0``).
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

    def _run_xca_blocks(self, x: Tensor, grid: tuple[int, int], keep: bool) -> tuple[Tensor, list[Tensor]]:
        outputs: list[Tensor] = []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            if keep:
                outputs.append(x)
        return x, outputs

    def _class_attention(self, x: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
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
