"""The DINO projection head (REFERENCE.md section 2).

MLP ``Linear(D, hidden)-GELU-...-Linear(hidden, bottleneck)`` -> L2-normalise -> weight-normalised
``Linear(bottleneck, K, bias=False)``. The student and the teacher each own one; the teacher is a
``copy.deepcopy`` of the student, which keeps the weight-norm parametrisation and the frozen gain.

Parameter names (state-dict keys under the head's prefix): ``mlp.<i>.weight|bias`` and
``last_layer.parametrizations.weight.original0`` (gain g, ``[K, 1]``) /
``last_layer.parametrizations.weight.original1`` (direction v, ``[K, bottleneck]``). Official DINO
checkpoints call these ``last_layer.weight_g`` / ``last_layer.weight_v`` (the deprecated
``torch.nn.utils.weight_norm``); a checkpoint reader must rename them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "LAST_LAYER_PREFIX"]

#: name prefix (within the head) of the last layer's parameters, for param groups built by name
LAST_LAYER_PREFIX = "last_layer."

_INIT_STD = 0.02


def _init_linear(layer: nn.Linear) -> None:
    # DINO's init: trunc_normal_(std=0.02) with the default cut a=-2, b=2, which is in absolute
    # value (100 sigma), so in effect an untruncated N(0, 0.02^2); we keep the call as DINO has it
    nn.init.trunc_normal_(layer.weight, std=_INIT_STD, a=-2.0, b=2.0)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class DINOHead(nn.Module):
    """DINO projection head: ``[B, in_dim] -> [B, out_dim]`` logits (before any temperature).

    Args:
        in_dim: backbone feature size D (the CLS embedding).
        out_dim: K, the number of prototypes (65536 in DINO; a few thousand for small data).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: size of the L2-normalised bottleneck fed to the last layer.
        num_layers: linear layers in the MLP (>= 1); 1 is a single ``Linear(in_dim, bottleneck)``.
        norm_last_layer: fix the weight-norm gain to 1 and freeze it, so every prototype (row of the
            last layer) has unit norm: more stable; ``False`` trains the gain (better for small
            models per the DINO README, XCiT recipes use ``False``).
        use_bn: BatchNorm1d after each hidden Linear (DINO's default is off for ViT/XCiT).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("num_layers", num_layers),
        ):
            if int(value) < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {value}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm_last_layer = norm_last_layer

        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:  # no activation on the bottleneck: it is L2-normalised next
                if use_bn:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # same order as DINO (build the MLP, initialise it, then create the last layer), so a
        # seed draws the same numbers in the same order
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)

        # the last layer keeps PyTorch's default Linear init, as in DINO (its init runs before the
        # layer exists): v ~ U(+-1/sqrt(bottleneck)), row norm ~0.58. The gain makes the forward
        # independent of ||v||, but the size of v sets how fast the prototype directions move
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = weight_norm(last, name="weight", dim=0)
        gain = self.last_layer.parametrizations.weight.original0  # [K, 1]
        gain.data.fill_(1.0)
        if norm_last_layer:
            gain.requires_grad_(False)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The last layer's *trainable* parameters, which DINO freezes during the first epoch(s).

        Always the direction ``v``; also the gain ``g`` when ``norm_last_layer=False``. With
        ``norm_last_layer=True`` the gain is frozen for good and deliberately left out, so that
        un-freezing these parameters after epoch 1 cannot make it trainable. Decided by the
        constructor flag, not by ``requires_grad``, so a teacher copy (all frozen) answers the same.
        """
        weight = self.last_layer.parametrizations.weight
        params = [weight.original1]
        if not self.norm_last_layer:
            params.insert(0, weight.original0)
        return params

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, in_dim]`` -> logits ``[B, out_dim]``."""
        if x.ndim != 2 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DINOHead expects features [B, {self.in_dim}], got {tuple(x.shape)}"
            )
        z = self.mlp(x)
        # normalise in float32 (a bf16/fp16 norm of 256 squares loses precision), then return
        # to the input dtype so bf16-true models still see matching dtypes in the last matmul
        z = F.normalize(z.float(), dim=-1, p=2.0).to(z.dtype)
        return self.last_layer(z)

    def extra_repr(self) -> str:
        return f"norm_last_layer={self.norm_last_layer}"
