"""`xcit-ssl doctor` edges, as a user meets them: a run in which no step would run, a cluster run
planned from a laptop, bfloat16 on a CPU that emulates it (MFU above 100 %), FSDP on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_doctor import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.doctor.measure import gemm_peak
from xcit_ssl.runs import preflight

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU from a machine without one")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("doctor_edges"))  # 12 images


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = _run(capsys, "doctor", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def _last_error(err: str) -> str:
    return err.strip().splitlines()[-1].split(": error: ", 1)[1]


# -- item 5: doctor resolves the run as fit does ------------------------------------------------


def test_a_batch_larger_than_the_data_is_refused_as_fit_refuses_it(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was planned as "1 per epoch" and days of run time; fit says no step would run (drop_last)."""
    recipe = str(_tiny_recipe(tmp_path, image_root))
    code, _, fit_err = _run(capsys, "fit", "--recipe", recipe, "--run_dir", str(tmp_path / "run"), "--data.batch_size", "100000")
    assert code == 2 and "no step would run" in fit_err
    code, out, err = _run(capsys, "doctor", "--recipe", recipe, "--no_measure", "--data.batch_size", "100000")
    assert code == 2 and out == "" and _last_error(err) == _last_error(fit_err)
    # over the planned world, as fit's ranks split the images (12 images: 6 per device on 2)
    code, _, err = _run(capsys, "doctor", "--recipe", recipe, "--no_measure", "--data.batch_size", "8", "--trainer.devices", "2")
    assert code == 2 and _last_error(err).startswith("The training set has 12 images, 6 per device, fewer than batch_size=8")


def test_a_planned_data_size_that_fills_no_batch_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(_tiny_recipe(tmp_path, tmp_path / "elsewhere"))
    code, _, err = _run(capsys, "doctor", "--recipe", recipe, "--no_measure", "--num_samples", "163",
                        "--data.batch_size", "100000")  # fmt: skip
    assert code == 2 and _last_error(err) == (
        "163 training images over 1 device(s) fill no batch of --data.batch_size 100000 (the last incomplete "
        "batch is dropped): no step would run. Lower --data.batch_size or add images"
    )
    code, _, err = _run(capsys, "doctor", "--recipe", recipe, "--no_measure", "--num_samples", "163",
                        "--trainer.limit_train_batches", "0.01")  # fmt: skip
    assert code == 2 and "--trainer.limit_train_batches 0.01 of 40 batches per epoch leaves none" in err


@no_gpu
def test_the_readmes_cluster_example_is_planned_from_a_laptop(capsys: pytest.CaptureFixture[str]) -> None:
    """`xcit-ssl doctor --recipe dino_small_p16 --trainer.devices 8`: was refused on a 2-core machine."""
    out = _json(capsys, "--recipe", "dino_small_p16", "--trainer.devices", "8", "--no_measure")
    assert out["plan"]["world"] == 8 and out["plan"]["global_batch"] == 1024 and out["plan"]["accelerator"] == "cpu"
    assert any("pass --trainer.accelerator gpu to plan the GPU run" in n for n in out["notes"])
    out = _json(capsys, "--recipe", "dino_small_p16", "--trainer.accelerator", "gpu", "--trainer.devices", "8",
                "--trainer.num_nodes", "4", "--no_measure")  # fmt: skip
    plan = out["plan"]
    assert (plan["accelerator"], plan["world"], plan["global_batch"], plan["steps_per_epoch"]) == ("gpu", 32, 4096, 312)
    assert out["warnings"] and {w["code"] for w in out["warnings"]} == {"global_batch", "data_missing"}


@pytest.mark.parametrize(
    "flags",
    [
        ["--trainer.devices", "2", "--trainer.sync_batchnorm", "true"],
        ["--trainer.strategy", "fsdp"],  # item 7, in doctor too
    ],
)
def test_refusals_about_the_config_stay_fits(
    flags: list[str], tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = str(_tiny_recipe(tmp_path, image_root))  # accelerator: cpu, as written
    code, _, fit_err = _run(capsys, "fit", "--recipe", recipe, "--run_dir", str(tmp_path / "run"), *flags)
    code2, _, err = _run(capsys, "doctor", "--recipe", recipe, "--no_measure", *flags)
    assert code == code2 == 2 and "Traceback" not in err and _last_error(err) == _last_error(fit_err)


@no_gpu
def test_a_gpu_run_is_measured_on_this_cpu_and_says_so(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = str(_tiny_recipe(tmp_path, image_root))
    args = ["doctor", "--recipe", recipe, "--trainer.accelerator", "gpu", "--trainer.devices", "2",
            "--trainer.precision", "16-mixed", "--measure_batches", "2", "--steps", "1", "--data_seconds", "1"]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "400")  # one line per row
    code, table, err = _run(capsys, *args)
    assert code == 0, err
    lines = table.splitlines()
    assert any("│ device " in ln and "measured on cpu, not the planned gpu" in ln for ln in lines)
    assert any("│ time " in ln and "not estimated" in ln for ln in lines)
    out = _json(capsys, *args[1:])
    assert out["measured_elsewhere"] == "measured on cpu, not the planned gpu"
    assert out["plan"]["accelerator"] == "gpu" and out["plan"]["precision"] == "16-mixed"
    assert out["measured"]["step_seconds"] > 0 and out["measured"]["capacity_bytes"] is None  # no CPU-RAM verdict
    assert out["run"] == {} and out["rates"]["bound"] is None
    assert not {"workers", "oom"} & {w["code"] for w in out["warnings"]}  # no advice from the CPU's speed or memory


# -- item 6: MFU and bfloat16 on a CPU ----------------------------------------------------------


def test_mfu_of_a_bf16_cpu_run_stays_below_100_percent(capsys: pytest.CaptureFixture[str]) -> None:
    """Was 129.8 % (221.8 % on the 2-core VM): the peak was an emulated bf16 GEMM at 1024^2, slower per
    FLOP than the model's small bf16 products. On such a CPU float32 is the peak."""
    if torch.cuda.is_available():
        pytest.skip("a CPU run")
    out = _json(capsys, "--recipe", "dino_nano_fmnist", "--trainer.precision", "bf16-mixed", "--measure_batches", "2",
                "--steps", "1", "--data_seconds", "1")  # fmt: skip
    assert 0 < out["mfu"] < 1.0, (out["mfu"], out["peak_note"])
    if preflight.bf16_is_slow_here():
        assert "float32 GEMM peak" in out["peak_note"] and "bfloat16 slower than float32" in out["peak_note"]
        assert "bf16_slow" in {w["code"] for w in out["warnings"]}


def test_the_cpu_peak_is_float32_where_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "bf16_slowdown", lambda: 30.0)
    bf16, note = gemm_peak(torch.device("cpu"), "bf16-mixed", seconds=0.05)
    assert bf16 > 0 and note.startswith("measured 1024^2 float32 GEMM peak here") and "bfloat16 slower" in note


def test_doctor_warns_when_bf16_is_slow_on_this_cpu(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "bf16_slowdown", lambda: 30.0)
    recipe = str(_tiny_recipe(tmp_path, image_root))
    out = _json(capsys, "--recipe", recipe, "--trainer.precision", "bf16-mixed", "--no_measure")
    found = [w["message"] for w in out["warnings"] if w["code"] == "bf16_slow"]
    assert found == [
        "--trainer.precision bf16-mixed on this CPU: a bfloat16 matrix product runs 30x slower than a float32 one "
        "here (no bf16 units: PyTorch emulates them), so the run would be many times slower than in float32; pass "
        "--trainer.precision 32-true"
    ]
    assert "bf16_slow" not in {w["code"] for w in _json(capsys, "--recipe", recipe, "--no_measure")["warnings"]}
