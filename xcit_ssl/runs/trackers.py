"""Experiment trackers (MLflow, Weights & Biases) beside the run folder's TensorBoard and CSV.

``--trainer.logger MLFlowLogger`` (or ``WandbLogger``, or a list of loggers in the config) adds the
tracker to the run folder's ``metrics.csv`` and TensorBoard events, which stay: every metric a run
logs reaches every logger at the same step. A TensorBoard or CSV logger given there replaces ours
of the same kind (another folder, other options); ``--trainer.logger false`` turns all logging off.

:class:`TrackerRecord` gives each tracker what the metrics alone do not carry, once per attempt
(a resumed run is a new tracker run with the same ``xcit_ssl.run_id``; its steps continue):

- params: every key of the resolved ``config.yaml``, named as the ``fit`` flag that sets it
  (``model.optim.base_lr``, ``trainer.max_epochs``, ``trainer.logger`` for a class path), and
  ``xcit_ssl.run_id``, ``xcit_ssl.run_dir``, ``xcit_ssl.resumed_from``;
- artifacts: ``config.yaml`` (MLflow: the run's artifacts; W&B: the run's files);
- when training ends or stops: the checkpoint files' absolute paths (MLflow tags / W&B summary
  ``xcit_ssl.checkpoint.<name>``); the files themselves are uploaded only when the logger's
  ``log_model`` asks (``true``: ``last.ckpt``, ``all``: every checkpoint; MLflow).

A tracker whose package is missing is refused before anything is built, naming the pip extra.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from ..errors import UserError

logger = logging.getLogger(__name__)

#: tracker class name -> (module it imports, pip install argument)
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "MLFlowLogger": ("mlflow", "'xcit-ssl[mlflow]'"),
    "WandbLogger": ("wandb", "'xcit-ssl[wandb]'"),
    "CometLogger": ("comet_ml", "comet-ml"),
    "NeptuneLogger": ("neptune", "neptune"),
}


def _class_paths(logger_cfg: Any) -> list[str]:
    """The class paths a ``trainer.logger`` config names (a class, a list of them, or a bool/None)."""
    entries = logger_cfg if isinstance(logger_cfg, (list, tuple)) else [logger_cfg]
    paths = []
    for entry in entries:
        path = entry.get("class_path") if hasattr(entry, "get") else None
        if isinstance(path, str):
            paths.append(path)
    return paths


def check_tracker_packages(logger_cfg: Any) -> None:
    """Refuse a tracker whose package is not installed, naming the install command (exit 2)."""
    for path in _class_paths(logger_cfg):
        name = path.rpartition(".")[2]
        module, pip_name = TRACKER_PACKAGES.get(name, (None, ""))
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(
                f"--trainer.logger {name} needs the '{module}' package, which is not installed: "
                f"pip install {pip_name} (or drop --trainer.logger)"
            )


def _raising_logger(err: BaseException) -> str | None:
    """The class name of the Lightning logger whose constructor (or whose library) raised ``err``."""
    tb, name = err.__traceback__, None
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        owner = tb.tb_frame.f_locals.get("self")
        if "/lightning/pytorch/loggers/" in path and isinstance(owner, Logger) and not _is_run_logger(owner):
            name = type(owner).__name__
        elif name is None and any(f"/{lib}/" in path for lib in ("mlflow", "wandb")):
            name = "MLFlowLogger" if "/mlflow/" in path else "WandbLogger"
        tb = tb.tb_next
    return name


def explain_tracker_failure(err: BaseException) -> UserError | None:
    """A tracker that could not start (a refused store, a bad URI, options that exclude each other,
    no login) as one line naming ``--trainer.logger``, else None (also for Ctrl-C and our own errors)."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not isinstance(err, Exception) or any(isinstance(c, UserError) for c in chain):
        return None
    for cause in chain:
        name = _raising_logger(cause)
        if name is not None:
            text = str(cause).strip()
            if "MLFLOW_ALLOW_FILE_STORE" in text:  # MLflow 3 keeps the ./mlruns file store read-only
                return UserError(
                    f"--trainer.logger {name}: this MLflow refuses a local file store (./mlruns, file:...): "
                    "set --trainer.logger.tracking_uri to your tracking server (http://HOST:5000) or to "
                    "sqlite:///mlflow.db (needs the full `pip install mlflow`), or export MLFLOW_ALLOW_FILE_STORE=true"
                )
            first = text.splitlines()[0].rstrip(".") if text else type(cause).__name__
            if "unsupported URI" in text:  # mlflow-skinny has no database store
                first += ": mlflow-skinny writes to a tracking server (http://HOST:5000), a database needs `pip install mlflow`"
            return UserError(f"--trainer.logger {name}: {first}")
    return None


def _is_run_logger(lg: Logger) -> bool:
    return isinstance(lg, (TensorBoardLogger, CSVLogger))


def add_run_loggers(ours: list[Logger], user: Any) -> list[Logger] | None:
    """The loggers a run writes to: ``ours`` (TensorBoard + CSV in the run folder) first, so that
    ``config.yaml`` and ``trainer.log_dir`` stay in the run folder, then the user's trackers; a
    user's TensorBoard or CSV logger replaces ours of that kind. None: ``--trainer.logger false``."""
    if user is False:
        return None
    if user is None or user is True:
        return list(ours)
    given = [lg for lg in (user if isinstance(user, Iterable) else [user]) if isinstance(lg, Logger)]
    replaced = [kind for kind in (TensorBoardLogger, CSVLogger) if any(isinstance(g, kind) for g in given)]
    for tracker in trackers_of(given):
        _quiet(tracker)
    return [lg for lg in ours if not isinstance(lg, tuple(replaced))] + given


def _quiet(tracker: Logger) -> None:
    """W&B prints a banner, a terminal-viewer advertisement and a sync footer, each in colour codes
    even into a log file: :class:`TrackerRecord` says where the run is in one line instead
    (``WANDB_SILENT=false`` brings them back). Before the run starts (W&B reads it then)."""
    if _kind(tracker) != "wandb":
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    init = getattr(tracker, "_wandb_init", None)  # Lightning passes anonymous=None, which W&B warns is deprecated
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


def trackers_of(loggers: list[Logger] | None) -> list[Logger]:
    """The loggers that are experiment trackers (not the run folder's TensorBoard / CSV)."""
    return [lg for lg in loggers or [] if not _is_run_logger(lg)]


def config_params(config: Any, prefix: str = "") -> dict[str, str]:
    """``config.yaml`` as flat params named like the ``fit`` flags: ``{"model": class path,
    "model.optim.base_lr": "0.002", "trainer.callbacks.0.k": "20", ...}`` (``init_args`` dropped)."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        if isinstance(config.get("class_path"), str):
            if prefix:
                out[prefix] = config["class_path"]
            rest = {k: v for k, v in config.items() if k not in ("class_path", "init_args")}
            config = {**(config.get("init_args") or {}), **rest}
        for key, value in config.items():
            out.update(config_params(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(config, list) and any(isinstance(v, dict) for v in config):
        for i, value in enumerate(config):
            out.update(config_params(value, f"{prefix}.{i}"))
    elif prefix:
        out[prefix] = config if isinstance(config, str) else json.dumps(config)
    return out


def _kind(lg: Logger) -> str:
    names = {cls.__name__ for cls in type(lg).__mro__}
    return "mlflow" if "MLFlowLogger" in names else "wandb" if "WandbLogger" in names else "other"


class TrackerRecord(Callback):
    """Puts the run's config, identity and checkpoint paths into each tracker (rank 0).

    Args:
        run_dir: the run folder (holds ``config.yaml``, ``run_id``, ``checkpoints/``).
        resumed_from: the checkpoint this attempt resumes (None: a fresh run) and its step.
    """

    def __init__(self, run_dir: str | Path, resumed_from: Path | None = None, resumed_step: int = 0) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.resumed_from = f"{resumed_from} (step {resumed_step})" if resumed_from else ""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        config = self.run_dir / "config.yaml"  # written by LightningCLI at setup, before this hook
        params = config_params(yaml.safe_load(config.read_text())) if config.is_file() else {}
        run_id = self.run_dir / "run_id"
        params["xcit_ssl.run_id"] = run_id.read_text().strip() if run_id.is_file() else ""
        params["xcit_ssl.run_dir"] = str(self.run_dir)
        params["xcit_ssl.resumed_from"] = self.resumed_from
        for tracker in trackers_of(trainer.loggers):
            tracker.log_hyperparams(params)
            if config.is_file():
                self._upload(tracker, config, "")
            logger.info("tracking in %s", _where(tracker))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_checkpoints(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if _raising_logger(exception) is None:  # a tracker that failed to start records nothing
            self._record_checkpoints(trainer)  # a stopped run (signal, full disk) has its last.ckpt

    def _record_checkpoints(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        files = sorted((self.run_dir / "checkpoints").glob("*.ckpt"))
        for tracker in trackers_of(trainer.loggers):
            try:  # the run is over: a tracker that fails now costs a warning, not the run's exit code
                tags = {f"xcit_ssl.checkpoint.{f.stem}": str(f) for f in files}
                kind = _kind(tracker)
                if kind == "mlflow":
                    for key, value in tags.items():
                        tracker.experiment.set_tag(tracker.run_id, key, value)
                elif kind == "wandb":
                    tracker.experiment.summary.update(tags)
                upload = getattr(tracker, "_log_model", False)  # Lightning's own log_model flag
                for f in files if upload == "all" else [f for f in files if f.name == "last.ckpt"] if upload else []:
                    self._upload(tracker, f, "checkpoints")
            except Exception as err:  # noqa: BLE001
                logger.warning("%s: checkpoint paths not recorded: %s", type(tracker).__name__, err)

    @staticmethod
    def _upload(tracker: Logger, path: Path, folder: str) -> None:
        kind = _kind(tracker)
        if kind == "mlflow":
            tracker.experiment.log_artifact(tracker.run_id, str(path), folder or None)
        elif kind == "wandb":  # an artifact: a file saved into the run's files would replace W&B's own config.yaml
            import wandb

            run = tracker.experiment
            artifact = wandb.Artifact(f"{folder or 'config'}-{run.id}", type="model" if folder else "config")
            artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact, aliases=[path.stem] if folder else None)


def _where(tracker: Logger) -> str:
    """One phrase naming where a tracker's run lives (for the console)."""
    kind = _kind(tracker)
    if kind == "mlflow":
        client = tracker.experiment
        name = client.get_experiment(tracker.experiment_id).name
        return f"MLflow run {tracker.run_id} (experiment '{name}', {client.tracking_uri})"
    if kind == "wandb":
        run = tracker.experiment
        if getattr(run, "offline", False):
            folder = Path(run.dir).parent
            return f"W&B run {run.id}, offline in {folder} (upload it with `wandb sync {folder}`)"
        return f"W&B run {run.id} ({run.url})"
    return type(tracker).__name__
