"""The model card (``README.md``) of a Hugging Face Hub export, written from what xcit-ssl knows.

Front matter as the Hub reads it (``library_name: timm``, ``pipeline_tag``, ``tags``, ``license``
when one was given), then: the variant and its overrides, the method, recipe and network the
weights come from, the training data and length the checkpoint records, the k-NN and linear-probe
results measured on exactly these weights (protocol, data, image counts, features), and how to load
them with timm and with xcit-ssl. What the source does not record is said to be unknown; no
number from anywhere else (a recipe's comment, another checkpoint) enters the card.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from .provenance import knn_entries

_METHODS = {"dino": "DINO (self-supervised self-distillation)", "supervised": "supervised classification",
            "distilled": "knowledge distillation from a teacher network"}  # fmt: skip
_METHOD_TAGS = {"dino": ["dino", "self-supervised"], "distilled": ["distillation"], "supervised": []}
_NETWORK = {"teacher": "the teacher network (DINO's evaluated network, an EMA of the student)",
            "student": "the student network", "backbone": "the trained backbone",
            "ema": "the EMA of the trained backbone"}  # fmt: skip
UNKNOWN = "not recorded"


def render_card(meta: dict[str, Any], config: dict[str, Any], params: int, folder: str, license: str | None,
                repo_id: str | None) -> str:  # fmt: skip
    """The card's text. ``meta``: the export record (:func:`.export_backbone`'s metadata);
    ``config``: the config.json written; ``params``: the backbone's parameter count; ``folder``:
    the export folder's name; ``license`` / ``repo_id``: as given to ``export_hub``."""
    method = str(meta.get("method") or "")
    tags = ["image-feature-extraction", "timm", "xcit", "xcit-ssl", *_METHOD_TAGS.get(method, [])]
    front = ["---", "tags:", *(f"- {t}" for t in tags), "library_name: timm", "pipeline_tag: image-feature-extraction"]
    front += [f"license: {license}"] if license else []
    front.append("---")
    name, dim = meta["name"], meta.get("embed_dim") or config.get("num_features")
    overrides = _overrides(meta)
    title = repo_id.split("/")[-1] if repo_id else folder  # as timm's own cards: the repository's name
    lines = [
        *front, f"# Model card for {title}", "",
        f"An XCiT backbone, timm's `{name}`{f' with {overrides}' if overrides else ''}, trained with "
        f"{_METHODS.get(method, method or 'an unrecorded method')} by xcit-ssl. The weights are the backbone "
        f"alone (`num_classes: 0`, no head): the model returns the normalised CLS token, features `[B, {dim}]`.",
        "", "## Model details", "", *_details(meta, config, params, overrides), "",
        "## Evaluation", "", *_evaluation(meta), "",
        "## How to use", "", *_usage(meta, folder, repo_id, dim), "",
    ]  # fmt: skip
    return "\n".join(lines)


def _overrides(meta: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (meta.get("overrides") or {}).items())


def _details(meta: dict[str, Any], config: dict[str, Any], params: int, overrides: str) -> list[str]:
    cfg = config.get("pretrained_cfg", {})
    size = "x".join(str(v) for v in cfg.get("input_size", ()))
    training = meta.get("training") or {}
    return [
        f"- **Architecture:** `{meta['name']}` (timm){f', overrides {overrides}' if overrides else ''} "
        f"(config.json `model_args`: {config.get('model_args', {})}); {params / 1e6:.2f} M parameters, "
        f"patch {meta.get('patch_size')}",
        f"- **Input:** {size}, mean {cfg.get('mean')}, std {cfg.get('std')}, {cfg.get('interpolation')} "
        f"resize, crop_pct {cfg.get('crop_pct')} (pretrained_cfg; timm's `resolve_data_config` reads it)",
        f"- **Method:** {_METHODS.get(str(meta.get('method')), meta.get('method') or UNKNOWN)}; weights: "
        f"{_NETWORK.get(str(meta.get('checkpoint_key')), meta.get('checkpoint_key'))}",
        f"- **Recipe:** {meta.get('recipe') or UNKNOWN}",
        f"- **Training data:** {_train_data(training.get('data'))}",
        f"- **Training length:** {_length(training)}",
        f"- **Trained at:** {meta.get('img_size')} px",
        f"- **Source:** `{meta.get('source')}` (sha256 `{meta.get('source_sha256')}`), "
        f"exported by xcit-ssl {meta.get('xcit_ssl_version') or __version__}",
        f"- **License:** {cfg.get('license') or 'not stated by the exporter'}",
    ]  # fmt: skip


def _train_data(data: dict[str, Any] | None) -> str:
    if not data:
        return UNKNOWN
    where = " at ".join(f"`{v}`" if i else str(v) for i, v in enumerate((data.get("dataset"), data.get("root"))) if v)
    split = f", split `{data['train_split']}`" if data.get("train_split") else ""
    count = f"{data['num_images']:,} images" if isinstance(data.get("num_images"), int) else f"image count {UNKNOWN}"
    pad = (f", zero-padded to {data['pad_to']} px (`--data.pad_to`): pad your images the same way rather than"
           " resize them") if data.get("pad_to") else ""  # fmt: skip
    return f"{where or 'data set ' + UNKNOWN}{split}, {count}{pad}"


def _length(training: dict[str, Any]) -> str:
    if not training:
        return UNKNOWN
    parts = [f"{training['steps']:,} optimizer steps"]
    if training.get("epochs") is not None:
        epochs = training["epochs"]
        parts.append(f"{epochs:g} epoch{'' if epochs == 1 else 's'} of {training['steps_per_epoch']:,} steps")
    if training.get("global_batch"):
        parts.append(f"global batch {training['global_batch']}")
    return ", ".join(parts)


def _cell(value: Any) -> str:
    return "–" if value is None else str(value).replace("|", "\\|")


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _cell(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{float(value):.2f}"


def _data(entry: dict[str, Any]) -> list[str]:
    data, feats = entry.get("data") or {}, entry.get("features") or {}
    where = " ".join(str(v) for v in (data.get("dataset"), data.get("root")) if v) or UNKNOWN
    splits = "/".join(str(data[k]) for k in ("train_split", "val_split") if data.get(k))
    view = f"{feats.get('pooling') or 'cls'}, {feats.get('resize_size')}→{feats.get('crop_size')} px {feats.get('interpolation')}"
    return [_cell(entry.get("protocol")), _cell(f"{where} ({splits})" if splits else where),
            f"{_count(data.get('num_train'))} / {_count(data.get('num_val'))}", _cell(data.get("num_classes")), _cell(view)]  # fmt: skip


def _evaluation(meta: dict[str, Any]) -> list[str]:
    knn, linear = knn_entries(meta.get("knn")), list(meta.get("linear") or [])
    if not knn and not linear:
        return ["No k-NN or linear-probe result of these weights was recorded when they were exported (run "
                "`xcit-ssl knn` / `xcit-ssl linear` on the checkpoint, then export again)."]  # fmt: skip
    lines = ["Measured by `xcit-ssl knn` / `xcit-ssl linear` on exactly these weights (results of other weights, "
             "or of the checkpoint's other network, are not listed); data as evaluated (train = the k-NN memory "
             "bank or the probe's training images, val = the images scored); features: pooling, resize→crop, "
             "interpolation. Top-5 is – with 5 classes or fewer.", ""]  # fmt: skip
    head = "| protocol | data (splits) | train / val images | classes | features |"
    if knn:
        lines += ["Weighted k-NN (cosine, exp(sim/T) votes, frozen features):", "",
                  head + " k | T | top-1 % | top-5 % |", "|" + "---|" * 9]  # fmt: skip
        lines += ["| " + " | ".join([*_data(e), _cell(e.get("k")), _cell(e.get("temperature")), _pct(e["top1"]),
                                     _pct(e.get("top5"))]) + " |" for e in knn]  # fmt: skip
        lines.append("")
    if linear:
        lines += ["Linear probe on frozen features (`linear`: DINO's augmented probe; `linear_fast`: cached "
                  "features, no augmentation), headline = last epoch:", "",
                  head + " probe | epochs | top-1 % | top-5 % |", "|" + "---|" * 9]  # fmt: skip
        lines += ["| " + " | ".join([*_data(e), _cell(e.get("variant")), _cell(e.get("epochs")), _pct(e["top1"]),
                                     _pct(e.get("top5"))]) + " |" for e in linear]  # fmt: skip
        lines.append("")
    files = sorted({str(e.get("result_file")) for e in [*knn, *linear] if e.get("result_file")})
    lines.append(f"Result files (in the run's `eval/` folder unless a path is given): {', '.join(f'`{f}`' for f in files)}.")
    return lines


def _usage(meta: dict[str, Any], folder: str, repo_id: str | None, dim: Any) -> list[str]:
    repo = repo_id or "<user>/<name>"
    measured = [*knn_entries(meta.get("knn")), *(meta.get("linear") or [])]
    protocol = next((e["protocol"] for e in measured if str(e.get("protocol", "")).startswith("knn")), "knn_imagenet")
    return [
        "With timm (the Hub repository, or this folder on disk):", "",
        "```python", "import timm", "",
        f'model = timm.create_model("hf-hub:{repo}", pretrained=True)  # or "local-dir:path/to/{folder}"',
        "model.eval()",
        "config = timm.data.resolve_data_config({}, model=model)  # the input size, mean and std above",
        "transform = timm.data.create_transform(**config)",
        f"features = model(transform(image).unsqueeze(0))  # [1, {dim}], image: a PIL image",
        "```", "",
        "With xcit-ssl (`pip install xcit-ssl`), which reads the record in `model.safetensors`:", "",
        "```python", "import xcit_ssl", "from huggingface_hub import hf_hub_download", "",
        f'backbone = xcit_ssl.load_backbone(hf_hub_download("{repo}", "model.safetensors"))  # or path/to/{folder}/model.safetensors',
        "```", "",
        f"or evaluate it: `xcit-ssl knn --weights path/to/{folder}/model.safetensors --protocol {protocol} "
        "--data.root /path/to/data`.",
        "", "This folder was written by `xcit-ssl export --format hub` and is uploaded with the Hub's client: "
        f"`hf upload {repo} path/to/{folder}`.",
    ]  # fmt: skip
