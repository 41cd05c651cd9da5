"""Which checkpoint a ``fit --ckpt_path`` resumes, into which folder, and whether it fits the config.

- ``--ckpt_path last``: ``checkpoints/last.ckpt`` of the run folder (the ``--run_dir`` /
  ``--config``'s folder when it holds a run, else the newest ``runs/<recipe>[_N]``). No checkpoint
  there is an error, never a fresh run over an existing one.
- ``--ckpt_path FILE``: any checkpoint we wrote (``last``, ``epoch_NNNN``, ``last_good``); the run
  continues in the run folder the file lives in (``<run>/checkpoints/FILE``), else in a fresh one.
- A checkpoint of another method, recipe or backbone is refused with both names.
- Under SLURM, a requeued job (``SLURM_RESTART_COUNT`` > 0) without ``--ckpt_path`` resumes ``last``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import run_dir_of
from ..models.record import BackboneRecord
from .folders import fresh_run_dir, holds_run, newest_run
from .loggers import ResumePoint

#: model class -> the ``method`` its checkpoints record
METHODS = {"DINO": "dino", "Supervised": "supervised", "Distilled": "distilled"}
#: backbone overrides that change the weights' shapes (drop-path and the like do not)
STRUCTURAL = ("depth", "embed_dim", "num_heads", "patch_size", "num_classes")


@dataclass
class ResumePlan:
    """Where a run writes and what it resumes from (``checkpoint`` None: a fresh run)."""

    run_dir: Path
    checkpoint: Path | None = None
    point: ResumePoint | None = None


def requeued_on_slurm() -> bool:
    """True in a job that SLURM started again after a requeue."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return count.isdigit() and int(count) > 0


def _read(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a usable checkpoint
        raise UserError(
            f"--ckpt_path {path}: not a readable xcit-ssl checkpoint ({type(err).__name__}: {str(err)[:200]}); "
            "pass another checkpoint, or drop --ckpt_path to start a fresh run"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        raise UserError(
            f"--ckpt_path {path}: a weight file, not a training checkpoint (no optimizer or loop state). "
            "To start training from these weights pass --model.pretrained instead"
        )
    return ckpt


def check_compatible(ckpt: dict[str, Any], path: Path, model_cfg: dict[str, Any], recipe: str | None) -> None:
    """Refuse a checkpoint of another method, recipe or backbone, naming both sides."""
    record = BackboneRecord.from_checkpoint_entry(ckpt.get("xcit_ssl")) or BackboneRecord()
    class_name = str(model_cfg.get("class_path", "")).rsplit(".", 1)[-1]
    want_method = METHODS.get(class_name)
    have_method = record.method
    if want_method and have_method and want_method != have_method:
        raise UserError(
            f"--ckpt_path {path} is a {have_method} checkpoint, the config trains {want_method} "
            f"({class_name}); resume it with its own recipe, or start from its weights with --model.pretrained"
        )
    have_recipe = record.recipe
    if recipe and have_recipe and recipe != have_recipe:
        raise UserError(
            f"--ckpt_path {path} was written by recipe '{have_recipe}', this run is recipe '{recipe}': resume with "
            f"--recipe {have_recipe} (or --config <its run>/config.yaml), or start from its weights with "
            "--model.pretrained"
        )
    backbone = (model_cfg.get("init_args") or {}).get("backbone") or {}
    args = backbone.get("init_args") or {}
    want_name, have_name = args.get("name"), record.architecture
    if want_name and have_name and want_name != have_name:
        raise UserError(
            f"--ckpt_path {path} holds {have_name}, the config builds {want_name}: pass "
            f"--model.backbone.init_args.name {have_name}, or the checkpoint of a {want_name} run"
        )
    overrides = record.overrides
    for key in STRUCTURAL:
        if key in overrides and args.get(key) is not None and args.get(key) != overrides[key]:
            raise UserError(
                f"--ckpt_path {path} holds {have_name} with {key}={overrides[key]}, the config sets {key}="
                f"{args.get(key)}: pass --model.backbone.init_args.{key} {overrides[key]}"
            )


def plan_run(
    ckpt_path: str | None,
    run_dir: str | None,
    recipe: str | None,
    model_cfg: dict[str, Any],
) -> ResumePlan:
    """Resolve ``--ckpt_path`` and ``--run_dir`` into a :class:`ResumePlan` (no folder is created)."""
    default = f"runs/{recipe or 'run'}"
    if ckpt_path is None and requeued_on_slurm():
        ckpt_path = "last"
    if ckpt_path is None:
        return ResumePlan(fresh_run_dir(run_dir or default))
    if ckpt_path in ("best", "hpc", "registry"):
        raise UserError(f"--ckpt_path {ckpt_path} is not supported: pass last or a checkpoint file")
    if ckpt_path == "last":
        folder = Path(run_dir) if run_dir and holds_run(Path(run_dir)) else newest_run(run_dir or default)
        where = folder or Path(run_dir or default)
        checkpoint = where / "checkpoints" / "last.ckpt"
        if folder is None or not checkpoint.is_file():
            raise UserError(
                f"--ckpt_path last: {where} holds no checkpoints/last.ckpt, nothing to resume. Drop --ckpt_path to "
                "start a fresh run (it gets a new folder), or pass --ckpt_path FILE / --run_dir of the run to resume"
            )
        run = folder
    else:
        checkpoint = Path(ckpt_path)
        if not checkpoint.is_file():
            raise UserError(f"--ckpt_path {checkpoint}: no such file; pass last or an existing checkpoint file")
        owner = run_dir_of(checkpoint.resolve())  # runs/<name> for runs/<name>/checkpoints/*.ckpt
        in_run = owner != checkpoint.resolve().parent and holds_run(owner)
        run = owner if in_run else fresh_run_dir(run_dir or default)
    ckpt = _read(checkpoint)
    check_compatible(ckpt, checkpoint, model_cfg, recipe)
    state = (ckpt.get("callbacks") or {}).get("RunCheckpoints") or {}
    point = ResumePoint(int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), bool(state.get("epoch_end", False)))
    return ResumePlan(run, checkpoint, point)
