"""Which checkpoint a ``fit --ckpt_path`` resumes, into which folder, and whether it fits the config.

- ``--ckpt_path last``: ``checkpoints/last.ckpt`` of the run folder (the ``--run_dir`` /
  ``--config``'s folder when it holds a run, else the newest ``runs/<recipe>[_N]``). No checkpoint
  there is an error, never a fresh run over an existing one.
- ``--ckpt_path FILE``: any checkpoint we wrote (``last``, ``epoch_NNNN``, ``last_good``); the run
  continues in the run folder the file lives in (``<run>/checkpoints/FILE``), else in the
  ``--run_dir`` it belongs to (a copy of a run's checkpoint: the run id written once into the run
  folder, ``run_id``, and into every checkpoint, matches), else in a fresh folder.
- A checkpoint of another method, recipe or backbone is refused with both names; one trained with
  another global batch (devices x per-device batch x accumulation) is refused naming both and the
  flag that restores it. Another split of the same global batch resumes (elastic resume): the
  data loader continues at the same global sample (:mod:`xcit_ssl.data.resumable`) and
  :class:`RunRecord` converts Lightning's batch counters. A checkpoint that predates the record
  (no run id, no split) resumes as it always did.
- A file that is no training checkpoint is named for what it is (truncated, text, a weight file).
- Under SLURM, a requeued job (``SLURM_RESTART_COUNT`` > 0) without ``--ckpt_path`` resumes ``last``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..errors import UserError
from ..files import run_dir_of, write_text
from ..methods.plan import BatchSplit, shape_from_trainer
from ..models.checkpoint_files import refused_type
from ..models.record import BackboneRecord
from .folders import fresh_run_dir, holds_run, newest_run
from .loggers import ResumePoint

logger = logging.getLogger(__name__)

#: model class -> the ``method`` its checkpoints record
METHODS = {"DINO": "dino", "Supervised": "supervised", "Distilled": "distilled"}
#: backbone overrides that change the weights' shapes (drop-path and the like do not)
STRUCTURAL = ("depth", "embed_dim", "num_heads", "patch_size", "num_classes")
#: the file in a run folder that names the run (a uuid written once, also into every checkpoint)
RUN_ID_FILE = "run_id"
#: the ``checkpoint["callbacks"]`` key of :class:`RunRecord`'s state
RECORD_KEY = "RunRecord"


@dataclass
class ResumePlan:
    """Where a run writes and what it resumes from (``checkpoint`` None: a fresh run)."""

    run_dir: Path
    checkpoint: Path | None = None
    point: ResumePoint | None = None
    run_id: str = ""


def requeued_on_slurm() -> bool:
    """True in a job that SLURM started again after a requeue."""
    count = os.environ.get("SLURM_RESTART_COUNT", "0")
    return count.isdigit() and int(count) > 0


def _read(path: Path) -> dict[str, Any]:
    """The training checkpoint at ``path``; anything else is a UserError that says what it is."""
    _refuse_unless_complete_zip(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        name = refused_type(str(err)) or "object"
        raise UserError(
            f"--ckpt_path {path} holds a pickled '{name}', which the safe loader refuses: it is no checkpoint "
            "xcit-ssl wrote; pass one of a run's checkpoints (runs/<name>/checkpoints/*.ckpt)"
        ) from None
    except Exception as err:  # noqa: BLE001 - a zip torch cannot read: damaged somewhere inside
        raise UserError(
            f"--ckpt_path {path}: damaged, torch cannot read it ({_first_sentence(err)}); copy it again, or "
            "pass another checkpoint of the run (its checkpoints/epoch_NNNN.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "loops" not in ckpt:
        raise UserError(
            f"--ckpt_path {path}: a weight file, not a training checkpoint (no optimizer or loop state). "
            f"To start training from these weights pass --model.pretrained {path} instead"
        )
    return ckpt


def _refuse_unless_complete_zip(path: Path) -> None:
    """Name what ``path`` is, and the fix, when it is not a complete zip archive (torch.save's format):
    torch's own messages for these say "mmap can only be used with files saved with ..." or stop
    mid-sentence."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(512)
    weights = f"to start training from these weights pass --model.pretrained {path}"
    fix = "pass a checkpoint a run wrote (runs/<name>/checkpoints/last.ckpt), or --ckpt_path last"
    if head.startswith(b"PK\x03\x04"):
        if zipfile.is_zipfile(path):
            return
        what = (f"truncated: {size:,} bytes without the end of the archive (a copy or a write cut short); copy it "
                "again, or pass another checkpoint of the run (its checkpoints/epoch_NNNN.ckpt)")  # fmt: skip
    elif size == 0:
        what = f"an empty file (0 bytes), not a checkpoint; {fix}"
    # safetensors before the pickle test: its header length's low byte may be 0x80
    elif len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        what = f"a .safetensors weight file, not a training checkpoint; {weights}"
    elif head.startswith(b"\x80"):  # a bare pickle stream: torch.save's legacy format
        what = (f"a weight file in torch's legacy (pre-1.6) format, as .pth releases such as DINO's are, "
                "not a training checkpoint (xcit-ssl writes zip checkpoints with optimizer and loop state); "
                f"{weights}")  # fmt: skip
    elif head.startswith(b"version https://git-lfs"):
        what = "a Git LFS pointer (a small text file), not the checkpoint itself: fetch it with `git lfs pull`"
    elif (text := _text(head)) is not None:
        first = (text.strip().splitlines() or [""])[0][:40]
        what = f"a text file (it begins '{first}'), not a checkpoint; {fix}"
    else:
        what = f"not a torch file (neither torch.save's zip format nor its legacy one); {fix}"
    raise UserError(f"--ckpt_path {path}: {what}")


def _text(head: bytes) -> str | None:
    """``head`` as text when it is printable UTF-8 (a character cut at its end allowed), else None."""
    text = head.decode("utf-8", errors="ignore")
    if len(text.encode("utf-8")) < len(head) - 3:
        return None
    return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None


def _first_sentence(err: Exception) -> str:
    """``Type: first sentence`` of an error, whole (torch's messages run on for several)."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    sentence = text.split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__


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


def saved_split(ckpt: dict[str, Any]) -> BatchSplit | None:
    """The batch split a checkpoint was trained with; None for one written before it was recorded."""
    state = (ckpt.get("callbacks") or {}).get(RECORD_KEY) or {}
    values = [state.get(k) for k in ("world_size", "batch_size", "accumulate")]
    if not all(isinstance(v, int) and v > 0 for v in values):
        return None
    return BatchSplit(*values)


def check_split(ckpt: dict[str, Any], path: Path, split: BatchSplit | None, num_nodes: int = 1) -> None:
    """Refuse to resume with another global batch (peak lr and data position would change)."""
    saved = saved_split(ckpt)
    if saved is None or split is None or saved == split:
        return  # unknown (an older checkpoint, a data module without batch_size): allowed, as before
    if saved.global_batch == split.global_batch:
        logger.info("elastic resume: global batch %s, trained as %s", split.describe(), saved.describe())
        return
    flags = " or ".join(split.restoring_flags(saved, num_nodes)) or (
        f"--trainer.devices {saved.world_size} --data.batch_size {saved.batch_size} "
        f"--trainer.accumulate_grad_batches {saved.accumulate}"
    )
    raise UserError(
        f"--ckpt_path {path} was trained with a global batch of {saved.describe()}, this run's is "
        f"{split.describe()}: the peak lr and the data position would change. Keep {saved.global_batch} with "
        f"{flags}; to train on with another batch, start a new run from its weights with --model.pretrained {path}"
    )


def read_run_id(folder: Path) -> str | None:
    """The id of the run in ``folder`` (its ``run_id`` file), None when it has none."""
    try:
        text = (folder / RUN_ID_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def checkpoint_run_id(ckpt: dict[str, Any]) -> str | None:
    """The id of the run that wrote ``ckpt``; None for one written before ids were recorded."""
    run_id = ((ckpt.get("callbacks") or {}).get(RECORD_KEY) or {}).get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def plan_run(
    ckpt_path: str | None,
    run_dir: str | None,
    recipe: str | None,
    model_cfg: dict[str, Any],
    split: BatchSplit | None = None,
    num_nodes: int = 1,
) -> ResumePlan:
    """Resolve ``--ckpt_path`` and ``--run_dir`` into a :class:`ResumePlan` (no folder is created).

    ``split``: the batch split the config trains with (None: not known, not checked).
    """
    default = f"runs/{recipe or 'run'}"
    if ckpt_path is None and requeued_on_slurm():
        ckpt_path = "last"
    if ckpt_path is None:
        return ResumePlan(fresh_run_dir(run_dir or default), run_id=uuid.uuid4().hex)
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
        ckpt = _read(checkpoint)
    else:
        checkpoint = Path(ckpt_path)
        if not checkpoint.is_file():
            raise UserError(f"--ckpt_path {checkpoint}: no such file; pass last or an existing checkpoint file")
        ckpt = _read(checkpoint)
        owner = run_dir_of(checkpoint.resolve())  # runs/<name> for runs/<name>/checkpoints/*.ckpt
        in_run = owner != checkpoint.resolve().parent and holds_run(owner)
        named, run_id = (Path(run_dir) if run_dir else None), checkpoint_run_id(ckpt)
        # a copy of a run's own checkpoint (a backup) continues that run, not a fresh runs/<name>_1
        ours = named is not None and run_id is not None and holds_run(named) and read_run_id(named) == run_id
        run = owner if in_run else named if ours and named is not None else fresh_run_dir(run_dir or default)
    check_compatible(ckpt, checkpoint, model_cfg, recipe)
    check_split(ckpt, checkpoint, split, num_nodes)
    state = (ckpt.get("callbacks") or {}).get("RunCheckpoints") or {}
    point = ResumePoint(int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), bool(state.get("epoch_end", False)))
    run_id = read_run_id(run) or checkpoint_run_id(ckpt) or uuid.uuid4().hex
    return ResumePlan(run, checkpoint, point, run_id)


class RunRecord(L.Callback):
    """Names the run and its batch split in every checkpoint; resumes another split of its global batch.

    State (``checkpoint["callbacks"]["RunRecord"]``): ``run_id``, ``world_size``, ``batch_size`` (per
    device), ``accumulate``, ``global_batch``, ``position`` (global samples of the current epoch
    trained) and ``steps_per_epoch``. Rank 0 writes ``run_id`` into the run folder once.

    On resume with another split of the same global batch, Lightning's batch counters (per process,
    in micro-batches) are converted to the new split after the training data is set up and before
    the loops load them (``on_fit_start``), and an epoch must keep its number of optimizer steps
    (``--trainer.limit_train_batches`` counts per-process batches). Checkpoints without this state
    resume unchanged.
    """

    def __init__(self, run_dir: str | Path, run_id: str) -> None:
        self.run_dir, self.run_id = Path(run_dir), str(run_id)
        self._trainer: L.Trainer | None = None
        self._elastic: tuple[dict[str, Any], BatchSplit] | None = None  # (checkpoint, its split)

    @property
    def state_key(self) -> str:
        return RECORD_KEY

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if trainer.is_global_zero and read_run_id(self.run_dir) is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / RUN_ID_FILE, self.run_id + "\n")

    def _split(self, trainer: L.Trainer) -> BatchSplit:
        batch = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if batch is None:
            return shape_from_trainer(trainer).split
        return BatchSplit(int(trainer.world_size), int(batch), int(trainer.accumulate_grad_batches))

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {"run_id": self.run_id}
        split = self._split(trainer)
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        steps = _steps_per_epoch(trainer, split)
        return {
            "run_id": self.run_id, "world_size": split.world_size, "batch_size": split.batch_size,
            "accumulate": split.accumulate, "global_batch": split.global_batch,
            "position": batches * split.batch_size * split.world_size,
            "steps_per_epoch": steps,
        }  # fmt: skip

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved, split = saved_split(checkpoint), self._split(trainer)
        if saved is None or saved == split:
            return  # the same split, or written before splits were recorded: resumed as it always was
        if saved.global_batch != split.global_batch:  # plan_run refuses it first; other entry points here
            raise _every_rank(
                f"the checkpoint was trained with a global batch of {saved.describe()}, this run's is "
                f"{split.describe()}; pass {' or '.join(split.restoring_flags(saved)) or 'its split'}"
            )
        self._elastic = (checkpoint, saved)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._elastic is None:
            return
        (checkpoint, saved), self._elastic = self._elastic, None
        split = self._split(trainer)
        before = checkpoint["callbacks"][RECORD_KEY].get("steps_per_epoch")
        now = _steps_per_epoch(trainer, split)
        if isinstance(before, int) and now is not None and now != before:
            raise _every_rank(
                f"an elastic resume keeps the epoch, but this run's has {now} optimizer steps, the checkpoint's "
                f"had {before} (global batch {split.describe()}, trained as {saved.describe()}): "
                "--trainer.limit_train_batches counts batches per process; scale it with the split, or resume "
                "with the checkpoint's devices, batch and accumulation"
            )
        epoch_end = bool(((checkpoint.get("callbacks") or {}).get("RunCheckpoints") or {}).get("epoch_end", False))
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        whole = int(trainer.num_training_batches) if epoch_end and now is not None else None
        _convert_counters(progress, saved, split, whole)
        logger.info(
            "elastic resume: global batch %s, trained so far as %s; epoch %d continues after micro-batch %d",
            split.describe(), saved.describe(), checkpoint.get("epoch", 0), progress["current"]["processed"],
        )  # fmt: skip


def _steps_per_epoch(trainer: L.Trainer, split: BatchSplit) -> int | None:
    """Optimizer steps an epoch of ``trainer`` has (None without an epoch length)."""
    batches = trainer.num_training_batches
    return math.ceil(batches / split.accumulate) if math.isfinite(batches) else None


def _every_rank(message: str) -> UserError:
    """A UserError every process raises alike (the CLI prints it once)."""
    err = UserError(message)
    err.every_rank = True
    return err


def _convert_counters(progress: dict[str, Any], saved: BatchSplit, split: BatchSplit, whole: int | None) -> None:
    """Lightning's batch counters (per process, in micro-batches) from ``saved``'s split to ``split``'s.

    The batches of the current epoch are counted again in the new micro-batches (``whole``: the
    epoch had ended, it has that many now); the offsets between the counters (a checkpoint written
    at a batch's end has one batch not yet "completed") and the earlier epochs' totals are kept.
    """
    current, total = progress["current"], progress["total"]
    done = int(current["processed"]) * saved.world_size * saved.batch_size  # global samples trained
    if whole is None and done % split.global_batch:
        raise _every_rank(
            f"the checkpoint was written inside an optimizer step (global sample {done}), which only its own "
            f"split can resume: pass --trainer.devices {saved.world_size} --data.batch_size {saved.batch_size} "
            f"--trainer.accumulate_grad_batches {saved.accumulate}"
        )
    processed = whole if whole is not None else done // (split.world_size * split.batch_size)
    converted = {key: processed + int(current[key]) - int(current["processed"]) for key in current}
    for key, value in converted.items():
        total[key] = int(total[key]) + value - int(current[key])
        current[key] = value
