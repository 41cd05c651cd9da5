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
  the writers live in :mod:`xcit_ssl.export_formats`.

Every export is read back and compared with the model built from the checkpoint before it is
moved into place (temporary file + rename); nothing is written when that check fails.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import __version__
from .errors import UserError
from .export_formats import WRITERS
from .models.checkpoint_files import load_checkpoint_file
from .models.checkpoint_schemes import LAYOUTS, to_layout
from .models.checkpoints import load_backbone, load_backbone_weights
from .models.registry import create_backbone
from .models.xcit import XCiT

logger = logging.getLogger(__name__)

FORMATS: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors",),
    "pth": (".pth", ".pt"),  # not .bin: a name that says nothing of the format is refused, not guessed
    "pt2": (".pt2",),
    "onnx": (".onnx",),
    "torchscript": (".ts", ".torchscript", ".jit"),
}
TOLERANCE = 1e-4  # max abs difference allowed between a pt2/ONNX/TorchScript export and the eager model
# constructor arguments that change the network; the rest (drop-path, head, img_size) do not matter
# to a frozen, headless backbone and would only make `timm.create_model` calls longer
_ARCH_KEYS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
              "cls_attn_layers", "use_pos_embed", "eta", "tokens_norm")  # fmt: skip
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

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` lines for the CLI table."""
        m = self.metadata
        knn = "; ".join(describe_knn(r) for r in _knn_entries(m["knn"]))
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        rows = [
            ("file", str(self.out)),
            ("format", f"{self.format}, {self.layout} keys" if self.format in ("safetensors", "pth") else self.format),
            ("backbone", f"{self.name} {m['overrides'] or ''}"),
            ("weights", f"{self.checkpoint_key} of {m['source']} (sha256 {m['source_sha256'][:12]})"),
            ("img_size / mean / std", f"{m['img_size']} / {m['mean']} / {m['std']}"), ("recipe", str(m["recipe"])),
            ("k-NN", knn or "none known"), ("max abs difference", f"{self.max_abs_diff:.3g} ({shapes})"),
        ]  # fmt: skip
        return rows + ([("metadata", str(self.sidecar))] if self.sidecar else [])


def _knn_entries(knn: Any) -> list[dict[str, Any]]:
    # exports written before the entries named their data kept a dict keyed by protocol name
    if isinstance(knn, dict):
        return [{"protocol": p, **r} for p, r in knn.items() if isinstance(r, dict)]
    return [r for r in knn or [] if isinstance(r, dict)]


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
                f"--format ({', '.join(FORMATS)})"
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


def training_entry(checkpoint: Path) -> dict[str, Any]:
    """The ``xcit_ssl`` record of our checkpoints and exports, flattened: ``name``, ``overrides``,
    ``method``, ``img_size``, ``mean``, ``std``, ``recipe`` (empty for foreign files)."""
    obj, metadata = load_checkpoint_file(checkpoint)
    if metadata.get("xcit_ssl"):
        try:
            entry = json.loads(metadata["xcit_ssl"])
        except json.JSONDecodeError as err:
            raise UserError(f"{checkpoint}: its 'xcit_ssl' metadata is not valid JSON ({err}); re-export it") from err
        return dict(entry) if isinstance(entry, dict) else {}
    entry = obj.get("xcit_ssl") if isinstance(obj, Mapping) else None
    if not isinstance(entry, Mapping):
        return {}
    flat = {k: v for k, v in entry.items() if k != "backbone"}
    backbone = entry.get("backbone") or {}
    flat.update(name=backbone.get("name"), overrides=dict(backbone.get("overrides") or {}))
    return flat


def _run_dir(checkpoint: Path) -> Path:
    # runs/<name>/checkpoints/last.ckpt -> runs/<name> (where `xcit-ssl knn` writes eval/*.json)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def find_knn_results(checkpoint: Path, sha256: str, checkpoint_key: str) -> list[dict[str, Any]] | None:
    """k-NN results of these exact weights, one entry per data set evaluated, or None.

    Each entry says what was run, never only a protocol name (``knn_imagenet`` run on a 4-class
    folder is not an ImageNet accuracy): ``protocol``, ``data`` (dataset kind, root, splits,
    ``num_train`` / ``num_val`` images evaluated, ``num_classes``), ``k``, ``top1``, ``top5``,
    ``temperature``, ``created``, ``result_file``. Read from the JSON files ``xcit-ssl knn``
    writes to ``<run>/eval/``; a result counts only when its weights' sha256 and checkpoint key
    match (a teacher's accuracy says nothing about the student). The headline k = 20 is taken,
    else the evaluated k closest to it; of the results on the same data, the newest wins.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((_run_dir(checkpoint) / "eval").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours, or being written: other files may still match
        weights = record.get("weights") if isinstance(record, dict) else None
        results = record.get("results") if isinstance(record, dict) else None
        if record.get("command") != "knn" or not isinstance(weights, dict) or not isinstance(results, dict):
            continue
        if weights.get("sha256") != sha256 or weights.get("checkpoint_key", "teacher") != checkpoint_key:
            continue
        ks = [k for k in results if str(k).isdigit() and isinstance(results[k], dict)]
        if not ks:
            continue
        k = min(ks, key=lambda s: (abs(int(s) - 20), int(s)))
        data = _evaluated_data(record)
        entry = {
            "protocol": str(record.get("protocol") or path.stem), "data": data,
            "k": int(k), "top1": float(results[k]["top1"]), "top5": float(results[k]["top5"]),
            "temperature": record.get("temperature"), "created": record.get("created"), "result_file": path.name,
        }  # fmt: skip
        same_data = json.dumps([entry["protocol"], data], sort_keys=True)
        if same_data not in found or str(entry["created"]) >= str(found[same_data]["created"]):
            found[same_data] = entry
    return sorted(found.values(), key=lambda e: str(e["created"])) or None


def _evaluated_data(record: dict[str, Any]) -> dict[str, Any]:
    """The data a k-NN record ran on, as far as the record says (older records say less)."""
    data = dict(record.get("data") or {})
    configured = (record.get("protocol_config") or {}).get("data") or {}
    for key in ("dataset", "root", "train_split", "val_split"):
        data.setdefault(key, configured.get(key))
    data.update(num_train=record.get("num_train"), num_val=record.get("num_test"), num_classes=record.get("num_classes"))
    return data


def describe_knn(entry: dict[str, Any]) -> str:
    """One line: the accuracy and what it was measured on (protocol, data set, images, classes)."""
    data = entry.get("data") or {}
    where = " ".join(str(v) for v in (data.get("dataset"), data.get("root")) if v) or "unknown data"
    size = f"{data.get('num_train')} train / {data.get('num_val')} val images"
    classes = f", {data['num_classes']} classes" if data.get("num_classes") else ""
    return (f"top-1 {entry['top1']:.2f} %, top-5 {entry['top5']:.2f} % (k={entry['k']}) on {where}: "
            f"{size}{classes}; protocol {entry.get('protocol')}")  # fmt: skip


def _source_sha256(checkpoint: Path) -> str:
    from .evaluation.features import sha256_file  # noqa: PLC0415 - pulls in Lightning

    # share the digest index `xcit-ssl knn` keeps, so a multi-GB checkpoint is hashed once
    index = _run_dir(checkpoint) / "eval" / "feature_cache" / "sha256_index.json"
    return sha256_file(checkpoint, index if index.is_file() else None)


def arch_overrides(model: XCiT) -> dict[str, Any]:
    """The constructor arguments that make ``model`` differ from its named variant."""
    build = getattr(model, "build_args", {}) or {}
    return {k: build[k] for k in _ARCH_KEYS if k in build}


# -- writing and reading back ------------------------------------------------------------------------


def _write_state_dict(model: XCiT, tmp: Path, fmt: str, meta: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    timm_keyed = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = to_layout(timm_keyed, meta["layout"])
    if fmt == "safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file(weights, str(tmp), metadata={"format": "pt", "xcit_ssl": json.dumps(meta)})
        reloaded = load_backbone(tmp)  # our loader, as a user would call it
    else:
        torch.save(weights, tmp)
        reloaded = create_backbone(meta["name"], num_classes=0, **meta["overrides"])
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
    fmt = resolve_format(out, format)
    _check_layout(layout, fmt, out)
    sidecar = None if fmt == "safetensors" else out.with_name(out.name + ".json")
    if checkpoint.exists() and out.exists() and out.resolve() == checkpoint.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file name")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'backbone.safetensors'}")
    existing = [p for p in (out, sidecar) if p is not None and p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --out")

    entry = training_entry(checkpoint)
    key = checkpoint_key or _DEFAULT_KEY.get(str(entry.get("method")), "teacher")
    try:
        model = load_backbone(checkpoint, checkpoint_key=key, name=backbone, num_classes=0).eval()
    except UserError as err:
        if backbone is None or backbone == entry.get("name") or "--backbone" in str(err):
            raise  # the loader's message already names --backbone
        raise UserError(f"--backbone {backbone} does not fit {checkpoint}: drop --backbone, or pass the "
                        f"checkpoint's variant. The loader says: {err}") from None  # fmt: skip
    name = str(model.variant_name)
    size = int(check_size or min(int(entry.get("img_size") or model.img_size), 224))
    if size < model.patch_size or size % model.patch_size:
        raise UserError(f"check size {size} is not a multiple of the patch size {model.patch_size}; pass --check_size")
    sha = _source_sha256(checkpoint)
    # re-exporting an export keeps its record: same weights, same accuracy
    knn = find_knn_results(checkpoint, sha, key) or entry.get("knn")
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    meta: dict[str, Any] = {
        "name": name, "overrides": arch_overrides(model),
        "img_size": int(entry.get("img_size") or model.img_size),
        "mean": [float(v) for v in entry.get("mean") or IMAGENET_MEAN],
        "std": [float(v) for v in entry.get("std") or IMAGENET_STD],
        "recipe": entry.get("recipe"), "method": entry.get("method"), "checkpoint_key": key,
        "source": checkpoint.name, "source_sha256": sha, "knn": knn,
        "embed_dim": model.embed_dim, "patch_size": model.patch_size,
        "output": "normalised CLS features [B, D] of images [B, 3, H, W] (H, W multiples of patch_size)",
        # no timestamp: the same checkpoint gives the same export
        "format": fmt, "layout": layout, "xcit_ssl_version": __version__,
    }  # fmt: skip
    shapes = check_shapes(size, model.patch_size, model.arch_args.get("in_chans", 3))

    out.parent.mkdir(parents=True, exist_ok=True)
    # the suffix last: torch.export.save and .load insist on a name that ends in .pt2
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".tmp{out.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
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
            _write_json_atomic(sidecar, meta)
        _umask_permissions(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        out=out, format=fmt, name=name, checkpoint_key=key, metadata=meta, num_tensors=len(model.state_dict()),
        max_abs_diff=diff, checked_shapes=[tuple(s) for s in shapes], sidecar=sidecar, layout=layout,
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


def _umask_permissions(path: Path) -> None:
    # mkstemp creates 0600 files; an export is meant to be shared like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    _umask_permissions(Path(tmp))
    os.replace(tmp, path)


# -- command line ----------------------------------------------------------------------------------------


def _build_parser() -> Any:
    from jsonargparse import ArgumentParser  # noqa: PLC0415

    parser = ArgumentParser(
        prog="xcit-ssl export", default_meta=False,
        description="Export one backbone of a checkpoint (the DINO teacher by default) without its head. With "
        "timm's key names (--layout timm) it loads with timm.create_model(name, num_classes=0) + "
        "load_state_dict(strict=True); --layout official / dino write the keys of the official XCiT code and of "
        "DINO's checkpoints. Every layout loads with xcit_ssl.load_backbone(path). To deploy, export the network "
        "as *.pt2 (torch.export: torch.export.load(path).module()) or *.onnx: it takes images [B, 3, H, W] (any "
        "batch, H and W multiples of the patch size) and returns the normalised CLS features [B, D]. TorchScript "
        "(*.ts) is kept as a legacy format: it is deprecated upstream in favour of torch.export.",
    )  # fmt: skip
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="training checkpoint (*.ckpt), export, or timm / official / DINO / mmpretrain file")
    parser.add_argument("--out", type=str, required=True,
                        help="output file: *.safetensors (weights, the default), *.pth (torch.save weights), "
                        "*.pt2 (torch.export program, recommended for deployment), *.onnx, *.ts (TorchScript, legacy); "
                        "another suffix needs --format")
    parser.add_argument("--format", type=Optional[str], default=None,
                        help=f"one of {', '.join(FORMATS)} (default: from the --out suffix)")
    parser.add_argument("--checkpoint_key", type=Optional[str], default=None,
                        help="teacher (DINO default) or student; backbone (supervised default) or ema")
    parser.add_argument("--backbone", type=Optional[str], default=None,
                        help="variant name for files that do not record it, e.g. xcit_small_12_p16_224")
    parser.add_argument("--check_size", type=Optional[int], default=None,
                        help="image side of the read-back check (default: training size, at most 224)")
    parser.add_argument("--layout", type=str, default="timm",
                        help="state-dict keys: timm (default), official (facebookresearch/xcit and its detection/"
                        "segmentation backbones) or dino (DINO's eval_knn.py/eval_linear.py, --checkpoint_key teacher;"
                        " .pth only). Those tools load with strict=False: pick their layout, or weights stay random")
    parser.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False,
                        help="replace an existing --out (a bare --overwrite means true)")
    return parser


def export_main(argv: list[str]) -> int:
    """``xcit-ssl export``: write the export, print what was written. Returns 0."""
    cfg = _build_parser().parse_args(argv)
    report = export_backbone(
        cfg.checkpoint, cfg.out, checkpoint_key=cfg.checkpoint_key, format=cfg.format, overwrite=cfg.overwrite,
        check_size=cfg.check_size, backbone=cfg.backbone, layout=cfg.layout,
    )  # fmt: skip
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="xcit-ssl export", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column(overflow="fold")
    for label, value in report.rows():
        table.add_row(label, value)
    Console().print(table)
    return 0
