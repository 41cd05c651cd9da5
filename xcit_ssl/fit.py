"""``xcit-ssl fit``: LightningCLI with recipes, run folders and strict, typed configs.

A recipe is a LightningCLI config file; ``--recipe NAME`` is sugar for ``--config <recipe file>``.
Everything is overridable with dotted flags (``--model.optim.base_lr 3e-4``,
``--trainer.precision bf16-mixed``, ``--data.root /data/imagenet``), ``--print_config`` shows the
resolved config, and the run folder gets ``config.yaml`` so ``--config runs/x/config.yaml`` reruns it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .config import recipe_path
from .errors import UserError
from .training import make_callbacks, make_loggers, resolve_run_dir

logger = logging.getLogger(__name__)


class XCiTCLI(LightningCLI):
    """LightningCLI that owns the run folder, loggers and checkpoint callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir", type=str | None, default=None,
            help="run folder (default runs/<recipe>); a folder that already holds a run gets a _N suffix",
        )  # fmt: skip
        parser.add_argument("--recipe_name", type=str | None, default=None, help="set by --recipe; names the run")
        parser.add_argument(
            "--checkpoint_every_n_epochs", type=int, default=20,
            help="keep checkpoints/epoch_NNNN.ckpt every N epochs (last.ckpt is written every epoch)",
        )  # fmt: skip

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        resuming = cfg.get("ckpt_path") is not None
        requested = cfg.get("run_dir") or f"runs/{cfg.get('recipe_name') or 'run'}"
        run_dir = resolve_run_dir(requested, resuming)
        cfg.run_dir = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg.run_dir)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = make_loggers(run_dir)
        user_callbacks = trainer_cfg.get("callbacks") or []
        if not isinstance(user_callbacks, list):
            user_callbacks = [user_callbacks]
        progress = trainer_cfg.get("enable_progress_bar") is not False
        kwargs["callbacks"] = list(user_callbacks) + make_callbacks(run_dir, cfg.checkpoint_every_n_epochs, progress)
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        self.model.recipe = self.config[self.subcommand].get("recipe_name")
        logger.info("run folder: %s", self.config[self.subcommand].run_dir)


def _expand_recipe(argv: list[str]) -> list[str]:
    """Replace ``--recipe NAME`` by ``--config <file> --recipe_name NAME``, placed first."""
    out: list[str] = []
    recipe: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--recipe":
            if i + 1 >= len(argv):
                raise UserError("--recipe needs a name; run `xcit-ssl recipes` to list them")
            recipe, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--recipe="):
            recipe, i = arg.split("=", 1)[1], i + 1
            continue
        out.append(arg)
        i += 1
    if recipe is None:
        return out
    path = recipe_path(recipe)
    name = path.stem
    return ["--config", str(path), "--recipe_name", name] + out


def _accepted_names(class_path: str) -> list[str]:
    """Constructor arguments (or dataclass fields) of a dotted class or function path."""
    module, _, attr = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return []
    return [n for n in inspect.signature(target).parameters if n not in ("self", "args", "kwargs")]


def explain_config_error(message: str) -> str:
    """Turn jsonargparse's nested error into one line that names the bad key and the closest valid one."""
    bad = re.findall(r"Option '([^']+)' is not accepted", message) or re.findall(
        r"Key '([^']+)' is not expected", message
    )
    if bad:
        classes = re.findall(r"class_path '([^']+)'", message)
        names = _accepted_names(classes[-1]) if classes else []
        key = bad[-1].split(".")[-1]
        close = difflib.get_close_matches(key, names, n=2, cutoff=0.5)
        where = f" of {classes[-1]}" if classes else ""
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid: {', '.join(names)}" if names else "")
        return f"unknown config key '{bad[-1]}'{where}{hint}"
    unrecognised = re.search(r"unrecognized arguments: (\S+)", message, re.IGNORECASE)
    if unrecognised:
        flag = unrecognised.group(1)
        section, _, key = flag.lstrip("-").partition(".")
        names = _accepted_names("lightning.Trainer") if section == "trainer" else []
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f"; did you mean '--{section}.{close[0]}'?" if close else ""
        return f"unrecognised option '{flag}'{hint} (xcit-ssl fit --help lists them)"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    expected = [ln.strip() for ln in message.splitlines() if ln.strip().startswith("Expected a") and "NoneType" not in ln]
    if keys and expected:
        return f"bad value for '{'.'.join(keys)}': {expected[-1]}"
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return " / ".join(lines[:6])


# DINO has no validation step: the labelled val split serves evaluation callbacks, not Lightning's loop
warnings.filterwarnings("ignore", message=".*`val_dataloader` but have no `validation_step`.*")


def run_fit(argv: list[str]) -> int:
    """Run ``xcit-ssl fit``; returns the exit code. Bad flags or config keys raise :class:`UserError`."""
    args = _expand_recipe(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args) and not any(
        a in ("-h", "--help", "--print_config") or a.startswith("--print_config") for a in args
    ):
        raise UserError("fit needs --recipe NAME (see `xcit-ssl recipes`) or --config FILE")
    # Lightning's DDP launcher re-runs sys.argv for the other ranks: make it the expanded command
    sys.argv = sys.argv[:1] + ["fit"] + args
    try:
        XCiTCLI(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "fit": {"default_env": False, "exit_on_error": False, "allow_abbrev": False},
            },
        )
    except ArgumentError as err:
        raise UserError(explain_config_error(str(err))) from None
    except (ValueError, TypeError, RuntimeError) as err:
        # jsonargparse wraps errors raised while it builds the model/data: surface ours as they are
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    return 0
