"""A disk that fills up during a run, as a user meets it: a real ``xcit-ssl fit --recipe
dino_nano_fmnist`` subprocess whose run folder is a size-limited tmpfs.

Measured for the recipe (3 XCA blocks, DINO head 4096): a checkpoint is about 32.7 MB; the rest of
a 3-step run folder (config.yaml, hparams.yaml, metrics.csv, TensorBoard events, the recipe's
callbacks left out) under 10 KB. An 8 MiB tmpfs holds the folder but not a checkpoint; for a later
checkpoint to fail after the first one succeeded, the test fills the disk while the run is paused
after step 1 (as another job filling a shared disk would).

What must hold: exit code 74 (``EX_IOERR``: neither a crash, 1, nor a bad input, 2), one message
naming the folder, the bytes needed and free, what survived and the command that goes on, no
traceback, no temporary file, the previous checkpoint intact, and under DDP every rank stops.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_files import tmpfs

HERE = Path(__file__).parent
REPO = HERE.parent.parent
EXIT_DISK_FULL = 74
# the recipe as a user runs it, cut to 3 steps; its k-NN and attention callbacks take 25 s and
# write nothing this test is about
QUICK = ("--recipe", "dino_nano_fmnist", "--trainer.max_steps", "3", "--data.num_workers", "0")


def _fit(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "xcit_ssl.cli", "fit", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    """Exit code and output; the pipe closes only when every process holding it (DDP ranks) ended."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"fit hung after the disk filled:\n{out[-3000:]}") from None
    return proc.returncode, out


def _the_message(out: str) -> str:
    """The one error line; no traceback, no second message."""
    assert "Traceback" not in out and "RuntimeError" not in out, out[-4000:]
    assert ("\n" + out).count("\nxcit-ssl fit: error: ") == 1 and out.count("error:") == 1, out[-4000:]
    last = out.rstrip().rsplit("\n", 1)[-1]
    assert last.startswith("xcit-ssl fit: error: "), "the message is the last line, on a line of its own"
    return last.split("xcit-ssl fit: error: ", 1)[1]


def _bytes(message: str, what: str) -> int:
    return int(re.search(rf"([\d,]+) bytes {what}", message).group(1).replace(",", ""))


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name or ".xcit-ssl-write-check" in p.name]


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.ddp)])
def test_a_disk_too_small_for_the_first_checkpoint(tmp_path: Path, devices: int) -> None:
    """No checkpoint fits: every rank stops with 74, one message says none exists yet and how to start again."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp") if devices == 2 else ()
        code, out = _finish(_fit(*QUICK, "--run_dir", str(run), "--trainer.callbacks", "[]", *extra,
                                 env={"MASTER_ADDR": "127.0.0.1", "PL_DISABLE_FORK": "1"}))  # fmt: skip
        assert code == EXIT_DISK_FULL, out[-4000:]
        message = _the_message(out)
        assert message.startswith(f"disk full writing the checkpoint last.ckpt into {run / 'checkpoints'}: "), message
        assert _bytes(message, "needed") > 30_000_000 > _bytes(message, "free there") > 0, message
        assert "No checkpoint of this run exists yet" in message, message
        assert message.endswith(f"then start it again: xcit-ssl fit --config {run / 'config.yaml'}"), message
        # the folder keeps what was written; the checkpoint left nothing half written
        assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
        assert list((run / "checkpoints").iterdir()) == []
        _no_temporaries(disk)


def test_a_later_checkpoint_keeps_the_previous_one_and_the_message_resumes(tmp_path: Path) -> None:
    """Step 1's checkpoint is written, the disk fills, step 2's fails: last.ckpt of step 1 intact,
    named; the command the message gives resumes the run once there is space again."""
    marker, go = tmp_path / "paused", tmp_path / "go"
    pause = f'[{{"class_path": "kill_helpers.PauseAt", "init_args": {{"step": 1, "marker": "{marker}", "go": "{go}"}}}}]'
    with tmpfs(tmp_path / "disk", "96m") as disk:
        run = disk / "run"
        proc = _fit(*QUICK, "--run_dir", str(run), "--checkpoint_every_n_steps", "1", "--trainer.callbacks", pause)
        end = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < end, _finish(proc)[1][-3000:]
            time.sleep(0.05)
        last = run / "checkpoints" / "last.ckpt"
        size = last.stat().st_size
        filler = disk / "another_job.bin"  # leaves 256 KiB: the metrics rows fit, a checkpoint does not
        with open(filler, "wb") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - (256 << 10))
        go.touch()
        code, out = _finish(proc)
        assert code == EXIT_DISK_FULL, out[-4000:]
        message = _the_message(out)
        assert message.startswith(f"disk full writing the checkpoint last.ckpt into {last.parent}: "), message
        assert _bytes(message, "needed") >= 0.9 * size, (message, size)  # the estimate: the checkpoint's tensors
        assert f"The previous checkpoint {last} (step 1) is intact" in message, message
        resume = message.split("then resume: ", 1)[1]
        assert resume == f"xcit-ssl fit --config {run / 'config.yaml'} --ckpt_path last", message
        assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 1
        _no_temporaries(disk)

        # space again: the message's own command continues the run to its end
        filler.unlink()
        code, out = _finish(_fit(*shlex.split(resume)[2:]))
        assert code == 0, out[-4000:]
        assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 3
