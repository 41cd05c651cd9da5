"""A quiet console on every path, not only the single-process DINO fit of tests/test_console.py:
two gloo processes, a fit over litdata shards (and `xcit-ssl shard` writing them), `linear`, `plot`
and a supervised run. Each runs as a user runs it (a `python -m xcit_ssl.cli` subprocess) and must
say each event once, with none of the libraries' advertisements or notices about their internals."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from tests.test_console import NOISE
from xcit_ssl.cli import main

REPO = Path(__file__).parent.parent
# beyond NOISE: litdata's advertisement and cache notes, torch deprecations inside Lightning, the
# bf16 model-summary notice, Lightning's DDP banner, and Lightning's own handler ("INFO: ...")
# printing a line that ours prints too
MORE_NOISE = ("lightning.ai", "Create an account", "max_cache_size", "StreamingDataset POSIX", "is deprecated",
              "not supported by the model summary", "distributed_backend", "INFO: ")  # fmt: skip
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# a tqdm bar's redraw, "Epoch 0: 100%|███| 1/1 [00:00<00:00, 2.81it/s, train/loss=4.48]": cut off,
# so that what was written right after it (a warning glued to the bar) is still seen
TQDM_BAR = re.compile(r"^[^|]*\|[^|]*\|[^\[]*\[[^\]]*(it/s|s/it)[^\]]*\]")
RICH_BAR = "━━━"  # Lightning's rich bar (linear), redrawn whole
LIBRARY_WARNING = re.compile(r"site-packages/\S+:\d+: \w*Warning")


def _console(args: list[str], cwd: Path, env: dict[str, str] | None = None, **popen) -> str:
    """``xcit-ssl ARGS`` as a subprocess; its stdout + stderr (it must succeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "100", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "xcit_ssl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **popen)  # fmt: skip
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    return console


def _events(console: str) -> list[str]:
    """The console's lines without progress-bar redraws, blank lines and cursor moves."""
    lines = [TQDM_BAR.sub("", ANSI.sub("", ln)).strip() for ln in re.split(r"[\r\n]", console)]
    return [ln for ln in lines if ln and RICH_BAR not in ln]


def _assert_quiet(console: str, allowed_warnings: tuple[str, ...] = ()) -> list[str]:
    """No line said twice, no NOISE, no library warning but those ``allowed_warnings`` name."""
    lines = _events(console)
    repeated = sorted({ln for ln in lines if lines.count(ln) > 1})
    assert not repeated, console
    assert not [n for n in NOISE + MORE_NOISE if n in console], console
    unexpected = [ln for ln in lines if LIBRARY_WARNING.search(ln) and not any(a in ln for a in allowed_warnings)]
    assert not unexpected, console
    return lines


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("console_paths") / "data", per_class=4)


def _dino_recipe(tmp_path: Path, data: Path) -> Path:
    """The tiny DINO of tests/test_cli_fit.py, 1 epoch, Lightning's default model summary."""
    path = _tiny_recipe(tmp_path, data)
    recipe = yaml.safe_load(path.read_text())
    recipe["trainer"].update(max_epochs=1, log_every_n_steps=50)
    recipe["trainer"].pop("enable_model_summary")
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---- the mechanisms, in process ------------------------------------------------------------------


def test_rank_above_zero_prints_warnings_but_no_info(monkeypatch: pytest.MonkeyPatch) -> None:
    from xcit_ssl.console import _CurrentStderr

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    handler = _CurrentStderr()
    log = logging.getLogger("xcit_ssl.test_console_paths")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    for var in ("RANK", "SLURM_PROCID"):  # read before LOCAL_RANK
        monkeypatch.delenv(var, raising=False)
    try:
        for rank in ("1", "0"):
            monkeypatch.setenv("LOCAL_RANK", rank)  # what Lightning's launcher gives the processes it starts
            log.info("info of rank %s", rank)
            log.warning("warning of rank %s", rank)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert err.getvalue().splitlines() == ["warning of rank 1", "info of rank 0", "warning of rank 0"]


def test_a_warning_of_once_warnings_is_shown_once_whoever_changes_the_filters() -> None:
    from xcit_ssl.console import quiet_third_party

    text = "This DataLoader will create 9 worker processes in total. Our suggested max number of worker is 2"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # every call reaches showwarning: what is left out, ours left out
        with quiet_third_party():
            warnings.warn(text, UserWarning, stacklevel=1)
            with warnings.catch_warnings():  # a library's own filters (they reset the "once" registry)
                warnings.simplefilter("default")
            warnings.warn(text, UserWarning, stacklevel=1)  # as torch's DataLoader says it after torchdata's
            warnings.warn(text.replace("9", "7"), UserWarning, stacklevel=1)  # another count: said
            for _ in range(2):
                warnings.warn("a warning of our own", UserWarning, stacklevel=1)  # not one of them: said each time
    said = [str(w.message) for w in shown]
    assert said == [text, text.replace("9", "7"), "a warning of our own", "a warning of our own"]


def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the log lines do (tests/test_console.py): a warning written while a bar is drawn in a log
    file would be glued to the bar's last redraw, which has no newline."""
    from tqdm import tqdm

    from xcit_ssl.console import quiet_third_party

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with quiet_third_party(), tqdm(total=10, file=sys.stderr, desc="Epoch 0") as bar:
            bar.update(5)
            warnings.warn("a library's own warning", UserWarning, stacklevel=1)
            bar.update(5)
    said = [s for s in re.split(r"[\r\n]", err.getvalue()) if "UserWarning: a library's own warning" in s]
    assert len(said) == 1 and said[0].endswith("UserWarning: a library's own warning"), err.getvalue()
    assert "Epoch 0" not in said[0] and said[0].startswith(__file__), err.getvalue()


def test_prints_inside_the_block_become_debug_records(capsys, caplog: pytest.LogCaptureFixture) -> None:
    from xcit_ssl.console import prints_to_debug_log

    with caplog.at_level(logging.DEBUG, logger="litdata.optimize"), prints_to_debug_log("litdata.optimize"):
        print("Create an account on https://lightning.ai/ ...")
        print("Workers are ready !", end="")
    assert capsys.readouterr().out == ""
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "Create an account on https://lightning.ai/ ..."), (logging.DEBUG, "Workers are ready !")]


# ---- the paths, as a user runs them ----------------------------------------------------------------


@pytest.mark.ddp
def test_two_gloo_ranks_print_each_event_once(tmp_path: Path, data: Path) -> None:
    recipe = _dino_recipe(tmp_path, data)
    console = _console(
        ["fit", "--recipe", str(recipe), "--run_dir", str(tmp_path / "runs" / "ddp"), "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        tmp_path, {"MASTER_ADDR": "127.0.0.1", "PL_DISABLE_FORK": "1"},
    )  # fmt: skip
    lines = _assert_quiet(console)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in console  # rank 0's line says the run has two processes
    assert "[rank: 1]" not in console and "GLOBAL_RANK: 1" not in console  # rank 1 prints no INFO line
    for event in ("run folder:", "Training on 12 images", "DINO: global batch 8", "online k-NN: extracting",
                  "knn/top1"):  # fmt: skip
        assert sum(event in ln for ln in lines) == 1, (event, console)
    # the k-NN says what it does before the silent work, then its result
    said = [i for i, ln in enumerate(lines) if "online k-NN: extracting features of 12 train / 6 val images" in ln]
    assert said and said[0] < next(i for i, ln in enumerate(lines) if "knn/top1" in ln)


@pytest.fixture(scope="module")
def dino_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny DINO run (fit in process: only the commands after it are under test)."""
    tmp = tmp_path_factory.mktemp("dino_run")
    run = tmp / "runs" / "tiny"
    assert main(["fit", "--recipe", str(_dino_recipe(tmp, data)), "--run_dir", str(run), "--trainer.max_steps", "2"]) == 0
    return run


def test_linear_prints_its_result_once(dino_run: Path, data: Path, tmp_path: Path) -> None:
    console = _console(
        ["linear", "--checkpoint", str(dino_run / "checkpoints" / "last.ckpt"), "--data.root", str(data),
         "--features.resize_size", "32", "--features.crop_size", "32", "--num_workers", "0", "--device", "cpu",
         "--linear.epochs", "2", "--linear.batch_size", "8", "--out", str(tmp_path / "linear.json")],
        tmp_path,
    )  # fmt: skip
    lines = _assert_quiet(console)
    assert sum("`Trainer.fit` stopped" in ln for ln in lines) == 1, console
    assert "last epoch (headline)" in console and (tmp_path / "linear.json").is_file()


def test_plot_says_what_it_wrote_once_with_the_default_file_mode(dino_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    # umask 002: open() gives 0664, a temporary file's 0600 would show
    console = _console(["plot", str(dino_run), "--out", str(out)], tmp_path, preexec_fn=lambda: os.umask(0o002))
    lines = _assert_quiet(console)
    said = [ln for ln in lines if str(out) in ln]  # the log line and the printed summary were two
    assert len(said) == 1 and "metrics ->" in said[0] and "train/loss" in said[0], console
    assert out.stat().st_mode & 0o777 == 0o664


def test_litdata_shards_are_written_and_trained_on_quietly(tmp_path: Path, data: Path) -> None:
    shards = tmp_path / "lit"
    console = _console(["shard", "--root", str(data), "--out", str(shards), "--format", "litdata"], tmp_path)
    lines = _assert_quiet(console)
    assert [ln for ln in lines if "samples (3 classes), litdata" in ln] == [
        f"{shards}/train: 12 samples (3 classes), litdata", f"{shards}/val: 12 samples (3 classes), litdata"]
    assert (shards / "train" / "index.json").is_file()
    console = _console(["fit", "--recipe", str(_dino_recipe(tmp_path, data)), "--run_dir", str(tmp_path / "run"),
                        "--data.dataset", "litdata", "--data.root", str(shards)], tmp_path)  # fmt: skip
    lines = _assert_quiet(console)
    assert sum("Training on 12 images" in ln for ln in lines) == 1 and "knn/top1" in console


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the run to one core (Linux)")
def test_supervised_bf16_run_with_more_workers_than_cores(tmp_path: Path, data: Path) -> None:
    """A sup_* recipe (tiny), bf16-mixed, 2 workers on 1 core: torch's worker-count warning once (the
    train loader and the validation loader both say it), no model-summary notice about bf16."""
    tiny = ["--model.backbone.init_args.depth", "1", "--model.backbone.init_args.embed_dim", "32",
            "--model.backbone.init_args.num_heads", "2", "--model.backbone.init_args.num_classes", "3"]  # fmt: skip
    console = _console(
        ["fit", "--recipe", "sup_nano_fmnist", *tiny, "--data.dataset", "imagefolder", "--data.root", str(data),
         "--data.pad_to", "null", "--data.batch_size", "4", "--data.num_workers", "2", "--data.limit_val_samples",
         "null", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1",
         "--trainer.precision", "bf16-mixed", "--run_dir", str(tmp_path / "sup")],
        tmp_path, preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )  # fmt: skip
    lines = _assert_quiet(console, allowed_warnings=("This DataLoader will create 2 worker processes",))
    assert console.count("This DataLoader will create 2 worker processes") == 1, console
    assert sum("Supervised: global batch 4" in ln for ln in lines) == 1 and "val: top-1" in console
