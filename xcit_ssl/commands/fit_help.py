"""What ``xcit-ssl fit --help`` says: how xcit-ssl is used first, then a recipe's own values.

``fit --help`` opens with the recipes, the common overrides and the run-folder flags before
Lightning's Trainer reference; ``fit --recipe NAME --help`` lists that recipe's resolved model,
data and trainer values as the flags that override them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Iterable
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace

FIT_USAGE = "xcit-ssl fit --recipe NAME [--SECTION.KEY VALUE ...]    (or --config runs/x/config.yaml)"

FIT_DESCRIPTION = """\
Train with a recipe: a YAML preset of model, data and trainer; any value is overridden by its
dotted flag, and the resolved config is saved as <run folder>/config.yaml. --recipe NAME (a
name that `xcit-ssl recipes` lists, or a YAML file) is short for --config <that recipe's file>.

  xcit-ssl recipes                                     list the recipes
  xcit-ssl fit --recipe dino_nano_fmnist               the CPU demo (Fashion-MNIST, real data)
  xcit-ssl fit --recipe dino_small_p16 --help          that recipe's options, with its values
  xcit-ssl fit --recipe dino_small_p16 --print_config  the full resolved config (YAML)
  xcit-ssl fit --model.help DINO | --data.help ImageDataModule   every option of a class

common overrides:
  --data.root /data/imagenet       the data (<root>/train/<class>/*.JPEG and <root>/val/...)
  --data.batch_size 128            images per device and step
  --trainer.devices 8              GPUs of this node (--trainer.num_nodes N for several nodes)
  --trainer.precision bf16-mixed   mixed precision on GPUs that support it
  --model.optim.base_lr 5e-4       learning rate per 256 images (scaled by the global batch)
  --model.pretrained FILE          start from weights: an export, a timm/official/DINO file
  --trainer.logger MLFlowLogger    also track in MLflow (WandbLogger: W&B), beside TensorBoard + metrics.csv

run folder, checkpoints, resume:
  --run_dir runs/x                 where the run writes (default runs/<recipe>; _1, _2 when taken)
  --ckpt_path last                 resume the newest run of the recipe (or give a checkpoint file)
  --checkpoint_every_n_epochs 20   keep checkpoints/epoch_NNNN.ckpt every N epochs (0: never)
  --checkpoint_every_minutes 30    rewrite checkpoints/last.ckpt every M minutes (0: off)
  --checkpoint_every_n_steps 0     and every N optimizer steps (0: off); last.ckpt also every epoch

Every option follows, Lightning's Trainer ones (--trainer.*) included."""

# the classes recipes name, imported so `--model.help DINO` resolves a short name without a recipe
_CLASS_MODULES = (
    "xcit_ssl.methods.dino", "xcit_ssl.methods.supervised", "xcit_ssl.methods.distilled",
    "xcit_ssl.data.datamodule", "xcit_ssl.data.supervised", "xcit_ssl.evaluation.online",
)  # fmt: skip


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter that keeps the description's line breaks (examples stay aligned)."""


def import_recipe_classes() -> None:
    for module in _CLASS_MODULES:
        importlib.import_module(module)


def wants_class_help(args: Iterable[str]) -> bool:
    """``--model.help X`` / ``--data.help X`` / ``--trainer.callbacks.help X``: no recipe needed."""
    return any(a.split("=", 1)[0].endswith(".help") for a in args if a.startswith("--"))


def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Namespace) and "class_path" in v:
        return _call(v)
    return str(v)


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _call(ns: Namespace) -> str:
    """``OnlineKNN(dataset=fashion_mnist, n_train=10000)``: a class config, its non-default arguments."""
    args = vars(ns.get("init_args") or Namespace())
    defaults: dict[str, Any] = {}
    module, _, name = str(ns.class_path).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
        defaults = {k: p.default for k, p in inspect.signature(target).parameters.items()}
    except (ImportError, AttributeError, ValueError, TypeError):
        pass
    shown = [f"{k}={_value(v)}" for k, v in args.items() if k not in defaults or _value(defaults[k]) != _value(v)]
    return f"{_short(str(ns.class_path))}({', '.join(shown)})" if shown else f"{_short(str(ns.class_path))} (defaults)"


def _flatten(flag: str, value: Any, out: list[tuple[str, str]]) -> None:
    """Dotted flags and values; a class config shows its class, then its arguments (jsonargparse
    takes ``--model.backbone.depth`` for ``--model.backbone.init_args.depth``)."""
    if isinstance(value, Namespace) and "class_path" in value:
        out.append((flag, str(value.class_path)))
        for key, v in vars(value.get("init_args") or Namespace()).items():
            _flatten(f"{flag}.{key}", v, out)
    elif isinstance(value, Namespace):
        for key, v in vars(value).items():
            _flatten(f"{flag}.{key}", v, out)
    else:
        out.append((flag, _value(value)))


def recipe_help(cfg: Namespace, defaults: Namespace, invocation: str, description: str) -> str:
    """The resolved recipe ``cfg`` (``fit``'s namespace) as ``--flag value`` lines: model and data in
    full, the trainer values that differ from Lightning's ``defaults``, the run options.
    ``invocation``: ``--recipe NAME`` or ``--config FILE``, as the user gave it."""
    title = f"xcit-ssl fit {invocation}"
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for section in ("model", "data"):
        rows: list[tuple[str, str]] = []
        if cfg.get(section) is not None:
            _flatten(f"--{section}", cfg.get(section), rows)
            cls = _short(str(cfg.get(section).class_path))
            sections.append((f"{section} (every option: xcit-ssl fit --{section}.help {cls})", rows))
    trainer_rows: list[tuple[str, str]] = []
    for key, v in vars(cfg.get("trainer") or Namespace()).items():
        if v != defaults.get(f"trainer.{key}"):
            trainer_rows.append((f"--trainer.{key}", _value(v)))
    sections.append(("trainer (what the recipe sets; every option: xcit-ssl fit --help)", trainer_rows))
    run_keys = ("run_dir", "ckpt_path", "seed_everything", "checkpoint_every_n_epochs",
                "checkpoint_every_n_steps", "checkpoint_every_minutes")  # fmt: skip
    sections.append(("run", [(f"--{k}", _value(cfg.get(k))) for k in run_keys if k in cfg]))
    width = max(len(flag) for _, rows in sections for flag, _ in rows)
    lines = [f"{title}: {description}" if description else title, ""]
    for header, rows in sections:
        lines.append(header)
        lines += [f"  {flag:<{width}}  {value}" for flag, value in rows]
        lines.append("")
    lines.append(f"override any value with its flag, e.g. {title} --data.batch_size 32; "
                 "--print_config prints the whole config as YAML")  # fmt: skip
    return "\n".join(lines)
