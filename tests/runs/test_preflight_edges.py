"""Preflight edges: FSDP on a CPU, bfloat16 where the CPU emulates it, and refusals about the config
versus refusals about this machine (what a planner may skip)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.errors import UserError
from xcit_ssl.runs import preflight

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for a machine without a GPU")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("preflight_data"))


@pytest.fixture
def slow_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without bf16 units (the 2-core EPYC VM: 10-60x), whatever CPU runs the test."""
    monkeypatch.setattr(preflight, "bf16_slowdown", lambda: 30.0)


@pytest.fixture
def fast_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with bf16 units (AMX / AVX512-BF16), where bfloat16 is faster than float32."""
    monkeypatch.setattr(preflight, "bf16_slowdown", lambda: 0.5)


# -- item 7: FSDP needs CUDA GPUs ------------------------------------------------------------------


@no_gpu
def test_fit_with_fsdp_on_a_cpu_exits_2_naming_cuda_and_ddp(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was Lightning's ValueError traceback ("requires a GPU accelerator") after the run folder was made."""
    run = tmp_path / "run"
    args = ["fit", "--recipe", str(_tiny_recipe(tmp_path, image_root)), "--run_dir", str(run)]
    assert main([*args, "--trainer.strategy", "fsdp"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "xcit-ssl fit: error: --trainer.strategy fsdp on cpu: FSDP shards the model over CUDA GPUs and needs "
        "--trainer.accelerator gpu on a machine with CUDA GPUs. On this accelerator pass --trainer.strategy ddp "
        "(or auto)"
    )
    assert not run.exists()


@pytest.mark.parametrize(
    "strategy",
    [
        "fsdp",
        "fsdp_cpu_offload",  # Lightning's registry names
        "FSDPStrategy",
        "lightning.pytorch.strategies.FSDPStrategy",
        {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": {"cpu_offload": True}},
    ],
)
def test_every_spelling_of_fsdp_is_refused_on_a_cpu(strategy: object) -> None:
    with pytest.raises(UserError, match=r"FSDP .* needs --trainer.accelerator gpu .* --trainer.strategy ddp"):
        preflight.check_trainer_config({"accelerator": "cpu", "strategy": strategy})


def test_fsdp_from_a_yaml_class_path_and_an_instance_are_refused_on_a_cpu() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    flat = {"accelerator": "cpu", "strategy.class_path": "lightning.pytorch.strategies.FSDPStrategy"}  # dict(namespace)
    for trainer in (flat, {"accelerator": "cpu", "strategy": FSDPStrategy()}):
        with pytest.raises(UserError, match="FSDP"):
            preflight.check_trainer_config(trainer)


@pytest.mark.parametrize("strategy", [None, "auto", "ddp", "ddp_spawn"])
def test_other_strategies_on_a_cpu_pass(strategy: str | None) -> None:
    preflight.check_trainer_config({"accelerator": "cpu", "devices": 1, "strategy": strategy})


# -- item 6: bfloat16 on a CPU that emulates it -----------------------------------------------------


def test_bf16_probe_is_measured_once_per_process() -> None:
    first = preflight.bf16_slowdown()
    assert first > 0 and preflight.bf16_slowdown() == first


def test_fit_warns_when_bf16_is_slow_on_this_cpu(slow_bf16: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xcit_ssl.runs.preflight"):
        preflight.check_trainer_config({"accelerator": "cpu", "precision": "bf16-mixed"})
    assert [r.getMessage() for r in caplog.records] == [
        "--trainer.precision bf16-mixed on this CPU: a bfloat16 matrix product runs 30x slower than a float32 one "
        "here (no bf16 units: PyTorch emulates them), so the run would be many times slower than in float32; pass "
        "--trainer.precision 32-true"
    ]


def test_no_bf16_warning_where_bf16_is_fast_or_not_on_a_cpu(fast_bf16: None) -> None:
    assert preflight.precision_warnings("bf16-mixed", "cpu") == []
    assert preflight.precision_warnings("32-true", "cpu") == []


def test_no_bf16_warning_for_a_gpu_or_fp32(slow_bf16: None) -> None:
    assert preflight.precision_warnings("bf16-mixed", "gpu") == [] and preflight.precision_warnings("32-true", "cpu") == []


@no_gpu
def test_fit_names_the_bf16_slowdown_on_stderr(
    slow_bf16: None, tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a user meets it: the warning comes before anything is built (here a batch too large stops fit)."""
    run = tmp_path / "run"
    args = ["fit", "--recipe", str(_tiny_recipe(tmp_path, image_root)), "--run_dir", str(run)]
    assert main([*args, "--trainer.precision", "bf16-mixed", "--data.batch_size", "1000"]) == 2
    err = capsys.readouterr().err
    assert "bfloat16 matrix product runs 30x slower" in err and "pass --trainer.precision 32-true" in err


def test_fp16_on_a_cpu_recommends_32_true_where_bf16_is_slow(slow_bf16: None) -> None:
    with pytest.raises(UserError) as err:
        preflight.check_trainer_config({"accelerator": "cpu", "precision": "16-mixed"})
    assert str(err.value) == (
        "--trainer.precision 16-mixed: float16 is not supported on CPU; pass --trainer.precision 32-true "
        "(not bf16-mixed: bfloat16 matrix products run 30x slower than float32 on this CPU)"
    )


def test_fp16_on_a_cpu_recommends_bf16_where_it_is_fast(fast_bf16: None) -> None:
    with pytest.raises(UserError, match="pass --trainer.precision bf16-mixed or 32-true$"):
        preflight.check_trainer_config({"accelerator": "cpu", "precision": "16-mixed"})


# -- item 5: what a planner may skip (this machine) and may not (the config) --------------------------


@no_gpu
def test_planning_skips_this_machines_refusals_only(fast_bf16: None) -> None:
    gpu_cluster = {"accelerator": "gpu", "devices": 8, "num_nodes": 4, "precision": "bf16-mixed", "sync_batchnorm": True}
    with pytest.raises(UserError, match="no CUDA GPU"):
        preflight.check_trainer_config(gpu_cluster)
    with pytest.raises(UserError, match="this machine has"):
        preflight.check_trainer_config({"accelerator": "cpu", "devices": 512})
    with preflight.planning():
        preflight.check_trainer_config(gpu_cluster)
        preflight.check_trainer_config({"accelerator": "gpu", "strategy": "fsdp"})
        preflight.check_trainer_config({"accelerator": "cpu", "devices": 512})
        preflight.check_trainer_config({"accelerator": "auto", "devices": 8, "sync_batchnorm": True})  # auto names no machine
        for refused, words in [
            ({"accelerator": "cpu", "devices": 2, "sync_batchnorm": True}, "SyncBatchNorm"),
            ({"accelerator": "cpu", "strategy": "fsdp"}, "FSDP"),
            ({"accelerator": "cpu", "precision": "16-mixed"}, "float16"),
        ]:
            with pytest.raises(UserError, match=words):
                preflight.check_trainer_config(refused)
    with pytest.raises(UserError, match="no CUDA GPU"):  # the context ends with the block
        preflight.check_trainer_config(gpu_cluster)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_sync_batchnorm_under_one_ddp_process_on_cpu_is_refused(strategy: str) -> None:
    """One DDP process initialises torch.distributed, and SyncBatchNorm then raises inside DDP
    ("SyncBatchNorm layers only work with GPU modules"): refused before any process starts."""
    with pytest.raises(UserError, match=f"--trainer.strategy {strategy}\\) on CPU with SyncBatchNorm.*sync_batchnorm false"):
        preflight.check_trainer_config({"accelerator": "cpu", "devices": 1, "strategy": strategy, "sync_batchnorm": True})
    preflight.check_trainer_config({"accelerator": "cpu", "devices": 1, "strategy": "auto", "sync_batchnorm": True})
