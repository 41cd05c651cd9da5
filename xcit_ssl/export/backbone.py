"""``xcit-ssl export``: a frozen, headless backbone that loads anywhere.

One backbone of a checkpoint (the DINO teacher by default) is written without its head, with
timm's key names (``--layout timm``, the default), the official XCiT names (``official``: for
facebookresearch/xcit and its detection/segmentation backbones) or as a DINO checkpoint
(``dino``: ``{'teacher': {'backbone.<official key>': ...}}`` for DINO's eval_knn/eval_linear);
those tools load with ``strict=False``, so timm's names would leave weights at random there. As

- ``safetensors`` (default): in the timm layout, loads with ``timm.create_model(name,
  num_classes=0)`` + ``load_state_dict(strict=True)``; the metadata entry ``xcit_ssl`` (a JSON
  string) names the variant, its overrides, the key layout, the training image size, mean/std,
  recipe, the source's sha256 and the k-NN result when one is known;
- ``pth``: the same plain state dict through ``torch.save``, metadata in ``<out>.json``;
- ``pt2`` (``torch.export``, recommended for deployment with ``onnx``) / ``onnx`` /
  ``torchscript`` (legacy): the eval-mode network ``images [B, 3, H, W] -> features [B, D]``
  (normalised CLS) with dynamic batch and image size, metadata embedded and in ``<out>.json``;
  the writers live in :mod:`.formats`.

Every export is read back and compared with the model built from the checkpoint before it is
moved into place (temporary file + rename); nothing is written when that check fails.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import UserError
from ..files import atomic_path, check_writable, write_json
from ..models.checkpoint_schemes import LAYOUTS, to_layout
from ..console import quiet_loggers
from ..models.checkpoints import load_backbone, load_backbone_weights
from ..models.registry import create_backbone
from ..models.xcit import XCiT
from .formats import WRITERS
from ..models.record import BackboneRecord, arch_overrides, read_record
from .provenance import (
    describe_knn, describe_linear, find_knn_results, find_linear_results, knn_entries, source_sha256, training_facts,
)  # fmt: skip

logger = logging.getLogger(__name__)

FORMATS: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors",),
    "pth": (".pth", ".pt"),  # not .bin: a name that says nothing of the format is refused, not guessed
    "pt2": (".pt2",),
    "onnx": (".onnx",),
    "torchscript": (".ts", ".torchscript", ".jit"),
    "hub": (),  # a folder in the Hugging Face Hub layout: xcit_ssl.export.hub.export_hub
}
TOLERANCE = 1e-4  # max abs difference allowed between a pt2/ONNX/TorchScript export and the eager model
_DEFAULT_KEY = {"dino": "teacher", "supervised": "backbone", "distilled": "backbone"}


@dataclass
class ExportReport:
    """What :func:`export_backbone` wrote and how it was checked."""

    out: Path
    format: str
    name: str
    checkpoint_key: str
    metadata: dict[str, Any]
    num_tensors: int
    max_abs_diff: float
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)
    sidecar: Path | None = None
    layout: str = "timm"
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the exported backbone, eval mode

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` lines for the CLI table."""
        m = self.metadata
        knn = "; ".join(describe_knn(r) for r in knn_entries(m["knn"]))
        linear = "; ".join(describe_linear(r) for r in m.get("linear") or [])
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        rows = [
            ("file", str(self.out)),
            ("format", f"{self.format}, {self.layout} keys" if self.format in ("safetensors", "pth") else self.format),
            ("backbone", f"{self.name} {m['overrides'] or ''}"),
            ("weights", f"{self.checkpoint_key} of {m['source']} (sha256 {m['source_sha256'][:12]})"),
            ("img_size / mean / std", f"{m['img_size']} / {m['mean']} / {m['std']}"), ("recipe", str(m["recipe"])),
            ("k-NN", knn or "none known"), ("linear", linear or "none known"),
            ("max abs difference", f"{self.max_abs_diff:.3g} ({shapes})"),
        ]  # fmt: skip
        return rows + ([("metadata", str(self.sidecar))] if self.sidecar else [])


# -- what to export --------------------------------------------------------------------------------


def resolve_format(out: Path, format: str | None) -> str:
    """The export format from ``format`` or, when None, from the file name's suffix."""
    suffix = out.suffix.lower()
    by_suffix = next((f for f, sfx in FORMATS.items() if suffix in sfx), None)
    if format is None:
        if by_suffix is None:
            raise UserError(
                f"cannot tell the export format from the name {out.name!r}: end it in .safetensors (weights), "
                f".pth (torch.save weights), .pt2 (torch.export program) or .onnx, or keep the name and pass "
                f"--format ({', '.join(FORMATS)}; hub: a Hugging Face Hub folder)"
            )
        return by_suffix
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if by_suffix is not None and by_suffix != format and not (format == "torchscript" and suffix == ".pt"):
        raise UserError(
            f"--format {format} does not match the file name {out.name!r} (a {by_suffix} name); "
            f"name it *{FORMATS[format][0]} or drop --format"
        )
    return format


# -- writing and reading back ------------------------------------------------------------------------


def _write_state_dict(model: XCiT, tmp: Path, fmt: str, meta: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    timm_keyed = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = to_layout(timm_keyed, meta["layout"])
    if fmt == "safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file(weights, str(tmp), metadata={"format": "pt", "xcit_ssl": json.dumps(meta)})
        with quiet_loggers("xcit_ssl.models.checkpoints"):  # its line would name the temporary file
            reloaded = load_backbone(tmp)  # our loader, as a user would call it
    else:
        torch.save(weights, tmp)
        reloaded = create_backbone(meta["name"], num_classes=0, **meta["overrides"])
        with quiet_loggers("xcit_ssl.models.checkpoints"):
            load_backbone_weights(reloaded, tmp)  # strict: any key that did not round-trip is an error
    reloaded.eval()
    return reloaded


def check_shapes(size: int, patch: int, in_chans: int = 3) -> list[tuple[int, int, int, int]]:
    """Two inputs that exercise the dynamic axes: a batch of 2 at ``size``, and one non-square image."""
    return [(2, in_chans, size, size), (1, in_chans, size + patch, size + 2 * patch)]


@torch.no_grad()
def max_difference(reference: nn.Module, candidate: Callable[[Tensor], Tensor], shapes: list[tuple[int, ...]]) -> float:
    """Largest abs difference of ``[B, D]`` features on seeded random inputs of each shape."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        images = torch.randn(shape, generator=gen)
        worst = max(worst, float((candidate(images).float() - reference(images).float()).abs().max()))
    return worst


# -- the export ----------------------------------------------------------------------------------------


def export_backbone(
    checkpoint: str | Path,
    out: str | Path,
    checkpoint_key: str | None = None,
    format: str | None = None,
    overwrite: bool = False,
    check_size: int | None = None,
    backbone: str | None = None,
    layout: str = "timm",
) -> ExportReport:
    """Export one backbone of ``checkpoint`` (any scheme the loader reads) to ``out``.

    Args:
        checkpoint: a training checkpoint, an export, or a timm / official / DINO / mmpretrain file.
        out: the file to write; ``<out>.json`` too for pth/pt2/onnx/torchscript.
        checkpoint_key: which network: ``teacher`` (the default for DINO), ``student``,
            ``backbone`` (the default for supervised/distilled runs) or ``ema``.
        format: safetensors, pth, pt2, onnx or torchscript (legacy); None picks it from the suffix of ``out``.
        overwrite: replace an existing ``out`` (atomically); otherwise it is refused.
        check_size: image side for the read-back check (default: the training size, at most 224).
        backbone: the variant name, for files that do not record it.
        layout: the state-dict keys of safetensors/pth exports: ``timm``, ``official`` or ``dino``
            (pth only; see the module docstring). Recorded in the metadata as ``layout``.
    Raises UserError for bad input (not a checkpoint, truncated, another variant, unknown format,
    an existing output) and when an export's features differ from the eager model's by more
    than 1e-4.
    """
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if format == "hub":
        raise UserError("--format hub writes a folder: xcit_ssl.export.export_hub, not export_backbone")
    fmt = resolve_format(out, format)
    _check_layout(layout, fmt, out)
    sidecar = None if fmt == "safetensors" else out.with_name(out.name + ".json")
    if checkpoint.exists() and out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'backbone.safetensors'}, "
                        "or pass --format hub to write a Hugging Face Hub folder")
    existing = [p for p in (out, sidecar) if p is not None and p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --out")
    check_writable(out.parent, "--out", out)  # before the loading, hashing and read-back check, not after

    source_record = read_record(checkpoint) or BackboneRecord()
    key = checkpoint_key or _DEFAULT_KEY.get(str(source_record.method), "teacher")
    try:
        model = load_backbone(checkpoint, checkpoint_key=key, name=backbone, num_classes=0).eval()
    except UserError as err:
        if backbone is None or backbone == source_record.architecture or "--backbone" in str(err):
            raise  # the loader's message already names --backbone
        raise UserError(f"--backbone {backbone} does not fit {checkpoint}: drop --backbone, or pass the "
                        f"checkpoint's variant. The loader says: {err}") from None  # fmt: skip
    name = str(model.variant_name)
    size = int(check_size or min(int(source_record.img_size or model.img_size), 224))
    if size < model.patch_size or size % model.patch_size:
        raise UserError(f"check size {size} is not a multiple of the patch size {model.patch_size}; pass --check_size")
    sha = source_sha256(checkpoint)
    # re-exporting an export keeps its record: same weights, same accuracy
    knn = find_knn_results(checkpoint, sha, key) or source_record.extra.get("knn")
    linear = find_linear_results(checkpoint, sha, key) or source_record.extra.get("linear")
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    record = BackboneRecord(
        architecture=name, overrides=arch_overrides(getattr(model, "build_args", {}) or {}),
        img_size=int(source_record.img_size or model.img_size), mean=source_record.mean or tuple(IMAGENET_MEAN),
        std=source_record.std or tuple(IMAGENET_STD), recipe=source_record.recipe, method=source_record.method,
        extra={
            "checkpoint_key": key, "source": checkpoint.name, "source_sha256": sha, "knn": knn, "linear": linear,
            "training": training_facts(checkpoint, source_record),
            "embed_dim": model.embed_dim, "patch_size": model.patch_size,
            "output": "normalised CLS features [B, D] of images [B, 3, H, W] (H, W multiples of patch_size)",
            # no timestamp: the same checkpoint gives the same export
            "format": fmt, "layout": layout, "xcit_ssl_version": __version__,
        },
    )  # fmt: skip
    meta = record.to_metadata_entry()
    shapes = check_shapes(size, model.patch_size, model.arch_args.get("in_chans", 3))

    # the suffix kept: torch.export.save and .load insist on a name that ends in .pt2
    with atomic_path(out, keep_suffix=True) as tmp:
        example = torch.randn(shapes[0], generator=torch.Generator().manual_seed(1))
        if fmt in ("safetensors", "pth"):
            exported = _write_state_dict(model, tmp, fmt, meta)
        else:
            exported = WRITERS[fmt](model, tmp, example, meta)
        diff = max_difference(model, exported, shapes)
        logger.info("%s export: max abs difference %.3g vs the eager model", fmt, diff)
        if not diff <= TOLERANCE:  # also catches NaN
            raise UserError(
                f"the {fmt} export differs from the eager model by {diff:.3g} (> {TOLERANCE:g}) on inputs "
                f"{shapes}; nothing was written. Export as safetensors, or report this with the variant {name}"
            )
        if sidecar is not None:
            write_json(sidecar, meta)
    return ExportReport(
        out=out, format=fmt, name=name, checkpoint_key=key, metadata=meta, num_tensors=len(model.state_dict()),
        max_abs_diff=diff, checked_shapes=[tuple(s) for s in shapes], sidecar=sidecar, layout=layout, model=model,
    )  # fmt: skip


def _check_layout(layout: str, fmt: str, out: Path) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout != "timm" and fmt not in ("safetensors", "pth"):
        raise UserError(f"--layout {layout} names state-dict keys; a {fmt} export has none: drop --layout")
    if layout == "dino" and fmt == "safetensors":
        raise UserError(
            f"--layout dino nests the weights under 'teacher' as DINO's checkpoints do, which safetensors "
            f"cannot hold: name the output {out.with_suffix('.pth').name}"
        )
