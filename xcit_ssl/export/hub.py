"""``xcit-ssl export --format hub``: a folder in timm's Hugging Face Hub layout.

::

    DIR/config.json        timm's own (``save_config_for_hf``, as ``push_to_hf_hub`` writes it):
                           architecture, num_classes 0, num_features, model_args (the overrides
                           and img_size: a 3-block XCiT at 32 px rebuilds as such), pretrained_cfg
                           (mean, std, input_size, crop_pct, interpolation of these weights)
    DIR/model.safetensors  the timm-layout safetensors export of :func:`.export_backbone`
    DIR/README.md          the model card (:mod:`.card`): what these weights are and measured

It loads with ``timm.create_model("local-dir:DIR", pretrained=True)`` and, once uploaded with the
Hub's own client (``hf upload user/name DIR``), with ``timm.create_model("hf-hub:user/name",
pretrained=True)``. The folder is written beside ``DIR`` under a temporary name, loaded exactly
so by timm (strictly: every key of the model from the file, none left over) and compared with
the checkpoint's backbone on fixed inputs, and only then renamed into place
(:func:`xcit_ssl.files.atomic_dir`); when any of that fails, nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..console import quiet_loggers
from ..errors import UserError
from ..files import atomic_dir, atomic_path, check_writable, write_text
from .backbone import FORMATS, TOLERANCE, ExportReport, export_backbone, max_difference
from .card import render_card
from .provenance import describe_knn, describe_linear, knn_entries

logger = logging.getLogger(__name__)

HUB_FILES = ("config.json", "model.safetensors", "README.md")
# pretrained_cfg entries of timm's variant that describe its own (Facebook's ImageNet) weights, not ours
_SOURCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "test_input_size",
                "test_crop_pct", "test_pool_size", "label_names", "label_descriptions")  # fmt: skip
# DINO's evaluation transform (resize 256, center crop 224), when no recorded result says otherwise
_DEFAULT_CROP_PCT, _DEFAULT_INTERPOLATION = 224 / 256, "bicubic"
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class HubReport:
    """What :func:`export_hub` wrote and how timm read it back."""

    out: Path
    export: ExportReport
    config: dict[str, Any]
    max_abs_diff: float
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)
    repo_id: str | None = None

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` lines for the CLI table."""
        m = self.export.metadata
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        knn = "; ".join(describe_knn(r) for r in knn_entries(m["knn"]))
        linear = "; ".join(describe_linear(r) for r in m.get("linear") or [])
        repo = self.repo_id or "<user>/<name>"
        return [
            ("folder", f"{self.out} ({', '.join(HUB_FILES)})"),
            ("backbone", f"{self.export.name} {_args_text(self.config.get('model_args', {}))} (config.json model_args)"),
            ("weights", f"{self.export.checkpoint_key} of {m['source']} (sha256 {m['source_sha256'][:12]})"),
            ("mean / std / input", f"{m['mean']} / {m['std']} / {self.config['pretrained_cfg']['input_size']}"),
            ("k-NN", knn or "none known"), ("linear", linear or "none known"),
            ("timm check", f'create_model("local-dir:...", pretrained=True), strict: max abs difference '
                           f"{self.max_abs_diff:.3g} vs the checkpoint ({shapes})"),
            ("upload", f"hf upload {repo} {self.out}   (then timm.create_model(\"hf-hub:{repo}\", pretrained=True))"),
        ]  # fmt: skip


def export_hub(
    checkpoint: str | Path,
    out: str | Path,
    checkpoint_key: str | None = None,
    overwrite: bool = False,
    check_size: int | None = None,
    backbone: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
) -> HubReport:
    """Write ``out/`` (config.json, model.safetensors, README.md) from one backbone of ``checkpoint``.

    Args:
        checkpoint, checkpoint_key, check_size, backbone: as :func:`.export_backbone`.
        out: the folder; absent or empty, else replaced only with ``overwrite`` and only when it
            holds nothing but the files an export writes.
        license: the weights' license, a Hub identifier (``apache-2.0``, ``cc-by-nc-4.0``); None
            leaves it out (timm's variant names Facebook's weights' license, not these).
        repo_id: ``user/name`` the folder is meant for, used in the card's loading snippets.
    Raises UserError for bad input, a timm that cannot load ``local-dir:`` folders, and when timm
    does not load the folder strictly with the checkpoint's features; nothing is written then.
    """
    checkpoint, out = Path(checkpoint).expanduser(), Path(out).expanduser()
    if license is not None and not _LICENSE.match(license):
        raise UserError(f"--license {license!r} is not a Hub license identifier: use e.g. apache-2.0, mit, "
                        "cc-by-4.0 or other")  # fmt: skip
    if repo_id is not None and not _REPO_ID.match(repo_id):
        raise UserError(f"--repo_id {repo_id!r} is not a Hub repository id: give user/name, e.g. jane/xcit-nano-dino")
    _check_out(out, overwrite)
    if not checkpoint.exists():
        raise UserError(f"checkpoint not found: {checkpoint}; check --checkpoint (relative paths start at {Path.cwd()})")
    timm_hub = _timm_hub()
    check_writable(out.parent, "--out", out)

    with atomic_dir(out, replace=overwrite) as tmp:
        export = export_backbone(checkpoint, tmp / "model.safetensors", checkpoint_key=checkpoint_key,
                                 check_size=check_size, backbone=backbone)  # fmt: skip
        meta = export.metadata
        config = _write_config(meta, tmp / "config.json", _preprocessing(meta), license, timm_hub)
        reference = export.model  # the checkpoint's backbone, as export_backbone loaded it
        assert reference is not None
        params = sum(p.numel() for p in reference.parameters())
        write_text(tmp / "README.md", render_card(meta, config, params, out.name, license, repo_id))
        loaded = _load_with_timm(tmp, set(reference.state_dict()))
        shapes = [tuple(s) for s in export.checked_shapes]
        diff = max_difference(reference, loaded, shapes)
        logger.info("hub export: timm local-dir load, max abs difference %.3g vs the checkpoint", diff)
        if not diff <= TOLERANCE:  # also catches NaN
            raise UserError(
                f"timm's load of the hub folder differs from the checkpoint's backbone by {diff:.3g} (> {TOLERANCE:g}) "
                f"on inputs {shapes}; nothing was written. Export as safetensors, or report this with the variant "
                f"{export.name} and timm {_timm_version()}"
            )  # fmt: skip
        _check_data_config(loaded, meta)
    export = dataclasses.replace(export, out=out / "model.safetensors")
    return HubReport(out=out, export=export, config=config, max_abs_diff=diff, checked_shapes=shapes, repo_id=repo_id)


# -- the folder ------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder with files unless ``--overwrite`` replaces an export."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file; --format hub writes a folder: give a folder path (absent or empty)")
    if any(out.suffix.lower() in suffixes for suffixes in FORMATS.values()):
        raise UserError(f"--out {out} names a {out.suffix} file, but --format hub writes a folder (config.json, "
                        f"model.safetensors, README.md): pass a folder such as {out.with_suffix('')}, or drop --format hub")
    if not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir())
    if not held:
        return
    if not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}; pass "
                        "--overwrite to replace the export in it, or choose another (absent or empty) folder")  # fmt: skip
    foreign = [n for n in held if n not in HUB_FILES]
    if foreign:
        raise UserError(f"--out {out} holds files an export does not write ({', '.join(foreign[:5])}): --overwrite "
                        "replaces a whole export folder and would delete them; choose another folder")  # fmt: skip


# -- config.json -----------------------------------------------------------------------------------


def _timm_hub() -> Any:
    """timm's ``models._hub`` when it reads ``local-dir:`` folders, else a UserError naming the fix."""
    import timm.models._hub as timm_hub  # noqa: PLC0415

    if not (hasattr(timm_hub, "load_model_config_from_path") and hasattr(timm_hub, "save_config_for_hf")):
        raise UserError(f"--format hub needs a timm that loads local-dir: folders; timm {_timm_version()} does "
                        "not: pip install -U timm")  # fmt: skip
    return timm_hub


def _timm_version() -> str:
    import timm  # noqa: PLC0415

    return str(timm.__version__)


def _preprocessing(meta: dict[str, Any]) -> dict[str, Any]:
    """crop_pct and interpolation of the evaluation transform the card's results used, when they all
    used one (the numbers are reproduced with it); DINO's (224 of 256, bicubic) otherwise."""
    used = {
        (f.get("resize_size"), f.get("crop_size"), f.get("interpolation"))
        for entry in [*knn_entries(meta.get("knn")), *(meta.get("linear") or [])]
        for f in [entry.get("features") or {}]
    }  # fmt: skip
    if len(used) == 1:
        resize, crop, interpolation = next(iter(used))
        if isinstance(resize, int) and isinstance(crop, int) and resize >= crop > 0 and interpolation:
            return {"crop_pct": round(crop / resize, 4), "interpolation": str(interpolation)}
    return {"crop_pct": _DEFAULT_CROP_PCT, "interpolation": _DEFAULT_INTERPOLATION}


def _write_config(meta: dict[str, Any], path: Path, preprocessing: dict[str, Any], license: str | None,
                  timm_hub: Any) -> dict[str, Any]:  # fmt: skip
    """config.json through timm's own ``save_config_for_hf`` on a weightless (meta-device) model of
    the variant, its pretrained_cfg describing these weights; returns what was written."""
    import json  # noqa: PLC0415

    import timm  # noqa: PLC0415

    model_args = {**meta["overrides"], "img_size": int(meta["img_size"]), "num_classes": 0}
    with torch.device("meta"):  # the configuration only: no memory, no initialisation
        model = timm.create_model(meta["name"], pretrained=False, **model_args)
    in_chans = int(meta["overrides"].get("in_chans", 3))
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in _SOURCE_KEYS}
    cfg.update(input_size=(in_chans, int(meta["img_size"]), int(meta["img_size"])), mean=tuple(meta["mean"]),
               std=tuple(meta["std"]), crop_mode="center", **preprocessing)  # fmt: skip
    if license:
        cfg["license"] = license
    model.pretrained_cfg = cfg
    with atomic_path(path) as tmp:
        timm_hub.save_config_for_hf(model, str(tmp), model_args=model_args)
        written = json.loads(tmp.read_text())
    return written


# -- reading it back as timm does ------------------------------------------------------------------


def _load_with_timm(folder: Path, expected_keys: set[str]) -> nn.Module:
    """``timm.create_model("local-dir:<folder>", pretrained=True)``, checked to hold every weight."""
    import timm  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with quiet_loggers("timm"):  # its notices would name the temporary folder, gone once renamed
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as err:  # noqa: BLE001 - timm fails in many ways (RuntimeError of a strict load, ...)
        raise UserError(f"timm {_timm_version()} could not load the hub folder ({type(err).__name__}: "
                        f"{str(err)[:300]}); nothing was written") from err  # fmt: skip
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    have = set(model.state_dict())
    if have != stored or have != expected_keys or getattr(model, "num_classes", None) != 0:
        missing, extra = sorted(have - stored), sorted(stored - have)
        raise UserError(f"timm's model from the hub folder does not match its weights (missing {missing[:5]}, "
                        f"unexpected {extra[:5]}, num_classes {getattr(model, 'num_classes', None)}); nothing was "
                        "written")  # fmt: skip
    return model.eval()


def _args_text(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in args.items())


def _check_data_config(model: nn.Module, meta: dict[str, Any]) -> None:
    """timm's data config of the loaded model normalises as the weights were trained."""
    from timm.data import resolve_data_config  # noqa: PLC0415

    data = resolve_data_config({}, model=model)
    size = int(meta["img_size"])
    if (list(map(float, data["mean"])) != list(map(float, meta["mean"])) or list(map(float, data["std"]))
            != list(map(float, meta["std"])) or tuple(data["input_size"][1:]) != (size, size)):  # fmt: skip
        raise UserError(f"timm reads the hub folder's preprocessing as {data}, not the weights' mean {meta['mean']}, "
                        f"std {meta['std']} at {size} px; nothing was written. Report this with timm {_timm_version()}")
