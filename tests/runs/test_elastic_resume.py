"""Elastic resume: a real 2-process gloo ``xcit-ssl fit`` (2 devices x 4) killed mid-epoch and resumed
on 1 process with accumulation 2 (1 device x 4 x 2, the same global batch of 8).

The resumed run must train the same samples in every optimizer step as the uninterrupted 2-process
run and end with the same weights (float tolerance: gradients are summed in another order). What
is drawn from each process's own RNG cannot be the same on another number of processes, so the
recipe has no drop-path and draws its photometric augmentation in the workers, per sample (the
default ``photometric: device`` draws it per batch in the training process). BatchNorm normalises
each micro-batch with its own statistics, and the micro-batches are the same: only its running
statistics (a side effect, kept by rank 0 under DDP) differ and are left out of the comparison.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.runs.test_kill_resume import _finish, _fit, _recipe, _wait_for
from tests.test_cli_fit import _write_image_folder

DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _elastic_recipe(tmp: Path, data_root: Path, callbacks: list[dict]) -> Path:
    path = _recipe(tmp, data_root, "dino", 0, callbacks)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["init_args"]["backbone"]["init_args"]["drop_path_rate"] = 0.0
    recipe["data"]["init_args"]["train_transform"]["init_args"]["photometric"] = "per_image"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _samples(prefix: Path, steps: range | None = None) -> dict[int, list[str]]:
    """{optimizer step: sorted hashes of its samples} over every rank's RecordSamples file."""
    out: dict[int, list[str]] = {}
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for line in path.read_text().splitlines():
            step, digest = line.split()
            if steps is None or int(step) in steps:
                out.setdefault(int(step), []).append(digest)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _record(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.ddp
def test_killed_two_process_run_resumed_on_one_process_with_accumulation(tmp_path: Path) -> None:
    data = _write_image_folder(tmp_path / "data", per_class=16)  # 48 images: 6 steps of 8 an epoch
    reference_log, killed_log, resumed_log = tmp_path / "ref", tmp_path / "killed", tmp_path / "resumed"
    recipe = _elastic_recipe(tmp_path, data, [{"class_path": "kill_helpers.RecordSamples", "init_args": {"path": str(reference_log)}}])
    code, out = _finish(_fit("--recipe", str(recipe), "--run_dir", str(tmp_path / "ref_run"), *DDP, "--checkpoint_every_minutes", "0"))
    assert code == 0, out[-3000:]

    # the same run, killed (SIGKILL to both ranks) after step 10, its last checkpoint at step 8 (mid-epoch 1)
    marker = tmp_path / "paused"
    callbacks = [
        {"class_path": "kill_helpers.RecordSamples", "init_args": {"path": str(killed_log)}},
        {"class_path": "kill_helpers.PauseAt", "init_args": {"step": 10, "marker": str(marker)}},
    ]
    recipe = _elastic_recipe(tmp_path, data, callbacks)
    run = tmp_path / "run"
    proc = _fit("--recipe", str(recipe), "--run_dir", str(run), *DDP, "--checkpoint_every_n_steps", "4",
                "--checkpoint_every_minutes", "0", own_group=True)  # fmt: skip
    _wait_for(marker, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    last = run / "checkpoints" / "last.ckpt"
    record = _record(last)["callbacks"]["RunRecord"]
    assert _record(last)["global_step"] == 8
    assert (record["world_size"], record["batch_size"], record["accumulate"], record["global_batch"]) == (2, 4, 1, 8)
    assert record["position"] == 16 and record["steps_per_epoch"] == 6  # 2 steps of epoch 1, in global samples

    # resumed on one process: 4 per micro-batch, 2 micro-batches a step
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"] = [{"class_path": "kill_helpers.RecordSamples", "init_args": {"path": str(resumed_log)}}]
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(config))
    code, out = _finish(
        _fit("--config", str(tmp_path / "resume.yaml"), "--ckpt_path", "last", "--trainer.devices", "1",
             "--trainer.strategy", "auto", "--trainer.accumulate_grad_batches", "2", merged=True)
    )  # fmt: skip
    assert code == 0, out[-3000:]

    reference = _samples(reference_log)
    assert len(reference) == 12 and all(len(v) == 8 for v in reference.values())
    assert _samples(killed_log, range(10)) == {k: reference[k] for k in range(10)}
    assert _samples(resumed_log) == {k: reference[k] for k in range(8, 12)}, "other samples after the resume"
    assert "elastic resume: global batch 8 (1 device x 4 x accumulation 2)" in out
    # the resumed epoch's bar counts its 12 micro-batches from the 4 already trained, not "4/?" past its end
    bars = [part for part in re.split(r"[\r\n]", out) if re.search(r"it/s|s/it", part)]
    assert bars and bars[-1].startswith("Epoch 1:") and "12/12 " in bars[-1], bars[-3:]

    expected, resumed = _record(tmp_path / "ref_run" / "checkpoints" / "last.ckpt"), _record(last)
    assert (resumed["global_step"], resumed["epoch"]) == (expected["global_step"], expected["epoch"]) == (12, 1)
    worst = 0.0
    for key, value in expected["state_dict"].items():
        if key.endswith(RUNNING_STATS):
            continue
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        worst = max(worst, float((resumed["state_dict"][key].double() - value.double()).abs().max()))
    for sa, sb in zip(expected["optimizer_states"], resumed["optimizer_states"]):
        for pid, state in sa["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(sb["state"][pid][name], value, rtol=1e-5, atol=1e-7, msg=f"{pid}.{name}")
    print(f"elastic resume: max |weight difference| = {worst:.3g}")
