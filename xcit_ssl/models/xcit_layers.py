"""The building blocks of XCiT (arXiv 2106.09681): conv stem, Fourier positional encoding, XCA and
class-attention blocks. The model that stacks them is :class:`xcit_ssl.models.xcit.XCiT`.

Attribute names follow timm's ``timm/models/xcit.py`` so state-dict keys match; the code is our
own (see ``REFERENCE.md`` section 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        # [3, B, heads, d_h, N]: tokens last, so normalising over dim -1 is "along the token axis".
        # One copy to a contiguous layout first: on a permuted (strided) q and k, F.normalize's
        # reduction runs ~10x slower on the CPU (benchmarks/BENCHMARKS.md, "The demo's CPU hot spots").
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.contiguous().unbind(0)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"temperature"}


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise 3x3 ``nn.Conv2d`` (groups = channels) whose weight gradient has the weight's strides.

    LPI feeds it a channels-last view of the tokens, so the convolution returns the gradient of the
    ``[C, 1, 3, 3]`` weight in channels-last strides ``(9, 1, 3, 1)`` while the parameter has
    ``(9, 9, 3, 1)``. The memory order is the same (the size-1 axis has no extent), so autograd's
    layout check lets it through, but DDP's reducer compares strides exactly and warned "Grad
    strides do not match bucket view strides" on every rank. Passing the weight through
    ``squeeze(1).unsqueeze(1)`` (free views) makes ``unsqueeze`` autograd's last step, which hands
    back the parameter's own strides. Numerics and state-dict keys are the plain ``nn.Conv2d``'s.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight.squeeze(1).unsqueeze(1), self.bias)


class LPI(nn.Module):
    """Local patch interaction: depthwise 3x3 conv -> GELU -> BN -> depthwise 3x3 conv on the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = DepthwiseConv2d(dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = DepthwiseConv2d(dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        # [B, N, C] -> [B, C, Hp, Wp] as a view: channels-last strides, no copy
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
