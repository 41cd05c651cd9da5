"""The parts of ``gpu_check.sh`` that run the real CLI (``python -m xcit_ssl.cli fit|knn``, with this
interpreter, as a user would), each recording its command line: ``fit`` start to exit, ``kill-resume``
(a strategy's run killed with SIGTERM and resumed, against uninterrupted runs), ``knn``. Subcommands
of ``parts.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHILDREN: list[tuple[subprocess.Popen, bool]] = []  # (process, own session): to end if this part is stopped


def stop_children(signum: int, frame: object) -> None:  # noqa: ARG001
    """``timeout`` stopped this part: end the runs it started (their own sessions too), then exit."""
    for proc, own_session in CHILDREN:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL) if own_session else proc.kill()
            except ProcessLookupError:
                pass
    sys.exit(128 + signum)


def _write(path: str, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str), flush=True)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _cli(command: str, flags: list[str], log: Path, own_session: bool = False) -> subprocess.Popen:
    """``python -m xcit_ssl.cli COMMAND FLAGS`` as a user would start it, output to ``log``."""
    cmd = [sys.executable, "-m", "xcit_ssl.cli", command, *flags]
    env = dict(os.environ, MASTER_PORT=_free_port(), PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=own_session)
    CHILDREN.append((proc, own_session))
    return proc


def _tail(log: Path, n: int = 15) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-n:] if log.exists() else []


def fit(args: argparse.Namespace) -> int:
    """``xcit-ssl fit`` from start to exit: training images per second, start-up included."""
    run, log = Path(args.work) / "fit_run", Path(args.work) / "fit.log"
    flags = ["--run_dir", str(run), "--trainer.max_steps", str(args.steps), "--data.batch_size", str(args.batch), *args.flags]
    start = time.perf_counter()
    proc = _cli("fit", flags, log)
    code = proc.wait()
    seconds = time.perf_counter() - start
    record = {"command": f"python -m xcit_ssl.cli fit {' '.join(flags)}", "exit_code": code, "steps": args.steps,
              "batch": args.batch, "seconds_start_to_exit": round(seconds, 1),
              "img_per_s_start_to_exit": round(args.steps * args.batch / seconds, 1), "run_dir": str(run)}  # fmt: skip
    if code:
        record["log_tail"] = _tail(log)
    _write(args.json, record)
    return code


def _weights(path: Path) -> tuple[int, dict]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - our own file; a strategy may pickle more than tensors
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt["global_step"]), ckpt["state_dict"]


def compare_weights(a: Path, b: Path) -> dict:
    """Max abs difference over the floating tensors of two checkpoints' ``state_dict``: all of them,
    and the parameters alone (no BatchNorm running statistics, no DINO center)."""
    step_a, sa = _weights(a)
    step_b, sb = _weights(b)
    worst = {"all": (0.0, None), "parameters": (0.0, None)}
    scale = 0.0
    for key in sorted(set(sa) & set(sb)):
        x, y = sa[key], sb[key]
        if not x.is_floating_point() or x.shape != y.shape or not x.numel():
            continue
        diff = (x.float() - y.float()).abs().max().item()
        scale = max(scale, x.float().abs().max().item())
        groups = ["all"] if "running_" in key or key.startswith("loss_fn.") else ["all", "parameters"]
        for group in groups:
            if diff > worst[group][0] or worst[group][1] is None:
                worst[group] = (diff, key)
    return {"steps": [step_a, step_b], "keys_only_in_reference": sorted(set(sa) - set(sb))[:10],
            "keys_only_in_other": sorted(set(sb) - set(sa))[:10], "tensors_compared": len(set(sa) & set(sb)),
            "max_abs_diff": worst["all"][0], "max_abs_diff_key": worst["all"][1],
            "max_abs_diff_parameters": worst["parameters"][0], "max_abs_diff_parameters_key": worst["parameters"][1],
            "max_abs_weight": scale}  # fmt: skip


def kill_resume(args: argparse.Namespace) -> int:
    """The same ``fit`` four times: with ``--trainer.strategy auto`` (the single-device reference),
    and under ``--strategy`` uninterrupted, then SIGTERM to its process group once its first
    checkpoint is written and resumed from ``last.ckpt``. Final weights compared: resumed vs auto
    (what the issue asks) and resumed vs the same strategy uninterrupted (the resume alone: Lightning's
    distributed set-up reseeds the RNGs after the model is built, so augmentation and drop-path draws
    under a distributed strategy differ from a single-device run's even at world size 1)."""
    work = Path(args.work)
    common = ["--trainer.max_steps", str(args.steps), "--checkpoint_every_n_steps", str(args.every),
              "--checkpoint_every_minutes", "0", "--data.batch_size", str(args.batch), *args.flags]  # fmt: skip
    record: dict = {"strategy": args.strategy, "steps": args.steps, "checkpoint_every_n_steps": args.every,
                    "batch": args.batch, "note": args.note or None, "runs": {}}  # fmt: skip
    log, s = work / "kill_resume.log", args.strategy
    folders = {"reference_auto": work / "ref_auto", f"{s}_uninterrupted": work / f"{s}_uninterrupted", s: work / f"run_{s}"}

    for name, strategy in (("reference_auto", "auto"), (f"{s}_uninterrupted", s)):
        t = time.perf_counter()
        code = _cli("fit", ["--run_dir", str(folders[name]), "--trainer.strategy", strategy, *common], log).wait()
        record["runs"][name] = {"exit_code": code, "seconds": round(time.perf_counter() - t, 1)}

    t = time.perf_counter()
    proc = _cli("fit", ["--run_dir", str(folders[s]), "--trainer.strategy", s, *common], log, own_session=True)
    last = folders[s] / "checkpoints" / "last.ckpt"
    while proc.poll() is None and not last.exists():
        time.sleep(0.05)
    signalled = proc.poll() is None
    if signalled:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as SLURM and `kill -- -PGID` signal it
    code = proc.wait()
    killed_step = _weights(last)[0] if last.exists() else None
    record["runs"][f"{s}_killed"] = {"sigterm_sent": signalled, "exit_code": code, "expected_exit_code": 143,
                                     "last_ckpt_step": killed_step, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
    t = time.perf_counter()
    code = _cli("fit", ["--config", str(folders[s] / "config.yaml"), "--ckpt_path", "last"], log).wait() if last.exists() else None
    record["runs"][f"{s}_resumed"] = {"exit_code": code, "seconds": round(time.perf_counter() - t, 1)}

    finals = {name: folder / "checkpoints" / "last.ckpt" for name, folder in folders.items()}
    ok = all(r["exit_code"] == 0 for k, r in record["runs"].items() if not k.endswith("killed"))
    if ok and all(p.exists() for p in finals.values()):
        record["resumed_vs_auto"] = compare_weights(finals["reference_auto"], finals[s])
        record["resumed_vs_uninterrupted"] = compare_weights(finals[f"{s}_uninterrupted"], finals[s])
        record["same_final_step"] = record["resumed_vs_auto"]["steps"] == [args.steps, args.steps]
    else:
        record["log_tail"] = _tail(log, 30)
    _write(args.json, record)
    killed_ok = record["runs"][f"{s}_killed"]["exit_code"] == 143 and killed_step is not None
    return 0 if ok and killed_ok and record.get("same_final_step") else 1


def knn(args: argparse.Namespace) -> int:
    """``xcit-ssl knn`` on the JPEG folder; feature extraction rate from its own timing record."""
    out, log = Path(args.work) / "knn_result.json", Path(args.work) / "knn.log"
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    weights = ["--checkpoint", str(ckpt)] if ckpt and ckpt.exists() else ["--random_init", args.backbone]
    flags = [*weights, "--data.root", args.root, "--out", str(out), "--no_cache", "true", "--progress", "false", *args.flags]
    code = _cli("knn", flags, log).wait()
    record: dict = {"command": f"python -m xcit_ssl.cli knn {' '.join(flags)}", "exit_code": code}
    if code == 0:
        result = json.loads(out.read_text())
        timing = result.get("timing", {})
        record.update({"num_train": result.get("num_train"), "num_val": result.get("num_test"), "backend": result.get("backend"),
                       "search_seconds": result.get("search_seconds"), "timing": timing,
                       "top1": {k: v["top1"] for k, v in result.get("results", {}).items()}})  # fmt: skip
        if timing.get("train_features_seconds"):
            record["train_features_img_per_s"] = round(result["num_train"] / timing["train_features_seconds"], 1)
    else:
        record["log_tail"] = _tail(log)
    _write(args.json, record)
    return code
