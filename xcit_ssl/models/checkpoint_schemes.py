"""Find the XCiT weights inside a checkpoint and rename them to timm's keys.

Schemes seen in the wild (REFERENCE.md section 1), all converted on load. Exports are written
with timm's keys unless asked otherwise: :func:`to_layout` writes the official and DINO layouts for
tools that load with ``strict=False`` (official XCiT, DINO's eval_knn/eval_linear) and would
silently leave differently named weights at random.

- timm: canonical, unchanged.
- official facebookresearch/xcit: ``{'model': ...}`` wrapper, ``pos_embeder.*``, one fused
  ``attn.qkv`` in the class-attention blocks (split into ``q``/``k``/``v``).
- DINO: ``{'teacher': ..., 'student': ...}``, ``module.`` (DDP) and ``backbone.`` prefixes, a
  ``head.*`` projection head (dropped). Released DINO XCiT backbones use the official keys.
- mmpretrain: ``{'state_dict': ...}``, ``backbone.`` prefix, ``xca_layers``/``ca_layers``, mmcv
  ``ConvModule`` (``.conv``/``.bn``) and ``FFN`` (``ffn.layers.0.0``/``ffn.layers.1``) wrappers,
  classifier ``head.fc``.
- ours (Lightning): ``state_dict`` with ``teacher_backbone.``/``student_backbone.`` (DINO) or
  ``backbone.``/``ema_backbone.`` (supervised, distilled) prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

# path components that wrappers insert: DistributedDataParallel and torch.compile
_WRAPPER_PARTS = {"module", "_orig_mod"}
_CLASSIFIER_KEYS = {"head.weight", "head.bias"}


def _looks_like_xcit(d: Mapping[str, Any]) -> bool:
    return any(isinstance(k, str) and (k.endswith("cls_token") or "patch_embed." in k) for k in d)


def _is_tensor_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and bool(d) and any(isinstance(v, Tensor) for v in d.values())


def _choose(options: Mapping[str, Any], key: str, what: str, origin: str) -> Any:
    """``options[key]`` when several sets of weights exist; the only one when there is one."""
    if len(options) == 1:
        return next(iter(options.values()))
    for candidate in (key, key.removesuffix("_backbone"), f"{key}_backbone"):
        if candidate in options:
            return options[candidate]
    raise UserError(
        f"{origin} holds several {what} ({', '.join(sorted(options))}) and none is '{key}'; "
        f"choose one with checkpoint_key (e.g. --checkpoint_key {sorted(options)[0]})"
    )


def select_weights(obj: Any, checkpoint_key: str, origin: str) -> tuple[dict[str, Tensor], list[str]]:
    """The flat ``{name: tensor}`` dict of one backbone inside a loaded checkpoint object, and
    the keys left out beside it (heads, loss buffers).

    Wrappers are unpacked (``state_dict``, ``model``, DINO's ``teacher``/``student``); where a
    file holds several sets of weights, ``checkpoint_key`` picks one (``teacher``, ``student``,
    ``backbone``, ``ema``, ``model_ema``, ...).
    """
    if not isinstance(obj, Mapping):
        raise UserError(f"{origin} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    for _ in range(4):  # wrappers nest at most a few levels deep
        if _is_tensor_dict(obj) and _looks_like_xcit(obj):
            break
        nested = {k: v for k, v in obj.items() if isinstance(v, Mapping) and _contains_xcit(v)}
        if not nested:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise UserError(f"{origin} holds no XCiT weights (its keys start: {keys}); pass an XCiT checkpoint")
        if "state_dict" in nested and checkpoint_key not in nested:
            nested = {"state_dict": nested["state_dict"]}  # Lightning / mmpretrain: the model's own
        obj = _choose(nested, checkpoint_key, "sets of weights", origin)
    weights = {_strip_wrappers(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return _select_backbone(weights, checkpoint_key, origin)


def _contains_xcit(d: Mapping[str, Any]) -> bool:
    return _looks_like_xcit(d) or any(isinstance(v, Mapping) and _contains_xcit(v) for v in d.values())


def _strip_wrappers(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def _select_backbone(
    weights: dict[str, Tensor], checkpoint_key: str, origin: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Pick one ``<name>_backbone.`` / ``backbone.`` group; keep a classifier ``head.fc``; drop the rest."""
    groups: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in weights.items():
        first, _, tail = key.partition(".")
        if first == "backbone" or first.endswith("_backbone"):
            name = "backbone" if first == "backbone" else first.removesuffix("_backbone")
            groups.setdefault(name, {})[tail] = value
        else:
            rest[key] = value
    if not groups:
        return weights, []
    chosen = dict(_choose(groups, checkpoint_key, "backbones", origin))
    dropped = []
    for key, value in rest.items():
        # mmpretrain's classifier lives beside its backbone; DINO heads and loss buffers do not matter
        if key.startswith("head.fc.") and len(groups) == 1:
            chosen.setdefault("head." + key.removeprefix("head.fc."), value)
        else:
            dropped.append(key)
    return chosen, sorted(dropped)


# -- scheme conversion ------------------------------------------------------------------------

_MMPRETRAIN_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^xca_layers\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^ca_layers\.(\d+)\."), r"cls_attn_blocks.\1."),
    (re.compile(r"\.local_mp\.conv1\.conv\."), ".local_mp.conv1."),
    (re.compile(r"\.local_mp\.conv1\.bn\."), ".local_mp.bn."),
    (re.compile(r"\.local_mp\.conv2\.conv\."), ".local_mp.conv2."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
    (re.compile(r"^pos_embed\.token_projection\.conv\."), "pos_embed.token_projection."),
    (re.compile(r"^head\.fc\."), "head."),
]
_MM_PATCH = re.compile(r"^patch_embed\.proj\.(\d+)\.(conv|bn)\.(.+)$")


def _from_mmpretrain(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in weights.items():
        if m := _MM_PATCH.match(key):
            # mmcv ConvModule i holds conv+BN(+GELU); timm's Sequential interleaves GELUs: index 2i
            key = f"patch_embed.proj.{2 * int(m[1])}.{0 if m[2] == 'conv' else 1}.{m[3]}"
        for pattern, repl in _MMPRETRAIN_RULES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


_SPLIT_QKV = re.compile(r"^(cls_attn_blocks\.\d+\.attn)\.q\.(weight|bias)$")
LAYOUTS = ("timm", "official", "dino")


def to_layout(weights: Mapping[str, Tensor], layout: str) -> dict[str, Any]:
    """timm-keyed backbone weights in ``layout``, the inverse of the conversion on load.

    - ``timm``: unchanged, ``{key: tensor}``.
    - ``official``: facebookresearch/xcit keys, ``{key: tensor}``: ``pos_embeder.*`` and one
      fused ``attn.qkv`` ([q; k; v] rows) per class-attention block.
    - ``dino``: ``{'teacher': {'backbone.<official key>': tensor}}``, what DINO's eval tools read
      with ``--checkpoint_key teacher`` (they strip ``module.`` and ``backbone.``).
    """
    if layout not in LAYOUTS:
        raise UserError(f"unknown weight layout {layout!r}: choose one of {', '.join(LAYOUTS)} (--layout)")
    if layout == "timm":
        return dict(weights)
    out: dict[str, Any] = {}
    for key, value in weights.items():
        if m := _SPLIT_QKV.match(key):
            parts = [weights[f"{m[1]}.{name}.{m[2]}"] for name in "qkv"]
            out[f"{m[1]}.qkv.{m[2]}"] = torch.cat(parts, dim=0)
        elif re.match(r"^cls_attn_blocks\.\d+\.attn\.[kv]\.(weight|bias)$", key):
            continue  # fused into qkv with its q
        elif key.startswith("pos_embed."):
            out["pos_embeder." + key.removeprefix("pos_embed.")] = value
        else:
            out[key] = value
    return {"teacher": {f"backbone.{k}": v for k, v in out.items()}} if layout == "dino" else out


_FUSED_QKV = re.compile(r"^cls_attn_blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _from_official(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in weights.items():
        if key.startswith("pos_embeder."):
            key = "pos_embed." + key.removeprefix("pos_embeder.")
        if m := _FUSED_QKV.match(key):
            # rows of the fused projection are [q; k; v], each D wide
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"cls_attn_blocks.{m[1]}.attn.{name}.{m[2]}"] = part.contiguous()
            continue
        out[key] = value
    return out


def detect_scheme(weights: Mapping[str, Tensor]) -> str:
    """'mmpretrain', 'official' or 'timm' from the key names of a prefix-free dict."""
    if any(k.startswith(("xca_layers.", "ca_layers.")) for k in weights):
        return "mmpretrain"
    if any(k.startswith("pos_embeder.") or _FUSED_QKV.match(k) for k in weights):
        return "official"
    return "timm"


def to_timm_keys(weights: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str]]:
    """(timm-keyed weights, the detected scheme, dropped keys) of a prefix-free dict.

    Dropped: ``head.*`` entries that are not a linear classifier (DINO's projection head).
    """
    scheme = detect_scheme(weights)
    if scheme == "mmpretrain":
        weights = _from_mmpretrain(weights)
    elif scheme == "official":
        weights = _from_official(weights)
    dropped = sorted(k for k in weights if k.startswith("head.") and k not in _CLASSIFIER_KEYS)
    return {k: v for k, v in weights.items() if k not in dropped}, scheme, dropped
