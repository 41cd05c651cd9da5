"""The backbone record: which network a file holds and how its images were prepared.

xcit-ssl writes one record in two shapes, and :func:`read_record` reads both:

- training checkpoints (``.ckpt``), ``checkpoint["xcit_ssl"]`` (a pickled dict)::

    {"backbone": {"name": ..., "overrides": {...}}, "method": ..., "img_size": ...,
     "mean": [...], "std": [...], "recipe": ...}

- exports, as the safetensors metadata entry ``{"xcit_ssl": <json>}`` (also the ``<file>.json``
  sidecar of ``.pth`` exports and the ONNX metadata property), flat::

    {"name": ..., "overrides": {...}, "img_size": ..., "mean": [...], "std": [...],
     "recipe": ..., "method": ..., <export provenance: checkpoint_key, source, knn, ...>}

In memory the fields carry timm's names where timm has one: ``architecture``, ``mean`` and
``std`` are keys of timm's ``pretrained_cfg``; ``img_size`` and ``overrides`` are arguments of
``timm.create_model`` (pretrained_cfg's ``input_size`` is ``(in_chans, img_size, img_size)``).
On disk the keys stay ``name`` etc., so files written before and after this module read alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .checkpoint_files import load_checkpoint_file

# Constructor arguments that change what a frozen, headless XCiT computes (or, eta, how it is
# initialised); the rest (num_classes, drop rates, img_size) do not. The order is the order these
# keys are written in export metadata: keep it, or re-exports of the same weights change bytes.
ARCH_KEYS: tuple[str, ...] = (
    "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
    "cls_attn_layers", "use_pos_embed", "eta", "tokens_norm",
)  # fmt: skip

# the keys the record's own fields are read from; anything else in an entry travels in `extra`
_OWN_KEYS = frozenset({"backbone", "name", "overrides", "method", "img_size", "mean", "std", "recipe"})


def arch_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``overrides`` (e.g. a model's ``build_args``) that change the network, in
    :data:`ARCH_KEYS` order."""
    return {k: overrides[k] for k in ARCH_KEYS if k in overrides}


@dataclass(frozen=True)
class BackboneRecord:
    """What xcit-ssl stores beside a backbone's weights.

    architecture: the timm variant name (``xcit_small_12_p16_224``); None when the backbone was
        not built from a named variant. Written as ``name``.
    overrides: constructor arguments that differ from the variant (``depth`` of a tiny model,
        ``drop_path_rate``, ``num_classes``; an export keeps only the :data:`ARCH_KEYS` ones).
    img_size: training resolution in pixels (one side), None when unknown.
    mean, std: per-channel input normalisation the weights were trained with, None when unknown.
    method: ``dino``, ``supervised`` or ``distilled``; recipe: the recipe name of the run.
    extra: every other key of the entry (an export's provenance: ``checkpoint_key``, ``source``,
        ``source_sha256``, ``knn``, ``layout``, ...), kept in order so a re-export carries it.
    """

    architecture: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    method: str | None = None
    recipe: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading ------------------------------------------------------------------------------

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], nested_first: bool = True) -> BackboneRecord:
        """The record of a decoded entry of either shape.

        The variant is looked for in the nested ``backbone`` entry (checkpoint shape) and at the
        top level (export shape); ``nested_first`` says which wins when both name one.
        """
        nested = entry.get("backbone")
        places = [nested if isinstance(nested, Mapping) else {}, entry]
        if not nested_first:
            places.reverse()
        where = next((p for p in places if isinstance(p.get("name"), str)), None)
        overrides = where.get("overrides") if where is not None else None
        return cls(
            architecture=where["name"] if where is not None else None,
            overrides=dict(overrides) if isinstance(overrides, Mapping) else {},
            img_size=_optional_int(entry.get("img_size")),
            mean=_optional_floats(entry.get("mean")),
            std=_optional_floats(entry.get("std")),
            method=_optional_str(entry.get("method")),
            recipe=_optional_str(entry.get("recipe")),
            extra={k: v for k, v in entry.items() if k not in _OWN_KEYS},
        )

    @classmethod
    def from_checkpoint_entry(cls, entry: Any) -> BackboneRecord | None:
        """The record of ``checkpoint["xcit_ssl"]`` (None when it is not a dict)."""
        return cls.from_entry(entry, nested_first=True) if isinstance(entry, Mapping) else None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], origin: str | Path) -> BackboneRecord | None:
        """The record in safetensors metadata (``{"xcit_ssl": <json>}``), None when there is none.

        Raises UserError naming ``origin`` when the entry is not valid JSON.
        """
        raw = metadata.get("xcit_ssl")
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{origin}: its 'xcit_ssl' metadata is not valid JSON ({err}); re-export the backbone"
            ) from err
        return cls.from_entry(entry, nested_first=False) if isinstance(entry, dict) else None

    # -- writing --------------------------------------------------------------------------------

    def to_checkpoint_entry(self) -> dict[str, Any]:
        """``checkpoint["xcit_ssl"]`` as training checkpoints have always held it (key order too)."""
        entry: dict[str, Any] = {
            "backbone": {"name": self.architecture, "overrides": dict(self.overrides)},
            "method": self.method,
            "img_size": self.img_size,
            "mean": _as_list(self.mean),
            "std": _as_list(self.std),
            "recipe": self.recipe,
        }
        return entry | self.extra

    def to_metadata_entry(self) -> dict[str, Any]:
        """The export entry (flat, JSON-ready) as ``xcit-ssl export`` writes it: the sidecar JSON,
        the ONNX property and, encoded, the safetensors metadata."""
        entry: dict[str, Any] = {
            "name": self.architecture,
            "overrides": dict(self.overrides),
            "img_size": self.img_size,
            "mean": _as_list(self.mean),
            "std": _as_list(self.std),
            "recipe": self.recipe,
            "method": self.method,
        }
        return entry | self.extra

    def to_metadata(self) -> dict[str, str]:
        """Safetensors metadata ``{"xcit_ssl": <json>}`` (add ``"format": "pt"`` beside it for timm)."""
        return {"xcit_ssl": json.dumps(self.to_metadata_entry())}


def find_record(obj: Any, metadata: Mapping[str, str], origin: str | Path) -> BackboneRecord | None:
    """The record of an opened file: its metadata entry (safetensors, sidecar) first, else
    ``obj["xcit_ssl"]`` of a torch checkpoint; None when it holds neither."""
    record = BackboneRecord.from_metadata(metadata, origin)
    if record is None and isinstance(obj, Mapping):
        record = BackboneRecord.from_checkpoint_entry(obj.get("xcit_ssl"))
    return record


def read_record(source: str | Path | Mapping[str, Any]) -> BackboneRecord | None:
    """The record of a checkpoint or export file (or of an already loaded checkpoint dict).

    Reads training checkpoints, safetensors exports and ``.pth`` exports with their sidecar; None
    for files xcit-ssl did not write. Raises UserError for unreadable files and bad metadata.
    """
    if isinstance(source, Mapping):
        return find_record(source, {}, "the given checkpoint")
    obj, metadata = load_checkpoint_file(source)  # memory-mapped: cheap even for big checkpoints
    return find_record(obj, metadata, source)


# -- tolerant field parsing: a record written by hand or by an older version may lack any field


def _optional_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _optional_floats(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
    return None


def _as_list(values: tuple[float, ...] | None) -> list[float] | None:
    return list(values) if values is not None else None
