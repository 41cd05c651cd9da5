"""Runs that are killed, not finished: real ``xcit-ssl fit`` subprocesses, SIGKILL and SIGTERM
mid-epoch, resumed by ``last`` and by path, compared with an uninterrupted run of the same config.

The recipes keep the settings that matter for exactness: stochastic depth in the student,
BatchNorm (conv stem, LPI, DINO head), multi-crop augmentation, a supervised run with mixup/CutMix
and a model EMA. The batches each run trained on are recorded (a hash of images and labels), so
repeated or skipped samples and different augmentation draws show up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_cli_fit import _write_image_folder

HERE = Path(__file__).parent
REPO = HERE.parent.parent


def _recipe(tmp: Path, data_root: Path, kind: str, workers: int, callbacks: list[dict]) -> Path:
    if kind == "dino":
        recipe = yaml.safe_load((REPO / "recipes" / "dino_nano_fmnist.yaml").read_text())
        model = recipe["model"]["init_args"]
        model["backbone"]["init_args"].update(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.2)
        model["dino"].update(out_dim=64, hidden_dim=32, bottleneck_dim=16)
        model["optim"].update(freeze_last_layer=1, warmup_epochs=0.5)
        data = recipe["data"]["init_args"]
        data["train_transform"]["init_args"]["n_local_crops"] = 2
    else:
        recipe = yaml.safe_load((REPO / "recipes" / "sup_nano_fmnist.yaml").read_text())
        model = recipe["model"]["init_args"]
        model["backbone"]["init_args"].update(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.2, num_classes=3)
        model["mixup"].update(prob=1.0, num_classes=3) if "num_classes" in model["mixup"] else model["mixup"].update(prob=1.0)
        data = recipe["data"]["init_args"]
        data.pop("limit_val_samples", None)
    data.update(dataset="imagefolder", root=str(data_root), batch_size=4, num_workers=workers, pad_to=None)
    recipe["trainer"].update(max_epochs=2, limit_train_batches=None, enable_model_summary=False, log_every_n_steps=1)
    recipe["trainer"]["callbacks"] = callbacks
    path = tmp / f"tiny_{kind}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fit(*args: str, own_group: bool = False, merged: bool = False) -> subprocess.Popen:
    """``merged``: stderr into stdout, as a terminal, ``2>&1`` or a SLURM output file shows them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]))
    return subprocess.Popen(
        [sys.executable, "-m", "xcit_ssl.cli", "fit", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
        start_new_session=own_group,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + (err or "")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"fit exited ({proc.returncode}) before {path.name}:\n{_finish(proc)[1][-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)
    time.sleep(0.2)


def _record(path: Path) -> list[tuple[int, str]]:
    return [(int(line.split()[0]), line.split()[3]) for line in path.read_text().splitlines()]


def _assert_same_state(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"]):
        for pid, state in sa["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(sb["state"][pid][name], value, rtol=1e-5, atol=1e-7, msg=f"{pid}.{name}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("kill_data"), per_class=12)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """One uninterrupted DINO and one supervised run, the references of every kill test."""
    tmp = tmp_path_factory.mktemp("reference")
    runs = {}
    for kind in ("dino", "sup"):
        log = tmp / f"{kind}.batches"
        recipe = _recipe(tmp, data_root, kind, 0, [{"class_path": "kill_helpers.RecordBatches", "init_args": {"path": str(log)}}])
        code, out = _finish(_fit("--recipe", str(recipe), "--run_dir", str(tmp / kind), "--checkpoint_every_n_epochs", "1"))
        assert code == 0, out[-3000:]
        runs[kind], runs[f"{kind}_log"] = tmp / kind, log
    return runs


def test_sigkill_during_checkpoint_write_then_resume_last(tmp_path: Path, data_root: Path, uninterrupted: dict) -> None:
    """SIGKILL inside the 5th checkpoint write (step 5, mid-epoch 0), resume with --ckpt_path last."""
    log, marker = tmp_path / "batches", tmp_path / "in_write"
    callbacks = [
        {"class_path": "kill_helpers.RecordBatches", "init_args": {"path": str(log)}},
        {"class_path": "kill_helpers.BlockInSave", "init_args": {"nth": 5, "marker": str(marker)}},
    ]
    recipe = _recipe(tmp_path, data_root, "dino", 0, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_n_steps", "1",
                "--checkpoint_every_n_epochs", "1")  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.glob(".*tmp-*")], "the write that was killed left its temporary file"
    previous = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert previous["global_step"] == 4  # the write of step 5 never replaced it
    killed = _record(log)

    # the resumed run must not know which callbacks the killed one had: drop BlockInSave
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = callbacks[:1]
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    code, out = _finish(_fit("--config", str(tmp_path / "resume.yaml"), "--ckpt_path", "last"))
    assert code == 0, out[-3000:]
    assert not list(ckpts.glob(".*tmp-*")), "stale temporary checkpoint left behind"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch_0000.ckpt", "epoch_0001.ckpt", "last.ckpt"]
    _assert_same_state(uninterrupted["dino"] / "checkpoints" / "last.ckpt", ckpts / "last.ckpt")
    # the batches: steps 1-5 from the killed run (5 was trained, its checkpoint never written), then 5.. resumed
    reference = _record(uninterrupted["dino_log"])
    resumed = _record(log)[len(killed):]
    assert killed == reference[:5]
    assert resumed == reference[4:], "the resumed run saw other samples or other augmentation draws"
    # the metrics history starts at step 0 and holds each step once
    import csv

    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 0 and len(steps) == 18


def test_sigterm_saves_after_the_step_exits_nonzero_and_resumes_by_path(
    tmp_path: Path, data_root: Path, uninterrupted: dict
) -> None:
    """SIGTERM mid-epoch 1 with one DataLoader worker: last.ckpt newer than the signal, exit 143."""
    log, marker, go = tmp_path / "batches", tmp_path / "paused", tmp_path / "go"
    callbacks = [
        {"class_path": "kill_helpers.RecordBatches", "init_args": {"path": str(log)}},
        {"class_path": "kill_helpers.PauseAt", "init_args": {"step": 12, "marker": str(marker), "go": str(go)}},
    ]
    recipe = _recipe(tmp_path, data_root, "dino", 1, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_minutes", "0",
                "--checkpoint_every_n_epochs", "1", merged=True)  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    go.touch()
    code, out = _finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "received SIGTERM" in out and "--ckpt_path" in out and "Traceback" not in out
    assert "\nxcit-ssl fit: interrupted" in out, "the last message is glued to the progress bar's line"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 13  # the step in flight, then saved

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = callbacks[:1]
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    code, out = _finish(_fit("--config", str(tmp_path / "resume.yaml"), "--ckpt_path", str(last)))
    assert code == 0, out[-3000:]
    # the bar of the resumed epoch names it and counts to its end (Lightning skips its epoch-start hook)
    per_epoch = sum(1 for line in uninterrupted["dino_log"].read_text().splitlines() if line.split()[1] == "0")
    bars = [part for part in re.split(r"[\r\n]", out) if re.search(r"it/s|s/it", part)]
    assert bars and bars[-1].startswith("Epoch 1:") and f"{per_epoch}/{per_epoch} " in bars[-1], bars[-3:]
    _assert_same_state(uninterrupted["dino"] / "checkpoints" / "last.ckpt", last)
    assert _record(log) == _record(uninterrupted["dino_log"])  # nothing repeated, skipped or redrawn


def test_supervised_sigkill_mid_epoch_resume_last(tmp_path: Path, data_root: Path, uninterrupted: dict) -> None:
    """Supervised (mixup/CutMix on every batch, model EMA, drop-path): SIGKILL mid-epoch 0."""
    log, marker = tmp_path / "batches", tmp_path / "paused"
    callbacks = [
        {"class_path": "kill_helpers.RecordBatches", "init_args": {"path": str(log)}},
        {"class_path": "kill_helpers.PauseAt", "init_args": {"step": 6, "marker": str(marker)}},
    ]
    recipe = _recipe(tmp_path, data_root, "sup", 0, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_n_steps", "3",
                "--checkpoint_every_n_epochs", "1")  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = callbacks[:1]
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    code, out = _finish(_fit("--config", str(tmp_path / "resume.yaml"), "--ckpt_path", "last"))
    assert code == 0, out[-3000:]
    _assert_same_state(uninterrupted["sup"] / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert _record(log) == _record(uninterrupted["sup_log"])


def test_resume_from_epoch_end_file_equals_uninterrupted(tmp_path: Path, uninterrupted: dict) -> None:
    """A periodic epoch_NNNN.ckpt resumed by path, in its own run folder, ends where the run ended."""
    run = uninterrupted["dino"]
    final = run / "checkpoints" / "last.ckpt"
    reference = tmp_path / "reference_last.ckpt"
    reference.write_bytes(final.read_bytes())
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = []
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    code, out = _finish(_fit("--config", str(tmp_path / "resume.yaml"), "--ckpt_path", str(run / "checkpoints" / "epoch_0000.ckpt")))
    assert code == 0, out[-3000:]
    _assert_same_state(reference, final)


@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGUSR1,), (signal.SIGTERM, signal.SIGTERM)])
def test_every_preemption_signal_saves_and_exits_128_plus_n(tmp_path: Path, data_root: Path, signals: tuple) -> None:
    """SIGINT (Ctrl-C), SIGUSR1 (SLURM's warning), and a second SIGTERM arriving while the first is
    being handled: last.ckpt of the step in flight, loadable, no temporary file, exit 128 + N."""
    marker, go = tmp_path / "paused", tmp_path / "go"
    callbacks = [{"class_path": "kill_helpers.PauseAt", "init_args": {"step": 3, "marker": str(marker), "go": str(go)}}]
    recipe = _recipe(tmp_path, data_root, "dino", 0, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_minutes", "0")
    _wait_for(marker, proc)
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.1)
    go.touch()
    code, out = _finish(proc)
    assert code == 128 + signals[0], out[-3000:]
    assert f"received {signal.Signals(signals[0]).name}" in out and "Traceback" not in out
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(ckpts.glob(".*"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_reaches_the_workers_too_and_still_saves(
    tmp_path: Path, data_root: Path, signum: int
) -> None:
    """SLURM signals every process of a job step, ``kill -- -PGID`` a group, Ctrl-C the terminal's
    foreground group: the DataLoader workers get the signal with the training process. They must
    leave it to the training process, which saves the step in flight and exits 128 + N; before,
    the killed worker made it fail (``DataLoader worker ... is killed by signal``, exit 1, nothing
    saved). Two workers, mid-epoch 0."""
    marker, go = tmp_path / "paused", tmp_path / "go"
    callbacks = [{"class_path": "kill_helpers.PauseAt", "init_args": {"step": 5, "marker": str(marker), "go": str(go)}}]
    recipe = _recipe(tmp_path, data_root, "dino", 2, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--checkpoint_every_minutes", "0", own_group=True)
    _wait_for(marker, proc)
    os.killpg(proc.pid, signum)  # the process group: the training process and its workers
    time.sleep(1.0)  # let the workers' default action (death) happen before the step resumes
    go.touch()
    code, out = _finish(proc)
    assert code == 128 + signum, out[-3000:]
    assert f"received {signal.Signals(signum).name}" in out and "Traceback" not in out and "killed by signal" not in out
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(ckpts.glob(".*"))


@pytest.mark.ddp
def test_sigterm_to_rank_0_stops_both_ddp_ranks_after_one_collective_save(tmp_path: Path, data_root: Path) -> None:
    """Two gloo ranks started by Lightning: SIGTERM reaches rank 0 only (as from ``kill``); it is
    forwarded, both ranks agree, write last.ckpt of the step in flight together and exit 143."""
    marker, go = tmp_path / "paused", tmp_path / "go"
    callbacks = [{"class_path": "kill_helpers.PauseAt", "init_args": {"step": 2, "marker": str(marker), "go": str(go)}}]
    recipe = _recipe(tmp_path, data_root, "dino", 0, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), "--trainer.devices", "2", "--trainer.strategy", "ddp",
                "--trainer.accelerator", "cpu", "--checkpoint_every_minutes", "0")  # fmt: skip
    _wait_for(marker, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    go.touch()
    code, out = _finish(proc)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert out.count("xcit-ssl fit: interrupted: received SIGTERM") == 1 and "Traceback" not in out
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
