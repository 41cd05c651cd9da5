"""Dense features for detection and segmentation: XCiT as a 4-level feature pyramid.

The official XCiT detection/segmentation backbones take the outputs of four XCA blocks (never the
class-attention blocks, whose patch tokens are not clean features), reshape them to
``[B, D, Hp, Wp]`` and resample them to strides 4, 8, 16 and 32 of the image:

- p16 (grid at stride 16): 4x up (ConvTranspose2d k2 s2 -> BatchNorm -> GELU -> ConvTranspose2d
  k2 s2), 2x up (one ConvTranspose2d), identity, 2x down (MaxPool2d 2);
- p8 (grid at stride 8): 2x up (one ConvTranspose2d), identity, 2x down, 4x down (MaxPool2d 4).

The official code uses SyncBatchNorm; build with the default BatchNorm2d and convert with
``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training (the keys are the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .xcit import XCiT

def dense_indices(depth: int) -> tuple[int, int, int, int]:
    """The four XCA blocks feeding the pyramid: 1/3, 1/2, 2/3 and all of the depth, minus one.

    These are the official backbones' blocks: (3, 5, 7, 11) at depth 12, (7, 11, 15, 23) at 24.
    """
    a, b, c = (max(0, depth * k // 6 - 1) for k in (2, 3, 4))
    return a, b, c, depth - 1


def _up(dim: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)


class XCiTPyramid(nn.Module):
    """An XCiT backbone plus the official multi-scale adapters ``fpn1`` .. ``fpn4``.

    Input ``[B, C, H, W]`` (H, W multiples of 32 give exact strides); output a list of four
    ``[B, D, H/4, W/4]``, ``[B, D, H/8, W/8]``, ``[B, D, H/16, W/16]``, ``[B, D, H/32, W/32]``
    feature maps (D = the backbone's ``embed_dim``), finest first.
    """

    def __init__(
        self,
        backbone: XCiT,
        indices: Sequence[int] | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        self.indices = tuple(indices) if indices is not None else dense_indices(depth)
        if len(self.indices) != 4 or not all(0 <= i < depth for i in self.indices):
            raise ValueError(f"the pyramid reads 4 XCA blocks of the {depth}, got indices {self.indices}")
        self.backbone = backbone
        dim = backbone.embed_dim
        if backbone.patch_size == 16:
            self.fpn1: nn.Module = nn.Sequential(_up(dim), norm_layer(dim), nn.GELU(), _up(dim))
            self.fpn2: nn.Module = nn.Sequential(_up(dim))
            self.fpn3: nn.Module = nn.Identity()
            self.fpn4: nn.Module = nn.MaxPool2d(kernel_size=2, stride=2)
        elif backbone.patch_size == 8:
            self.fpn1 = nn.Sequential(_up(dim))
            self.fpn2 = nn.Identity()
            self.fpn3 = nn.MaxPool2d(kernel_size=2, stride=2)
            self.fpn4 = nn.MaxPool2d(kernel_size=4, stride=4)
        else:
            raise ValueError(f"XCiT pyramids exist for patch size 8 or 16, got {backbone.patch_size}")

    def forward(self, x: Tensor) -> list[Tensor]:
        wanted = sorted(set(self.indices))
        feats = self.backbone.forward_intermediates(x, indices=wanted, intermediates_only=True)
        by_index = dict(zip(wanted, feats))  # [B, D, Hp, Wp] each
        adapters = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [adapt(by_index[i]) for adapt, i in zip(adapters, self.indices)]
