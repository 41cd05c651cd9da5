"""Read XCiT weights in any scheme and load them strictly into our backbone.

``read_state_dict`` returns timm-keyed weights from a timm, official, DINO, mmpretrain or
xcit-ssl checkpoint (``.pth``/``.pt``/``.ckpt`` or ``.safetensors``, see
:mod:`.checkpoint_schemes`). ``load_backbone_weights`` loads them into a model and refuses
anything but an exact fit, except the classifier head, which is left at its initialisation
(with a logged notice) when its shape differs. ``load_backbone`` also builds the right variant.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from .checkpoint_files import load_checkpoint_file
from .checkpoint_schemes import select_weights, to_timm_keys
from .record import find_record
from .registry import FAMILIES, create_backbone
from .xcit import XCiT

logger = logging.getLogger(__name__)

Source = str | Path | Mapping[str, Any]
_HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did. Shapes are ``(checkpoint, model)``."""

    source: str
    scheme: str = "timm"
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped_head: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """One line per kind of misfit, outside the classifier head (which may be dropped)."""
        lines = []
        missing = [k for k in self.missing if k not in _HEAD_KEYS]
        unexpected = [k for k in self.unexpected if k not in _HEAD_KEYS]
        mismatched = [m for m in self.mismatched if m[0] not in _HEAD_KEYS]
        if missing:
            lines.append(f"missing from the checkpoint ({len(missing)}): {summarise_keys(missing)}")
        if unexpected:
            lines.append(f"unexpected in the checkpoint ({len(unexpected)}): {summarise_keys(unexpected)}")
        if mismatched:
            shapes = ", ".join(f"{k} {list(a)} vs model {list(b)}" for k, a, b in mismatched)
            lines.append(f"shape mismatch ({len(mismatched)}): {shapes}")
        return lines

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source} ({self.scheme} keys)"]
        return "\n".join(lines + [f"  {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes])


def summarise_keys(keys: Iterable[str]) -> str:
    """Keys with their first index folded into ranges: ``blocks.{0-11}.attn.qkv.weight``."""
    groups: dict[str, list[int]] = defaultdict(list)
    for key in keys:
        m = re.search(r"\.(\d+)\.", key)
        if m is None:
            groups[key].append(-1)
        else:
            groups[key[: m.start()] + ".{}." + key[m.end() :]].append(int(m[1]))
    parts = []
    for pattern, idx in sorted(groups.items()):
        if idx[0] < 0:
            parts.append(pattern)
        else:
            parts.append(pattern.replace("{}", str(idx[0]) if len(idx) == 1 else "{" + _ranges(sorted(idx)) + "}"))
    return ", ".join(parts)


def count_keys(keys: Iterable[str], shown: int = 4) -> str:
    """``"39 keys: loss_fn.* (3), student_head.* (18), teacher_head.* (18)"``: a count by top-level
    module, short enough for one log line whatever the checkpoint holds."""
    keys = list(keys)
    groups: dict[str, int] = defaultdict(int)
    for key in keys:
        head, dot, _ = key.partition(".")
        groups[head + (".*" if dot else "")] += 1
    names = [f"{name} ({n})" for name, n in sorted(groups.items())]
    more = f", {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}: {', '.join(names[:shown])}{more}"


def _ranges(idx: list[int]) -> str:
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# -- reading --------------------------------------------------------------------------------------


def _open(source: Source) -> tuple[Any, dict[str, str], str]:
    """(checkpoint object, safetensors metadata, a name for messages)."""
    if isinstance(source, Mapping):
        return source, {}, "the given state dict"
    obj, metadata = load_checkpoint_file(source)
    return obj, metadata, f"checkpoint {source}"


def _convert(obj: Any, checkpoint_key: str, origin: str) -> tuple[dict[str, Tensor], str, list[str]]:
    weights, left_out = select_weights(obj, checkpoint_key, origin)
    weights, scheme, dropped = to_timm_keys(weights)
    notes = []
    if left_out or dropped:
        notes.append(f"ignored beside the backbone {count_keys(left_out + dropped)}")
        logger.debug("%s: ignored keys: %s", origin, summarise_keys(left_out + dropped))
    if scheme != "timm":
        notes.append(f"converted {scheme} keys to timm's")
    return weights, scheme, notes  # the caller logs them once, with its load report


def read_state_dict(source: Source, checkpoint_key: str = "teacher") -> dict[str, Tensor]:
    """timm-keyed backbone weights (and classifier head, if any) from a file or a loaded dict.

    ``checkpoint_key`` picks one set of weights where a file holds several (``teacher`` /
    ``student`` in DINO files, ``backbone`` / ``ema`` in supervised ones); a file with one set
    ignores it. Raises UserError for missing, truncated or non-checkpoint files.
    """
    obj, _, origin = _open(source)
    weights, _, notes = _convert(obj, checkpoint_key, origin)
    for note in notes:
        logger.info("%s: %s", origin, note)
    return weights


# -- the architecture a state dict was made for -----------------------------------------------


def infer_arch(weights: Mapping[str, Tensor]) -> dict[str, int] | None:
    """embed_dim, depth, num_heads, patch_size, cls_attn_layers, in_chans of timm-keyed weights."""
    try:
        stem = sorted(int(m[1]) for k in weights if (m := re.match(r"patch_embed\.proj\.(\d+)\.0\.weight$", k)))
        return dict(
            embed_dim=int(weights["cls_token"].shape[-1]),
            depth=1 + max(int(m[1]) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))),
            num_heads=int(weights["blocks.0.attn.temperature"].shape[0]),
            patch_size=2 ** len(stem),
            cls_attn_layers=1 + max(int(m[1]) for k in weights if (m := re.match(r"cls_attn_blocks\.(\d+)\.", k))),
            in_chans=int(weights[f"patch_embed.proj.{stem[0]}.0.weight"].shape[1]),
        )
    except (KeyError, ValueError, IndexError):  # not an XCiT (or badly damaged): the key check says what
        return None


def _model_arch(model: XCiT) -> dict[str, int]:
    a = model.arch_args
    keys = ("embed_dim", "depth", "num_heads", "patch_size", "in_chans")
    return {k: int(a[k]) for k in keys} | {"cls_attn_layers": len(model.cls_attn_blocks)}


def family_of(arch: Mapping[str, int]) -> str | None:
    """``xcit_<family>_p<patch>`` (e.g. ``xcit_small_12_p16``) of a standard architecture."""
    for fam, f in FAMILIES.items():
        if (f.embed_dim, f.depth, f.num_heads) == (arch["embed_dim"], arch["depth"], arch["num_heads"]):
            if arch.get("cls_attn_layers", 2) == 2 and arch.get("in_chans", 3) == 3:
                return f"xcit_{fam}_p{arch['patch_size']}"
    return None


def _describe(arch: Mapping[str, int], name: str | None = None) -> str:
    dims = f"D={arch['embed_dim']}, depth={arch['depth']}, heads={arch['num_heads']}, p{arch['patch_size']}"
    if arch.get("in_chans", 3) != 3:
        dims += f", {arch['in_chans']} input channels"
    return f"{name or family_of(arch) or 'a custom XCiT'} ({dims})"


# the command-line option that names the variant where each loader is reached from
FIT_BACKBONE_FLAG = "--model.backbone.init_args.name"  # fit --model.pretrained: the recipe builds the model
NAME_FLAG = "--backbone"  # knn / linear / export / validate: the file's variant unless --backbone says otherwise


def _variant_fix(found: Mapping[str, int], wanted: Mapping[str, int], flag: str, model_name: str | None) -> str:
    fam = family_of(found)
    if flag == NAME_FLAG:
        keep = "drop --backbone (the checkpoint's own variant is used where it records one)"
        return f"pass --backbone {fam}_224, or {keep}" if fam else keep
    if fam and not (model_name or "").startswith(fam):  # another named variant: its name is the fix
        return f"pass {flag} {fam}_224 (the checkpoint's variant), or start from weights of this variant"
    prefix = flag.rsplit(".", 1)[0]  # --model.backbone.init_args; the sizes the recipe overrides
    dims = " ".join(f"{prefix}.{k} {found[k]}" for k in ("embed_dim", "depth", "num_heads", "patch_size")
                    if found[k] != wanted.get(k))  # fmt: skip
    return f"pass {dims} (the checkpoint's architecture), or start from weights of this architecture"


def _check_variant(weights: Mapping[str, Tensor], model: XCiT, origin: str, flag: str = FIT_BACKBONE_FLAG) -> None:
    found = infer_arch(weights)
    wanted = _model_arch(model)
    if found is None or found == wanted:
        return
    raise UserError(
        f"{origin} is {_describe(found)} but the model is "
        f"{_describe(wanted, getattr(model, 'variant_name', None))}: "
        f"{_variant_fix(found, wanted, flag, getattr(model, 'variant_name', None))}"
    )


# -- loading ----------------------------------------------------------------------------------------


def _load_into(
    model: XCiT, weights: dict[str, Tensor], origin: str, scheme: str, notes: list[str], flag: str = FIT_BACKBONE_FLAG
) -> LoadReport:
    if not any(".local_mp." in k or k.endswith("attn.temperature") for k in weights):
        raise UserError(
            f"{origin} holds no XCiT blocks (no XCA temperature or LPI weights; keys start: "
            f"{', '.join(list(weights)[:5])}); is it another architecture, such as a ViT?"
        )
    _check_variant(weights, model, origin, flag)
    own = model.state_dict()
    report = LoadReport(source=origin, scheme=scheme, notes=list(notes))
    weights = dict(weights)
    for key in [k for k in own if k.endswith("num_batches_tracked") and k not in weights]:
        # older files lack BatchNorm's step counter; it only matters with momentum=None
        weights[key] = torch.zeros_like(own[key])
    report.missing = sorted(k for k in own if k not in weights)
    report.unexpected = sorted(k for k in weights if k not in own)
    report.mismatched = sorted(
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in weights.items() if k in own and v.shape != own[k].shape
    )
    _handle_head(model, weights, report)
    if report.problems:
        raise UserError(
            f"{origin} does not fit the model "
            f"{_describe(_model_arch(model), getattr(model, 'variant_name', None))}:\n  "
            + "\n  ".join(report.problems)
            + "\nload a checkpoint of this variant, or fix its keys"
        )
    result = model.load_state_dict(weights, strict=False)
    # only the head may be absent, and only when _handle_head decided so
    assert not result.unexpected_keys and set(result.missing_keys) <= set(_HEAD_KEYS), result
    report.loaded = len(weights)
    logger.info("%s", report)
    return report


def _handle_head(model: XCiT, weights: dict[str, Tensor], report: LoadReport) -> None:
    """Drop the checkpoint's head, keeping the model's, when they do not fit; notes why."""
    own = model.state_dict()
    model_has_head = "head.weight" in own
    ckpt_head = {k: weights[k] for k in _HEAD_KEYS if k in weights}
    fits = model_has_head and set(ckpt_head) == {k for k in _HEAD_KEYS if k in own} and all(
        v.shape == own[k].shape for k, v in ckpt_head.items()
    )
    if fits or (not model_has_head and not ckpt_head):
        return
    for k in ckpt_head:
        del weights[k]
    report.dropped_head = True
    if not model_has_head:
        why = f"the model is headless (num_classes=0); dropped the checkpoint's {list(ckpt_head['head.weight'].shape)} head"
    elif not ckpt_head:
        why = f"the checkpoint has no classifier head; the model's {list(own['head.weight'].shape)} head keeps its initialisation"
    else:
        why = (
            f"the checkpoint's head {list(ckpt_head['head.weight'].shape)} differs from the model's "
            f"{list(own['head.weight'].shape)}; the model's head keeps its initialisation"
        )
    report.notes.append(why)
    logger.warning("%s: %s", report.source, why)


def load_backbone_weights(model: XCiT, source: Source, checkpoint_key: str = "teacher") -> LoadReport:
    """Load a checkpoint (any scheme) into ``model`` strictly; see :class:`LoadReport`.

    Raises UserError, naming every missing, unexpected and mis-shaped key, when the weights do
    not fit, and naming both variants when the checkpoint is of another variant.
    """
    obj, _, origin = _open(source)
    weights, scheme, notes = _convert(obj, checkpoint_key, origin)
    return _load_into(model, weights, origin, scheme, notes)


def load_backbone(
    source: Source, checkpoint_key: str = "teacher", name: str | None = None, num_classes: int = 0
) -> XCiT:
    """Build the checkpoint's variant and load it strictly (in train mode, like ``create_backbone``).

    The variant comes from ``name``, else from the :class:`~.record.BackboneRecord` xcit-ssl
    stores in its checkpoints and exports (safetensors metadata, or the ``<file>.json`` sidecar
    beside a ``.pth``), else from the weights when they match a standard family (at 224 px: the
    224 and 384 variants share their weights).
    """
    obj, metadata, origin = _open(source)
    weights, scheme, notes = _convert(obj, checkpoint_key, origin)
    record = find_record(obj, metadata, origin)
    overrides: dict[str, Any] = {}
    if record is not None and record.architecture is not None and name in (None, record.architecture):
        name, overrides = record.architecture, dict(record.overrides)
    if name is None:
        arch = infer_arch(weights)
        fam = family_of(arch) if arch else None
        if fam is None:
            what = _describe(arch) if arch else "not an XCiT"
            raise UserError(f"cannot tell which variant {origin} is ({what}); pass the backbone name "
                            "(--backbone NAME, e.g. --backbone xcit_small_12_p16_224)")
        name = f"{fam}_224"
        logger.info("%s: inferred the variant %s from its weights", origin, name)
    overrides["num_classes"] = num_classes
    model = create_backbone(name, **overrides)
    _load_into(model, weights, origin, scheme, notes, flag=NAME_FLAG)  # a name given here came from --backbone
    return model
