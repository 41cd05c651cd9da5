"""The doctor's findings as one rich table, or as a JSON document for scripts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .advice import Finding, Rates, step_peak, step_seconds
from .cost import StepCost
from .data_check import DataReport
from .measure import StepModel
from .plan import RunPlan


@dataclass
class Diagnosis:
    plan: RunPlan
    cost: StepCost | None
    data: DataReport | None
    steps: StepModel | None
    speed: Rates
    run: dict[str, Any]
    findings: list[Finding]
    max_fit: int | None = None
    checkpoint_fit: int | None = None
    peak_flops: float | None = None
    peak_note: str = ""
    target_batch: int | None = None
    reach: str | None = None
    notes: list[str] = field(default_factory=list)
    elsewhere: str = ""  # "measured on cpu, not the planned gpu" when this machine lacks the run's device

    @property
    def mfu(self) -> float | None:
        if not (self.peak_flops and self.cost and self.speed.compute):
            return None
        return self.cost.train_flops_per_image * self.speed.compute / self.peak_flops


def _g(n: float) -> str:
    return f"{n / 1e9:.3g} G"


def _big(n: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def rows(d: Diagnosis) -> list[tuple[str, str, str]]:
    """(item, value, note) rows; items starting with '#' are section headers."""
    p = d.plan
    out: list[tuple[str, str, str]] = [("# the run as configured", "", "")]
    out.append(("recipe", f"{p.recipe or '(config file)'}: {p.method}, {p.backbone} (patch {p.patch_size})", ""))
    out.append((
        "global batch",
        f"{p.batch_size} per device x {p.devices} {p.accelerator} x {p.num_nodes} node(s) x {p.accumulate} accumulation "
        f"= {p.global_batch}",
        f"recipe: {p.reference_batch} ({p.reference_note})" if p.reference_batch else "",
    ))  # fmt: skip
    if p.peak_lr is not None:
        out.append(("peak lr", f"{p.peak_lr:.3g}", f"base_lr {p.base_lr:.3g} x {p.global_batch} / {p.lr_per}"))
    out.append(("training images", f"{p.num_samples:,}", p.samples_note))
    out.append((
        "steps",
        f"{p.steps_per_epoch:,} per epoch, {p.total_steps:,} in all ({p.run_epochs:.3g} epoch(s))",
        "optimizer steps",
    ))  # fmt: skip
    warm = ", ".join(f"{k} {v:g}" for k, v in p.warmups.items())
    out.append(("warm-up", f"{p.warmup_steps:,} lr warm-up steps", warm))
    crops = " + ".join(f"{n} x {s} px" for s, n in p.crops)
    out.append(("crops", crops, "teacher: the first {p.n_global}".format(p=p) if p.n_global else ""))
    out.append(("precision / sync BN / workers", f"{p.precision} / {p.sync_batchnorm} / {p.num_workers}", ""))
    c = d.cost
    if c is not None:
        out.append(("# cost", "", ""))
        out.append(("units", "MACs = multiply-adds (the GFLOPs of `xcit-ssl models`)", "FLOP = 2 MACs"))
        parts = ", ".join(f"{k} {_m(v)}" for k, v in c.params_by_part.items())
        out.append(("parameters", f"{_m(c.params_trained)} trained, {_m(c.params_frozen)} frozen", parts))
        by_size = ", ".join(f"{s} px {_g(m)}" for s, m in c.backbone_macs.items())
        views = " + ".join(f"{n} x {_g(c.backbone_macs[s])}" for s, n in p.crops)
        out.append(("backbone forward / image", f"{_g(c.forward_macs)} MACs", f"{views}; per view: {by_size}"))
        out.append((
            "training / image",
            f"{_g(c.train_macs_per_image)} MACs",
            f"3 x (backbone {_g(c.forward_macs)} + head {_g(c.head_macs)}) + teacher {_g(c.teacher_macs)}",
        ))  # fmt: skip
        step = c.train_flops_per_image * p.global_batch
        out.append(("per optimizer step", f"{_big(step)}FLOP", f"{_big(step / 2)}MACs x global batch {p.global_batch}"))
        out.append(("whole run", f"{_big(step * p.total_steps)}FLOP", f"{p.total_steps:,} steps"))
        out.append(("model state / device", _gib(c.state_bytes()), "fp32 weights + grads + AdamW moments, frozen weights"))
        out += [("note", n, "") for n in c.notes]
    s = d.steps
    if s is not None and s.samples:
        out.append((f"# measured on {s.device}", "", ""))
        if d.elsewhere:
            out.append(("device", d.elsewhere, f"this machine's step time, memory and MFU; no run time for the {p.accelerator}"))
        runs = "; ".join(
            f"batch {x.batch}{' (grad ckpt)' if x.grad_checkpointing else ''}: {x.time:.3g} s, {_gib(x.peak_bytes)}"
            for x in s.samples
        )
        out.append(("steps run", runs, f"fastest of the timed steps; {s.memory_method}"))
        measured = s.measured(p.batch_size) is not None
        how = "measured" if measured else f"predicted: {s.t0:.3g} s + {s.t1:.3g} s x batch"
        t = step_seconds(s, p.batch_size)
        out.append(("step time", f"{t:.3g} s per micro-step of {p.batch_size}", how))
        if p.accumulate > 1:
            out.append(("optimizer step", f"{p.accumulate * t:.3g} s", f"{p.accumulate} micro-steps"))
        out.append(("compute images/s / device", f"{d.speed.compute:.3g}", ""))
        peak = step_peak(s, p.batch_size)
        how = "measured" if measured else f"predicted: {_gib(s.m0)} + {s.m1 / 2**20:.3g} MiB x batch"
        out.append(("peak memory / device", _gib(peak), how))
        if s.capacity_bytes is not None:
            verdict = "fits" if peak <= s.capacity_bytes else "OUT OF MEMORY predicted"
            out.append(("device memory", f"{_gib(s.capacity_bytes)}: {verdict}", s.capacity_note))
            ckpt = f"; {d.checkpoint_fit} with gradient checkpointing" if d.checkpoint_fit else ""
            out.append(("largest batch that fits", f"{d.max_fit}{ckpt}", "per device, from the linear fit"))
        if s.oom_batches:
            out.append(("out of memory at", ", ".join(map(str, s.oom_batches)), "while measuring"))
    if d.data is not None:
        dd = d.data
        if dd.images_per_s:
            out.append((
                "data pipeline",
                f"{dd.images_per_s:.3g} img/s with {dd.workers} workers",
                f"{dd.read} images of {dd.root} in {dd.seconds:.1f} s ({dd.per_core:.3g} img/s per core, "
                f"{dd.cores} cores here); {dd.unreadable} unreadable"
                + ("; workers decode and crop, the photometric half runs in the step" if dd.photometric == "device" else ""),
            ))  # fmt: skip
        else:
            out.append(("data", dd.status, dd.message[:160]))
    sp = d.speed
    if sp.bound:
        ratio = sp.compute / sp.data if sp.bound == "data" else sp.data / sp.compute
        out.append(("verdict", f"{sp.bound}-bound by {ratio:.2f}x", f"expected {sp.expected:.3g} img/s per device; {sp.note}"))
    if d.mfu is not None:
        out.append(("MFU", f"{100 * d.mfu:.1f} %", f"of {_big(d.peak_flops)}FLOP/s, {d.peak_note}"))
    elif d.peak_note:
        out.append(("MFU", "unknown", d.peak_note))
    if d.run:
        r = d.run
        out.append(("# the whole run", "", ""))
        out.append((
            "time",
            _duration(r["seconds"]),
            f"{p.world} device(s) at {sp.expected:.3g} img/s each, {r['images']:,} images; {r['device_hours']:.3g} "
            f"{r['unit']}",
        ))  # fmt: skip
    elif d.elsewhere and s is not None and s.samples:
        out.append(("# the whole run", "", ""))
        out.append(("time", "not estimated", f"{d.elsewhere}: run xcit-ssl doctor where the run will run"))
    if d.target_batch and d.reach:
        out.append((f"to reach global batch {d.target_batch}", d.reach, f"on {p.world} device(s)"))
    out += [("note", n, "") for n in d.notes]
    out.append((f"# warnings ({len(d.findings)})", "", ""))
    out += [(f.code, f.message, "") for f in d.findings] or [("none", "", "")]
    return out


def as_json(d: Diagnosis) -> dict[str, Any]:
    p = d.plan
    plan = asdict(p) | {"world": p.world, "global_batch": p.global_batch, "peak_lr": p.peak_lr, "run_epochs": p.run_epochs}
    cost = None
    if d.cost is not None:
        c = d.cost
        cost = asdict(c) | {
            "student_macs": c.student_macs,
            "train_macs_per_image": c.train_macs_per_image,
            "train_flops_per_image": c.train_flops_per_image,
            "train_flops_per_step": c.train_flops_per_image * p.global_batch,
            "train_flops_run": c.train_flops_per_image * p.global_batch * p.total_steps,
            "state_bytes": c.state_bytes(),
        }
        cost["backbone_macs"] = {str(k): v for k, v in c.backbone_macs.items()}
    measured = None
    if d.steps is not None and d.steps.samples:
        s = d.steps
        measured = asdict(s) | {
            "step_seconds": step_seconds(s, p.batch_size),
            "peak_bytes": step_peak(s, p.batch_size),
            "measured_at_configured_batch": s.measured(p.batch_size) is not None,
            "max_batch": d.max_fit,
            "max_batch_grad_checkpointing": d.checkpoint_fit,
        }
    return {
        "plan": plan,
        "cost": cost,
        "measured": measured,
        "data": asdict(d.data) if d.data is not None else None,
        "rates": asdict(d.speed),
        "mfu": d.mfu,
        "peak_flops": d.peak_flops,
        "peak_note": d.peak_note,
        "run": d.run,
        "target_batch": d.target_batch,
        "reach_target": d.reach,
        "warnings": [f.as_dict() for f in d.findings],
        "notes": d.notes,
        "measured_elsewhere": d.elsewhere or None,
    }
