"""``xcit-ssl attention`` and ``xcit-ssl plot``: parse, check everything, compute, then write.

``attention`` loads the weights the way ``knn``/``linear`` do (``--checkpoint``, ``--weights
--backbone``, ``--random_init NAME``; see :mod:`xcit_ssl.evaluation.commands`), decodes every
image and loads the checkpoint before it creates anything, so a bad image, a non-XCiT checkpoint
or an occupied ``--out`` folder stops it with nothing written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from jsonargparse import ArgumentParser, Namespace

from .. import __version__
from ..errors import UserError
from ..files import check_writable

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _attention_parser() -> ArgumentParser:
    from .weights_flags import add_weights_arguments  # noqa: PLC0415 - torch and Lightning: attention only, not plot

    parser = ArgumentParser(
        prog="xcit-ssl attention", default_meta=False,
        description="CLS-to-patch attention of an XCiT class-attention block, per head, with DINO's "
        "thresholded masks, as one PNG sheet per image (row 1: input, mean, heads; row 2: masks) "
        "plus the raw maps as .npy; --pca adds DINOv2-style patch-feature PCA sheets.",
    )  # fmt: skip
    add_weights_arguments(parser, "a randomly initialised backbone of this variant (seed 0): what maps look like "
                                  "before any training, e.g. xcit_nano_12_p8_224")
    parser.add_argument("--checkpoint_key", type=str, default="teacher",
                        help="which network of a training checkpoint: teacher (what DINO shows) or student")
    parser.add_argument("--images", type=str, nargs="+", required=True,
                        help="image files and/or folders (searched recursively for .png/.jpg/...)")
    parser.add_argument("--out", type=str, required=True, help="output folder (must be new or empty, or --overwrite)")
    parser.add_argument("--block", type=int, default=-1,
                        help="class-attention block to read (XCiT has 2: 0 or 1; -1 = the last)")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="masks keep the fewest patches holding this share of a head's attention (DINO: 0.6)")
    parser.add_argument("--img_size", type=Optional[int], default=None,
                        help="shorter side after resizing (default: the checkpoint's training size, else the "
                             "variant's); each side is then cropped to a multiple of the patch size")  # fmt: skip
    parser.add_argument("--mean", type=Optional[list[float]], default=None,
                        help="normalisation mean (default: the checkpoint's, else ImageNet's)")
    parser.add_argument("--std", type=Optional[list[float]], default=None,
                        help="normalisation std (default: the checkpoint's, else ImageNet's)")
    parser.add_argument("--pca", action="store_true",
                        help="also draw the PCA of the last XCA block's patch tokens, fitted over all the images")
    parser.add_argument("--fg_threshold", type=Optional[float], default=None,
                        help="PCA: foreground = patches whose first component, scaled to 0..1, exceeds this "
                             "(default: its mean over all patches)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass (same-size images only)")
    return parser


def _output_names(paths: list[Path]) -> list[str]:
    """A distinct file stem per image: its own stem, ``_2``, ``_3``... when two share one."""
    names, seen = [], {}
    for p in paths:
        stem = p.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _load_backbone(cfg: Namespace) -> tuple[torch.nn.Module, Path, dict[str, Any]]:
    """(backbone in eval mode, the weight file, the training stats it records) - via knn's path."""
    from ..evaluation.weights import training_stats  # noqa: PLC0415 - one loading path
    from ..models.checkpoints import load_backbone, read_state_dict  # noqa: PLC0415
    from .weights_flags import weights_from_flags  # noqa: PLC0415

    source = weights_from_flags(cfg)
    try:
        backbone = load_backbone(str(source), checkpoint_key=cfg.checkpoint_key, name=cfg.backbone, num_classes=0)
    except UserError:
        # say what matters here when the file is not an XCiT with class attention (e.g. a ViT)
        weights = read_state_dict(str(source), checkpoint_key=cfg.checkpoint_key)
        if not any(k.startswith("cls_attn_blocks.") for k in weights):
            start = ", ".join(list(weights)[:4])
            raise UserError(f"{source} has no XCiT class-attention blocks (no cls_attn_blocks.* keys; keys start: "
                            f"{start}), so there is no CLS-to-patch attention to draw: is it a ViT or another "
                            "architecture? Pass an XCiT checkpoint with --checkpoint or --weights"
                            ) from None  # fmt: skip
        raise
    return backbone.eval(), source, training_stats(source)


def attention_main(argv: list[str]) -> int:
    """``xcit-ssl attention``: write the sheets and maps of every image into ``--out``. Returns 0."""
    from ..analysis.images import collect_images, open_image, prepare_image  # noqa: PLC0415
    from ..analysis.output import check_out_dir, save_json, save_npy, save_png  # noqa: PLC0415
    from ..analysis.snapshot import analyse_images  # noqa: PLC0415
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    from ..devices import torch_device  # noqa: PLC0415

    cfg = _attention_parser().parse_args(argv)
    if not 0.0 < cfg.threshold <= 1.0:
        raise UserError(f"--threshold {cfg.threshold}: give the kept share of attention mass in (0, 1], e.g. 0.6")
    if cfg.fg_threshold is not None and not 0.0 <= cfg.fg_threshold < 1.0:
        raise UserError(f"--fg_threshold {cfg.fg_threshold}: give a value in [0, 1), e.g. 0.5")
    for flag in ("mean", "std"):
        value = getattr(cfg, flag)
        if value is not None and (len(value) != 3 or (flag == "std" and min(value) <= 0)):
            raise UserError(f"--{flag} {value}: give three per-channel values (RGB, 0..1 scale), "
                            "e.g. [0.485, 0.456, 0.406]")  # fmt: skip
    out = Path(cfg.out).expanduser()
    check_out_dir(out, cfg.overwrite)
    check_writable(out, "--out")
    paths = collect_images(cfg.images)
    pil_images = [open_image(p) for p in paths]  # every image decodes, or nothing is written
    device = torch_device(cfg.device)
    backbone, source, stats = _load_backbone(cfg)
    from ..analysis.attention import resolve_block  # noqa: PLC0415

    block = resolve_block(backbone, cfg.block)
    img_size = int(cfg.img_size or stats.get("img_size") or backbone.img_size)
    mean = [float(v) for v in (cfg.mean or stats.get("mean") or IMAGENET_MEAN)]
    std = [float(v) for v in (cfg.std or stats.get("std") or IMAGENET_STD)]
    prepared = [prepare_image(img, img_size, backbone.patch_size, mean, std, p) for img, p in zip(pil_images, paths)]
    backbone.to(device)
    results = analyse_images(backbone, [p.tensor for p in prepared], [p.pixels for p in prepared], block=block,
                             threshold=cfg.threshold, pca=cfg.pca, fg_threshold=cfg.fg_threshold,
                             batch_size=max(1, cfg.batch_size))  # fmt: skip

    index: dict[str, Any] = {
        "xcit_ssl_version": __version__, "weights": str(source.resolve()), "checkpoint_key": cfg.checkpoint_key,
        "backbone": getattr(backbone, "variant_name", cfg.backbone), "block": block,
        "class_attention_blocks": len(backbone.cls_attn_blocks), "heads": int(results[0].attention.shape[0]),
        "threshold": cfg.threshold, "img_size": img_size, "mean": mean, "std": std, "pca": cfg.pca,
        "npy": "<name>_attention.npy: float32 [heads, Hp, Wp], the CLS query's softmax weights over the patches "
               "(the rest of each head's mass, cls_weight, is on the CLS token itself)",
        "images": [],
    }  # fmt: skip
    for name, prep, res in zip(_output_names(paths), prepared, results):
        files = [save_png(out / f"{name}_attention.png", res.attention_sheet),
                 save_npy(out / f"{name}_attention.npy", res.attention)]  # fmt: skip
        if res.pca_sheet is not None and res.pca_rgb is not None:
            files += [save_png(out / f"{name}_pca.png", res.pca_sheet), save_npy(out / f"{name}_pca.npy", res.pca_rgb)]
        index["images"].append({"source": str(prep.source), "size": list(prep.pixels.shape[1::-1]),
                                "grid": list(res.attention.shape[1:]), "cls_weight": res.cls_weight.tolist(),
                                "files": [f.name for f in files]})  # fmt: skip
    save_json(out / "attention.json", index)
    kinds = "attention + PCA sheets" if cfg.pca else "attention sheets"
    print(f"{len(results)} images -> {kinds} in {out} (block {block} of {len(backbone.cls_attn_blocks)}, "
          f"{index['heads']} heads, threshold {cfg.threshold:g}, img_size {img_size}, "
          f"weights {source.name})")  # fmt: skip
    return 0


def plot_main(argv: list[str]) -> int:
    """``xcit-ssl plot RUN_DIR [--out FILE]``: every logged metric's curve in one PNG. Returns 0."""
    from ..analysis.plot import plot_run  # noqa: PLC0415

    parser = ArgumentParser(prog="xcit-ssl plot", default_meta=False,
                            description="One PNG of a run's curves: every metric in RUN_DIR/metrics.csv, "
                                        "one subplot each, against the optimizer step.")  # fmt: skip
    parser.add_argument("run_dir", type=str, help="a run folder written by `xcit-ssl fit` (or its metrics.csv)")
    parser.add_argument("--out", type=Optional[str], default=None, help="PNG path (default RUN_DIR/curves.png)")
    cfg = parser.parse_args(argv)
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:
        check_writable(out.parent, "--out", out)
    target, names = plot_run(cfg.run_dir, cfg.out)
    print(f"{len(names)} metrics -> {target}: {', '.join(names)}")
    return 0
