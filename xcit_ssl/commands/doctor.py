"""``xcit-ssl doctor``: plan a run before spending it (see :mod:`xcit_ssl.doctor`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import warnings
from typing import Any

import torch

from ..errors import UserError
from ..doctor.advice import Finding, Rates, findings, reach_batch, rates, run_time
from ..doctor.cost import count_step
from ..doctor.data_check import DataReport, check_data
from ..doctor.measure import (
    StepModel, checkpointed_slope, compute_rate, gemm_peak, known_peak, measure, measured_elsewhere, step_precision,
    target_device, timing_spread,
)  # fmt: skip
from ..doctor.plan import IMAGENET_TRAIN_IMAGES, RunPlan, backbone_of, build_plan, setup_as_fit
from ..runs.preflight import bf16_slowdown, planning, precision_warnings
from ..console import print_table
from ..doctor.report import Diagnosis, as_json, rows

logger = logging.getLogger(__name__)

USAGE = """usage: xcit-ssl doctor (--recipe NAME | --config FILE) [fit overrides ...] [doctor options]

Resolves the config exactly as `xcit-ssl fit` would (same overrides, same errors) and reports the
run as configured, its cost, a few real training steps measured on this machine's device, the data
pipeline's speed, the time of the whole run and warnings that name the fix. Writes no run folder.
Any world size and a GPU run can be planned from a machine without them (fit's refusals about the
config still apply); what is measured is measured on this machine's device, and the table says so.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xcit-ssl doctor", usage=USAGE, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--no_measure", action="store_true", help="no training steps and no data-pipeline timing")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per batch size (default 3)")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument(
        "--measure_batches", type=str, default=None,
        help="comma-separated micro-batch sizes to run (default: 2, then the largest that runs within "
        "--step_budget seconds and fits, up to the configured batch)",
    )  # fmt: skip
    p.add_argument("--step_budget", type=float, default=4.0, help="seconds one measured step may take (default 4)")
    p.add_argument("--max_step_seconds", type=float, default=120.0,
                   help="skip the measurement when a batch-2 step is estimated to take longer (default 120)")  # fmt: skip
    p.add_argument("--data_seconds", type=float, default=10.0, help="seconds of data-pipeline timing (default 10)")
    p.add_argument("--num_samples", type=int, default=None, help="training-set size to plan with when the data is elsewhere")
    p.add_argument("--target_batch", type=int, default=None, help="global batch to reach (default: the recipe's)")
    return p


def _help() -> str:
    lines = [USAGE, "doctor options:"]
    for action in _parser()._actions:
        if action.help:
            lines.append(f"  {', '.join(action.option_strings):<20} {action.help}")
    lines.append("\nEvery other option is fit's: xcit-ssl fit --help lists them.")
    return "\n".join(lines)


def _user_error(err: BaseException) -> UserError | None:
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    return cause


def instantiate(cli: Any, on_meta: bool) -> tuple[Any, Any]:
    """The config's model and data module (on the ``meta`` device when nothing will run).

    On ``meta`` the transforms hold meta tensors too (torchvision's v2 keeps some parameters as
    tensors), so a meta data module may open its data set but never transform an image.
    """
    place = torch.device("meta") if on_meta else contextlib.nullcontext()
    try:
        with place, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            config = cli.config.clone()
            config[cli.subcommand].trainer.logger = None  # a plan needs no tracker (MLflow would open its store)
            init = cli.parser.instantiate_classes(config)
    except (ValueError, TypeError, RuntimeError) as err:
        found = _user_error(err)
        if found is None:
            raise
        raise found from None
    section = init[cli.subcommand]
    return section["model"], section["data"]


def _samples(data: DataReport, given: int | None) -> tuple[int, str]:
    if given:
        return given, "given with --num_samples"
    if data.num_samples:
        return data.num_samples, f"counted in {data.root}"
    return IMAGENET_TRAIN_IMAGES, f"assumed (ImageNet-1k train): {data.root} is not readable; pass --num_samples"


def _peak(plan: RunPlan, steps: StepModel | None) -> tuple[float | None, str]:
    if steps is None:
        return None, "device peak not looked up (--no_measure)"
    device = target_device(plan)
    if device.type == "cuda":
        peak, note = known_peak(torch.cuda.get_device_name(device), plan.precision)
        if peak is not None:
            return peak, note
    return gemm_peak(device, plan.precision)


def _estimate_seconds(plan: RunPlan, train_flops_per_image: int, batch: int) -> float:
    """A pessimistic guess of one step's time from the GEMM rate (a quarter of it is reached)."""
    flops = compute_rate(target_device(plan), step_precision(plan), seconds=0.2)
    return batch * train_flops_per_image / (0.25 * flops)


def _plan_notes(plan: RunPlan, written_accelerator: Any) -> list[str]:
    """What the reader of a plan made on another machine than the run's should know."""
    notes = []
    if str(written_accelerator or "auto").lower() == "auto" and plan.accelerator == "cpu":  # auto found no GPU
        notes.append(
            f"accelerator auto is the CPU on this machine (no CUDA GPU visible): planned as {plan.world} CPU "
            "process(es); pass --trainer.accelerator gpu to plan the GPU run"
        )
    return notes


def diagnose(argv: list[str], opts: argparse.Namespace) -> Diagnosis:
    from ..console import adopt_library_loggers
    from .fit import resolve_config

    adopt_library_loggers()  # Lightning's loggers, imported by now, print through our one handler
    with planning():  # the config's refusals only: a cluster run is planned from a laptop
        cli = resolve_config(argv)
    cfg = cli.config[cli.subcommand]
    model, datamodule = instantiate(cli, on_meta=opts.no_measure)
    logger.info("doctor: checking the data")
    data = check_data(datamodule, seconds=opts.data_seconds, measure=not opts.no_measure)
    trainer_cfg = dict(cfg.trainer)
    if data.num_samples and not opts.num_samples:  # the data module's own refusals, under the planned world
        setup_as_fit(datamodule, trainer_cfg)
    num_samples, note = _samples(data, opts.num_samples)
    config_files = cfg.get("config") or []
    recipe_file = str(config_files[0]) if config_files else None
    plan = build_plan(cfg, model, datamodule, num_samples, note, recipe_file)
    cost = count_step(model, plan)
    notes = _plan_notes(plan, trainer_cfg.get("accelerator"))
    elsewhere = measured_elsewhere(plan)
    steps: StepModel | None = None
    if not opts.no_measure:
        batches = [int(b) for b in opts.measure_batches.split(",")] if opts.measure_batches else None
        guess = _estimate_seconds(plan, cost.train_flops_per_image, min(plan.batch_size, 2))
        if batches is None and guess > opts.max_step_seconds:
            notes.append(
                f"training steps not measured: a step of 2 images is estimated at {guess:.0f} s here "
                f"(> --max_step_seconds {opts.max_step_seconds:g}); pass --measure_batches 1 to measure anyway"
            )
        else:
            logger.info("doctor: measuring training steps on %s", target_device(plan))
            steps = measure(
                model, plan, trainer_cfg, opts.steps, opts.warmup_steps, batches, opts.step_budget, datamodule
            )
    if steps is not None and elsewhere:  # this machine's memory says nothing of the planned device's
        steps.capacity_bytes, steps.capacity_note = None, elsewhere
        if target_device(plan).type == "cpu" and precision_warnings(step_precision(plan), "cpu"):
            notes.append(
                f"{elsewhere}, in {step_precision(plan)}: bfloat16 runs {bf16_slowdown():.0f}x slower than float32 on "
                f"this CPU, so its steps say little about the planned {plan.accelerator}'s"
            )
    if steps is not None and timing_spread(steps) > 2:
        notes.append(
            f"step times varied {timing_spread(steps):.1f}x between steps: the host is busy (other processes, or "
            "more threads than free cores); the fastest step counts. OMP_NUM_THREADS=1 steadies a shared CPU"
        )
    max_fit = steps.max_batch() if steps is not None else None
    target = opts.target_batch or plan.reference_batch
    checkpoint_fit = None
    needs_room = max_fit is not None and (
        max_fit < plan.batch_size or (target is not None and max_fit * plan.world < target)
    )
    if steps is not None and needs_room and hasattr(backbone_of(model), "set_grad_checkpointing"):
        logger.info("doctor: measuring a step with gradient checkpointing")
        slope = checkpointed_slope(model, plan, trainer_cfg, steps, datamodule=datamodule)
        if slope and steps.capacity_bytes is not None:
            checkpoint_fit = max(0, int((steps.capacity_bytes - steps.m0) // slope))
    speed = rates(plan, steps, data if data.images_per_s else None)
    judged = speed
    if elsewhere:  # no verdict, run time or worker advice from another device's speed
        speed = Rates(speed.compute, speed.data, None, None, "")
        judged = Rates(None, speed.data, None, None, "")
    peak, peak_note = _peak(plan, steps)
    reach = reach_batch(plan, target, max_fit) if target else None
    if target and reach is None and plan.global_batch != target:
        reach = "does not fit even at 1 image per device: add devices" if max_fit == 0 else "add devices"
    if reach and checkpoint_fit and max_fit is not None and checkpoint_fit > max_fit:
        reach += f"; or gradient checkpointing (backbone.set_grad_checkpointing(); {checkpoint_fit} images per device fit)"
    found = findings(plan, data, None if elsewhere else steps, judged, max_fit, checkpoint_fit)
    found += [Finding("bf16_slow", m) for m in precision_warnings(plan.precision, plan.accelerator)]
    return Diagnosis(
        plan=plan, cost=cost, data=data, steps=steps, speed=speed, run=run_time(plan, speed), findings=found,
        max_fit=max_fit, checkpoint_fit=checkpoint_fit, peak_flops=peak if steps is not None else None,
        peak_note=peak_note, target_batch=target, reach=reach, notes=notes, elsewhere=elsewhere,
    )  # fmt: skip


def doctor_main(argv: list[str]) -> int:
    opts, rest = _parser().parse_known_args(argv)
    if opts.help:
        print(_help())
        return 0
    for name in ("steps", "warmup_steps"):
        if getattr(opts, name) < (1 if name == "steps" else 0):
            raise UserError(f"--{name} {getattr(opts, name)}: use a positive number")
    if opts.measure_batches:
        try:
            sizes = [int(b) for b in opts.measure_batches.split(",")]
        except ValueError:
            sizes = [0]
        if not sizes or min(sizes) < 1:
            raise UserError(f"--measure_batches {opts.measure_batches}: give positive sizes, e.g. 2,8")
    diagnosis = diagnose(rest, opts)
    if opts.json:
        print(json.dumps(as_json(diagnosis), indent=2, default=str))
    else:
        print_table(f"xcit-ssl doctor: {diagnosis.plan.recipe or 'config'}", ("item", "value", "note"),
                    rows(diagnosis), wrap=("value", "note"))
    return 0
