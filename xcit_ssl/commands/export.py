"""``xcit-ssl export``: parse, export (:func:`xcit_ssl.export.export_backbone`, or
:func:`xcit_ssl.export.export_hub` for ``--format hub``), print what was written."""

from __future__ import annotations

from typing import Any, Optional

from ..console import print_fields
from ..errors import UserError
from ..export import FORMATS, export_backbone, export_hub


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
        "(*.ts) is kept as a legacy format: it is deprecated upstream in favour of torch.export. --format hub --out DIR "
        "writes a Hugging Face Hub folder (config.json, model.safetensors, README.md model card) that loads with "
        "timm.create_model('local-dir:DIR', pretrained=True), and after `hf upload user/name DIR` with "
        "timm.create_model('hf-hub:user/name', pretrained=True).",
    )  # fmt: skip
    parser.add_argument("--checkpoint", type=str, required=True,
                        help="training checkpoint (*.ckpt), export, or timm / official / DINO / mmpretrain file")
    parser.add_argument("--out", type=str, required=True,
                        help="output file: *.safetensors (weights, the default), *.pth (torch.save weights), "
                        "*.pt2 (torch.export program, recommended for deployment), *.onnx, *.ts (TorchScript, legacy); "
                        "another suffix needs --format; with --format hub a folder (absent or empty)")
    parser.add_argument("--format", type=Optional[str], default=None,
                        help=f"one of {', '.join(FORMATS)} (default: from the --out suffix; hub: a Hugging Face "
                        "Hub folder in timm's layout)")
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
                        help="replace an existing --out (a bare --overwrite means true); with --format hub, a folder "
                        "holding only an earlier export's files")
    parser.add_argument("--license", type=Optional[str], default=None,
                        help="--format hub: the weights' license for the model card, a Hub identifier such as "
                        "apache-2.0 or cc-by-nc-4.0 (default: left out; it depends on your training data)")
    parser.add_argument("--repo_id", type=Optional[str], default=None,
                        help="--format hub: the Hub repository user/name the folder is for, used in the card's "
                        "loading snippets (default: <user>/<name>)")
    return parser


def export_main(argv: list[str]) -> int:
    """``xcit-ssl export``: write the export, print what was written. Returns 0."""
    cfg = _build_parser().parse_args(argv)
    if cfg.format == "hub":
        if cfg.layout != "timm":
            raise UserError(f"--layout {cfg.layout}: --format hub writes timm's keys, which timm loads; drop --layout")
        hub = export_hub(cfg.checkpoint, cfg.out, checkpoint_key=cfg.checkpoint_key, overwrite=cfg.overwrite,
                         check_size=cfg.check_size, backbone=cfg.backbone, license=cfg.license, repo_id=cfg.repo_id)  # fmt: skip
        print_fields("xcit-ssl export", hub.rows())
        return 0
    if cfg.license is not None or cfg.repo_id is not None:
        raise UserError("--license and --repo_id describe a Hugging Face Hub folder: add --format hub, or drop them")
    report = export_backbone(
        cfg.checkpoint, cfg.out, checkpoint_key=cfg.checkpoint_key, format=cfg.format, overwrite=cfg.overwrite,
        check_size=cfg.check_size, backbone=cfg.backbone, layout=cfg.layout,
    )  # fmt: skip
    print_fields("xcit-ssl export", report.rows())
    return 0
