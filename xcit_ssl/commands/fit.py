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
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ..config import describe_yaml, recipe_path
from ..devices import device_count
from ..errors import UserError
from ..methods.plan import BatchSplit
from ..runs.checkpoints import AtomicCheckpointIO, RunCheckpoints
from ..runs.folders import launcher_rank, remove_unstarted_run
from ..runs.loggers import LogLastStep, make_loggers
from ..runs.preflight import check_trainer_config
from ..runs.progress import RunModelSummary, ThroughputProgressBar
from ..runs.resume import ResumePlan, RunRecord, plan_run
from ..runs.signals import RunInterrupted
from ..runs.trackers import (TrackerRecord, add_run_loggers, check_tracker_packages, explain_tracker_failure,
                              trackers_of)
from .fit_help import FIT_DESCRIPTION, FIT_USAGE, HelpFormatter, import_recipe_classes, recipe_help, wants_class_help

logger = logging.getLogger(__name__)


class XCiTCLI(LightningCLI):
    """LightningCLI that owns the run folder, loggers, checkpoints and resume."""

    plan: ResumePlan | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir", type=str | None, default=None,
            help="run folder (default runs/<recipe>); a folder that already holds a run gets a _N suffix",
        )  # fmt: skip
        parser.add_argument("--recipe_name", type=str | None, default=None, help="set by --recipe; names the run")
        parser.add_argument(
            "--checkpoint_every_n_epochs", type=int, default=20,
            help="keep checkpoints/epoch_NNNN.ckpt every N epochs, 0 for never (last.ckpt is written every epoch)",
        )  # fmt: skip
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int, default=0,
            help="also write last.ckpt every N optimizer steps (0: off)",
        )  # fmt: skip
        parser.add_argument(
            "--checkpoint_every_minutes", type=float, default=30.0,
            help="also write last.ckpt every M minutes of training, bounding the work a kill loses (0: off)",
        )  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        """Keep the recipe/config as given: our checkpoints' hyper-parameters are not a model config."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        check_trainer_config(dict(cfg.trainer))
        check_tracker_packages(cfg.trainer.get("logger"))  # before the run folder exists
        for name in ("checkpoint_every_n_epochs", "checkpoint_every_n_steps", "checkpoint_every_minutes"):
            if cfg.get(name) is not None and cfg.get(name) < 0:
                raise UserError(f"--{name} {cfg.get(name)}: use 0 (off) or a positive value")
        model_cfg = self.config.get(self.subcommand).get("model")
        split, nodes = config_split(cfg)
        plan = plan_run(
            cfg.get("ckpt_path"), cfg.get("run_dir"), cfg.get("recipe_name"),
            model_cfg.as_dict() if hasattr(model_cfg, "as_dict") else dict(model_cfg or {}), split, nodes,
        )  # fmt: skip
        self.plan = plan
        self.fresh_folder = plan.checkpoint is None and not plan.run_dir.exists()
        if "weights_only" in cfg and cfg.get("weights_only") is None:
            cfg.weights_only = True  # our checkpoints hold tensors and plain types only
        if plan.checkpoint is not None:
            cfg.ckpt_path = str(plan.checkpoint)
            logger.info("resuming %s from %s (step %d)", plan.run_dir, plan.checkpoint, plan.point.step if plan.point else 0)
        cfg.run_dir = str(plan.run_dir)
        cfg.trainer.default_root_dir = str(plan.run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg.run_dir)
        plan = self.plan or ResumePlan(run_dir)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        loggers = add_run_loggers(make_loggers(run_dir, plan.point), trainer_cfg.get("logger"))  # + MLflow, W&B
        if loggers is not None:
            kwargs["logger"] = loggers
        user_callbacks = trainer_cfg.get("callbacks") or []
        if not isinstance(user_callbacks, list):
            user_callbacks = [user_callbacks]
        callbacks = list(user_callbacks) + [
            RunRecord(run_dir, plan.run_id or uuid.uuid4().hex),  # the run's id and batch split, in every checkpoint
            RunCheckpoints(
                run_dir / "checkpoints",
                every_n_epochs=cfg.checkpoint_every_n_epochs,
                every_n_steps=cfg.checkpoint_every_n_steps,
                every_minutes=cfg.checkpoint_every_minutes,
            ),
            # no LearningRateMonitor: it reads the optimizer before the method writes the step's lr and
            # logs once per micro-batch; the methods log train/lr themselves (methods/optim.py)
            LogLastStep(),
        ]
        if trainer_cfg.get("enable_progress_bar") is not False:
            callbacks.append(ThroughputProgressBar())
        if trainer_cfg.get("enable_model_summary") is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            kwargs["enable_model_summary"] = False  # Lightning's own would print a FLOPs column of zeros
            callbacks.append(RunModelSummary())
        if trackers_of(loggers):  # config, run id and checkpoint paths into MLflow / W&B
            callbacks.append(TrackerRecord(run_dir, plan.checkpoint, plan.point.step if plan.point else 0))
        kwargs["callbacks"] = callbacks
        kwargs["enable_checkpointing"] = False  # RunCheckpoints writes every checkpoint
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def after_instantiate_classes(self) -> None:
        self.model.recipe = self.config[self.subcommand].get("recipe_name")
        logger.info("run folder: %s", self.config[self.subcommand].run_dir)


def config_split(cfg: Any) -> tuple[BatchSplit | None, int]:
    """(batch split, nodes) the config trains with: devices x nodes, ``data.batch_size``,
    ``trainer.accumulate_grad_batches``; the split is None when the data module has no batch size."""
    trainer = dict(cfg.trainer)
    nodes = int(trainer.get("num_nodes") or 1)
    data = cfg.get("data")
    init_args = (data.get("init_args") if hasattr(data, "get") else None) or {}
    batch = init_args.get("batch_size") if hasattr(init_args, "get") else None
    if not isinstance(batch, int) or isinstance(batch, bool):
        return None, nodes
    world = device_count(trainer)[1] * nodes
    return BatchSplit(world, batch, int(trainer.get("accumulate_grad_batches") or 1)), nodes


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


class _HelpShown(Exception):
    """``fit --recipe X --help`` printed the recipe's values; stop before anything is built."""


def fit_main(argv: list[str]) -> int:
    """Run ``xcit-ssl fit``; returns the exit code. Bad flags or config keys raise :class:`UserError`."""
    args = _expand_recipe(argv)
    recipe_file = args[1] if args[:1] == ["--config"] and "--recipe_name" in args[2:3] else None
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    wants_help = any(a in ("-h", "--help") for a in args)
    if wants_class_help(args):  # `--model.help DINO`: short class names resolve among imported classes
        import_recipe_classes()
    elif not has_config and not any(a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        raise UserError("fit needs --recipe NAME (see `xcit-ssl recipes`) or --config FILE")
    recipe_help_of: str | None = None
    if wants_help and has_config:  # `fit --recipe X --help`: that recipe's values, not Lightning's reference
        args = [a for a in args if a not in ("-h", "--help")]
        recipe_help_of = next(a.split("=", 1)[1] if "=" in a else args[i + 1]
                              for i, a in enumerate(args) if a.split("=", 1)[0] == "--config")  # fmt: skip
    # Lightning's DDP launcher re-runs sys.argv for the other ranks: make it the expanded command
    sys.argv = sys.argv[:1] + ["fit"] + args
    from ..console import adopt_library_loggers

    adopt_library_loggers()
    cli: XCiTCLI | None = None

    class _CLI(XCiTCLI):
        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            super().parse_arguments(parser, args)
            if recipe_help_of is not None:
                cfg = self.config["fit"]
                defaults = self._subcommand_parsers["fit"].get_defaults()
                by_recipe = recipe_help_of == str(recipe_file)  # --recipe NAME, not --config runs/x/config.yaml
                invocation = f"--recipe {cfg.get('recipe_name')}" if by_recipe else f"--config {recipe_help_of}"
                description = describe_yaml(Path(recipe_help_of)) if by_recipe else ""
                print(recipe_help(cfg, defaults, invocation, description))
                raise _HelpShown

        def before_instantiate_classes(self) -> None:
            nonlocal cli
            cli = self
            super().before_instantiate_classes()

    try:
        _CLI(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "prog": "xcit-ssl",
                "formatter_class": HelpFormatter,  # the subcommand parsers inherit it
                "fit": {"default_env": False, "exit_on_error": False, "allow_abbrev": False,
                        "usage": FIT_USAGE, "description": FIT_DESCRIPTION},  # fmt: skip
            },
        )
    except ArgumentError as err:
        raise UserError(explain_config_error(str(err))) from None
    except _HelpShown:
        return 0
    except RunInterrupted:
        raise
    except SystemExit as err:  # --help, --print_config, --model.help: printed, nothing else to do
        if err.code not in (None, 0):
            raise
        return 0
    except BaseException as err:
        _remove_if_unstarted(cli)
        tracker_error = explain_tracker_failure(err)  # MLflow / W&B could not start: a store, a URI, a login
        if tracker_error is not None:
            raise tracker_error from None
        if not isinstance(err, (ValueError, TypeError, RuntimeError)):
            raise
        # jsonargparse wraps errors raised while it builds the model/data: surface ours as they are
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
    return 0


class _ConfigOnlyCLI(XCiTCLI):
    """Parses and checks exactly as ``fit`` does, then stops: nothing is instantiated or written."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def resolve_config(argv: list[str]) -> XCiTCLI:
    """The config ``xcit-ssl fit ARGV`` would run, for planners (``xcit-ssl doctor``).

    Same recipe expansion, overrides, strict errors (:class:`UserError` with fit's message) and
    refusals (``check_trainer_config``), and the seed is set; no class is instantiated and no run
    folder created. ``cli.config[cli.subcommand]`` is the resolved config; instantiate its classes
    with ``cli.parser.instantiate_classes(cli.config)``.
    """
    args = _expand_recipe(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        raise UserError("needs --recipe NAME (see `xcit-ssl recipes`) or --config FILE")
    saved_argv = sys.argv
    sys.argv = sys.argv[:1] + ["fit"] + args  # LightningCLI parses sys.argv, as in fit_main
    try:
        return _ConfigOnlyCLI(
            model_class=L.LightningModule,
            subclass_mode_model=True,
            datamodule_class=L.LightningDataModule,
            subclass_mode_data=True,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                "fit": {"default_env": False, "exit_on_error": False, "allow_abbrev": False},
            },
        )
    except ArgumentError as err:
        raise UserError(explain_config_error(str(err))) from None
    finally:
        sys.argv = saved_argv


def _remove_if_unstarted(cli: XCiTCLI | None) -> None:
    """A fresh run that failed before its first optimizer step leaves no folder behind."""
    if cli is None or not getattr(cli, "fresh_folder", False) or launcher_rank() > 0:
        return
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and trainer.global_step > 0:
        return
    remove_unstarted_run(Path(cli.config[cli.subcommand].run_dir))
