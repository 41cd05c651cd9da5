"""Typed configuration groups and recipe / protocol lookup.

Recipes are YAML files in the top-level ``recipes/`` folder (shipped in the wheel as
``xcit_ssl/recipes``); evaluation protocols live in ``eval/`` (``xcit_ssl/eval``). A recipe
is a LightningCLI config: ``model`` (a method with its injected backbone), ``data`` and
``trainer`` sections, validated strictly by jsonargparse.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError


@dataclass
class OptimConfig:
    """AdamW with per-iteration warm-up + cosine schedules (DINO's ``main_dino.py`` defaults).

    base_lr is per 256 images: the peak lr is ``base_lr * global_batch / 256``. Weight decay
    follows a cosine from ``weight_decay`` to ``weight_decay_end`` on the regularised group only
    (no decay on biases and 1-D parameters). ``clip_grad`` clips each parameter's gradient norm
    separately (DINO's rule, not a global norm); 0 disables it.
    """

    base_lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class DINOConfig:
    """DINO head, loss and teacher settings (REFERENCE.md section 2, DINO's defaults).

    ``norm_last_layer``: True is more stable, False performs better for small models.
    ``teacher_temp``: 0.04 is safe; 0.07 with ``warmup_teacher_temp_epochs: 30`` is better
    but can collapse (DINO's advice). ``momentum_teacher``: 0.996 at batch 1024; use a value
    closer to 1 (e.g. 0.9995) for small batches. ``teacher_bn``: "own" keeps the teacher's
    BatchNorm running statistics from its own forward passes (DINO: the teacher stays in train
    mode and buffers are not averaged); "ema" averages them from the student like parameters.
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    teacher_bn: str = "own"

    def __post_init__(self) -> None:
        if self.teacher_bn not in ("own", "ema"):
            raise UserError(f"dino.teacher_bn must be 'own' or 'ema', got '{self.teacher_bn}'")
        if not 0.0 <= self.momentum_teacher <= 1.0:
            raise UserError(f"dino.momentum_teacher must lie in [0, 1], got {self.momentum_teacher}")


_Config = TypeVar("_Config")


def as_config(cls: type[_Config], value: _Config | Mapping[str, Any] | None) -> _Config | None:
    """``value`` as the config dataclass ``cls``: itself, None, or built from a plain dict.

    The methods save their configs as plain dicts (so a checkpoint loads with
    ``torch.load(weights_only=True)``); Lightning's ``load_from_checkpoint`` hands those dicts back
    to ``__init__``, which turns them into dataclasses here. A key ``cls`` does not know is an
    error naming the closest known field, as for a recipe.
    """
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping) or not is_dataclass(cls):
        raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f" (closest: {close[0]})" if close else ""
        raise UserError(f"{cls.__name__} has no field '{unknown[0]}'{hint}; its fields: {', '.join(known)}")
    return cls(**value)


def _resource_dir(package_dir: str) -> list[Path]:
    """The folder inside the installed package, then the source checkout's top-level one."""
    found: list[Path] = []
    try:
        found.append(Path(str(resources.files("xcit_ssl") / package_dir)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - odd importers
        pass
    found.append(Path(__file__).resolve().parent.parent / package_dir)
    return [p for p in found if p.is_dir()]


def _yaml_files(package_dir: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in reversed(_resource_dir(package_dir)):  # the installed copy wins
        files.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return files


def _resolve(name_or_path: str, package_dir: str, what: str, list_cmd: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise UserError(f"{what} file '{path}' does not exist; give a path to a YAML file or a {what} name")
        return path
    files = _yaml_files(package_dir)
    if name_or_path in files:
        return files[name_or_path]
    close = difflib.get_close_matches(name_or_path, files, n=3, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise UserError(f"unknown {what} '{name_or_path}'.{hint} Run `xcit-ssl {list_cmd}` to see all of them.")


def recipe_path(name_or_path: str) -> Path:
    """The YAML file of a recipe name (``dino_small_p8``) or an explicit ``.yaml`` path."""
    return _resolve(name_or_path, "recipes", "recipe", "recipes")


def protocol_path(name_or_path: str) -> Path:
    """The YAML file of an evaluation protocol name (``knn_imagenet``) or path (the one lookup:
    the installed package's ``eval/`` wins over the source checkout's, as for recipes)."""
    return _resolve(name_or_path, "eval", "protocol", "protocols")


def describe_yaml(path: Path) -> str:
    """The first sentence of a recipe's or protocol's leading comment: its description.

    The sentence runs on to the next comment line only where that line continues it (starts in
    lower case or with a parenthesis, or a parenthesis is open), so a table never shows half a
    sentence; without a full stop, the first line."""
    text = ""
    for line in path.read_text().splitlines():
        part = line.lstrip("#").strip()
        if not line.startswith("#") or not part:
            break
        if text and not (part[0].islower() or part[0] == "(" or text.count("(") > text.count(")")):
            break
        text = f"{text} {part}" if text else part
        depth = 0
        for i, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if ch == "." and depth == 0 and text[i + 1 : i + 2] in ("", " "):
                return text[: i + 1]
    return text


def list_recipes() -> list[tuple[str, str]]:
    """``(name, description)`` for every shipped recipe, sorted by name."""
    return [(name, describe_yaml(path)) for name, path in sorted(_yaml_files("recipes").items())]


def list_protocols() -> list[tuple[str, str]]:
    """``(name, description)`` for every shipped evaluation protocol, sorted by name."""
    return [(name, describe_yaml(path)) for name, path in sorted(_yaml_files("eval").items())]
