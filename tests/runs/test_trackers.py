"""Experiment trackers beside the run folder's TensorBoard + CSV: `fit --trainer.logger MLFlowLogger`
(a real MLflow file store in tmp_path) and `WandbLogger` offline, run as a user runs them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.runs import trackers
from xcit_ssl.runs.loggers import make_loggers
from xcit_ssl.runs.trackers import add_run_loggers, config_params, explain_tracker_failure

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_mlflow = pytest.mark.skipif(
    not HAS_MLFLOW, reason="mlflow is not installed: pip install -e '.[test]' (it brings mlflow-skinny)"
)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("tracker_images"))


@pytest.fixture()
def argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["xcit-ssl"])  # fit rewrites sys.argv for Lightning's launcher


def _mlflow_run(client, experiment: str, resumed: bool):  # noqa: ANN001, ANN202
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (run,) = [r for r in runs if bool(r.data.params.get("xcit_ssl.resumed_from")) == resumed]
    return run


def _steps(client, run, key: str) -> list[int]:  # noqa: ANN001
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@needs_mlflow
def test_mlflow_gets_config_metrics_and_checkpoints_beside_tensorboard_and_csv(
    tmp_path: Path, image_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: None
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind a flag
    uri = f"file:{tmp_path / 'mlruns'}"
    recipe, run_dir = _tiny_recipe(tmp_path, image_root), tmp_path / "runs" / "tiny"
    tracker = ["--trainer.logger", "MLFlowLogger", "--trainer.logger.tracking_uri", uri,
               "--trainer.logger.experiment_name", "labs"]  # fmt: skip
    assert main(["fit", "--recipe", str(recipe), "--run_dir", str(run_dir), *tracker]) == 0
    console = capsys.readouterr().err

    # ours are still written: the tracker adds to them
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "train/loss" in (run_dir / "metrics.csv").read_text()
    assert "knn/top1" in (run_dir / "metrics.csv").read_text()

    client = MlflowClient(uri)
    run = _mlflow_run(client, "labs", resumed=False)
    params = run.data.params
    assert params["model"] == "xcit_ssl.methods.dino.DINO"  # a class path under its flag's name, init_args dropped
    assert params["model.dino.out_dim"] == "64" and params["trainer.max_epochs"] == "2"
    assert params["data.root"] == str(image_root) and params["trainer.callbacks.0.k"] == "3"
    assert params["xcit_ssl.run_id"] == (run_dir / "run_id").read_text().strip()
    assert params["xcit_ssl.run_dir"] == str(run_dir.resolve())
    # metrics per optimizer step, the online k-NN at each epoch end
    assert _steps(client, run, "train/loss") == [0, 1, 2, 3]
    knn = client.get_metric_history(run.info.run_id, "knn/top1")
    assert len(knn) == 2 and knn[-1].value == pytest.approx(run.data.metrics["knn/top1"])
    # the resolved config as an artifact, byte for byte; the checkpoint's path as a tag
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert Path(local).read_text() == (run_dir / "config.yaml").read_text()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert run.data.tags["xcit_ssl.checkpoint.last"] == str(last.resolve()) and last.is_file()
    assert run.info.status == "FINISHED"
    # one line says where the run is; MLflow's and Lightning's own notices are not printed
    (where,) = [ln for ln in console.splitlines() if "tracking in MLflow run" in ln]
    assert run.info.run_id in where and "'labs'" in where
    assert not [ln for ln in console.splitlines() if re.match(r"\w+ (mlflow|lightning\.pytorch\.loggers)", ln)]

    # resume with the saved config (which names the tracker): a new tracker run, the same xcit-ssl run
    args = ["fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "3"]
    assert main(args) == 0
    resumed = _mlflow_run(client, "labs", resumed=True)
    assert resumed.data.params["xcit_ssl.run_id"] == params["xcit_ssl.run_id"]
    assert resumed.data.params["xcit_ssl.resumed_from"] == f"{last} (step 4)"
    assert _steps(client, resumed, "train/loss") == [4, 5]  # the steps continue
    assert _steps(client, run, "train/loss") == [0, 1, 2, 3]  # the first attempt is untouched
    assert "knn/top1" in (run_dir / "metrics.csv").read_text().splitlines()[0]


@needs_mlflow
def test_mlflow_file_store_refused_by_mlflow_is_one_line_naming_the_flag(
    tmp_path: Path, image_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: None
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = _tiny_recipe(tmp_path, image_root)
    monkeypatch.chdir(tmp_path)  # MLFlowLogger's default store is ./mlruns
    try:
        MlflowClient(f"file:{tmp_path / 'probe'}")
        pytest.skip("this MLflow still writes a local file store")
    except MlflowException:
        pass
    run_dir = tmp_path / "runs" / "refused"
    code = main(["fit", "--recipe", str(recipe), "--run_dir", str(run_dir), "--trainer.logger", "MLFlowLogger"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "--trainer.logger MLFlowLogger" in line and "--trainer.logger.tracking_uri" in line
    assert not run_dir.exists()  # nothing was started


def test_missing_tracker_package_exits_2_naming_the_extra(
    tmp_path: Path, image_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: None
) -> None:
    # the package lookup is what decides: a module that cannot be installed stands for a missing mlflow
    monkeypatch.setitem(trackers.TRACKER_PACKAGES, "MLFlowLogger", ("xcit_ssl_no_such_module", "'xcit-ssl[mlflow]'"))
    run_dir = tmp_path / "runs" / "missing"
    code = main(["fit", "--recipe", str(_tiny_recipe(tmp_path, image_root)), "--run_dir", str(run_dir),
                 "--trainer.logger", "MLFlowLogger"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--trainer.logger MLFlowLogger needs" in err and "pip install 'xcit-ssl[mlflow]'" in err
    assert not run_dir.exists()


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed")
def test_missing_wandb_exits_2_naming_the_extra(
    tmp_path: Path, image_root: Path, capsys: pytest.CaptureFixture[str], argv: None
) -> None:
    code = main(["fit", "--recipe", str(_tiny_recipe(tmp_path, image_root)), "--run_dir", str(tmp_path / "r"),
                 "--trainer.logger", "WandbLogger"])  # fmt: skip
    assert code == 2 and "pip install 'xcit-ssl[wandb]'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (optional: pip install -e '.[wandb]')")
def test_wandb_offline_gets_config_metrics_and_checkpoints(
    tmp_path: Path, image_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: None
) -> None:
    for name in ("WANDB_SILENT", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recipe, run_dir = _tiny_recipe(tmp_path, image_root), tmp_path / "runs" / "tiny"
    code = main(["fit", "--recipe", str(recipe), "--run_dir", str(run_dir), "--trainer.logger", "WandbLogger",
                 "--trainer.logger.offline", "true", "--trainer.logger.save_dir", str(tmp_path / "wb")])  # fmt: skip
    import wandb

    wandb.finish()  # what the exit of the `xcit-ssl` process does (Lightning leaves the run open after fit)
    console = capsys.readouterr().err
    assert code == 0, console
    assert list(run_dir.glob("events.out.tfevents.*")) and "train/loss" in (run_dir / "metrics.csv").read_text()
    (record,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()  # the offline run's records; their keys are stored as text
    for key in (b"model.dino.out_dim", b"xcit_ssl.run_id", b"knn/top1", b"train/loss", b"xcit_ssl.checkpoint.last",
                str(run_dir / "checkpoints" / "last.ckpt").encode()):  # fmt: skip
        assert key in data, key
    (where,) = [ln for ln in console.splitlines() if "tracking in W&B run" in ln]
    assert "wandb sync" in where
    assert not [ln for ln in console.splitlines() if ln.startswith("wandb:") or "\x1b[" in ln], console


def test_a_tracker_adds_to_ours_and_a_tensorboard_logger_replaces_ours(tmp_path: Path) -> None:
    ours = make_loggers(tmp_path)

    class Tracker(Logger):  # any Lightning logger that is no TensorBoard / CSV logger
        name, version = "t", "0"

        def log_metrics(self, metrics, step=None) -> None:  # noqa: ANN001
            pass

        def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
            pass

    tracker, board = Tracker(), TensorBoardLogger(str(tmp_path / "elsewhere"))
    assert add_run_loggers(ours, None) == ours and add_run_loggers(ours, True) == ours
    assert add_run_loggers(ours, False) is None
    assert add_run_loggers(ours, tracker) == [*ours, tracker]  # ours first: trainer.log_dir is the run folder
    mixed = add_run_loggers(ours, [board, tracker])
    assert mixed is not None and mixed[-2:] == [board, tracker]
    assert [type(lg) for lg in mixed if isinstance(lg, CSVLogger)] == [type(ours[1])]  # our CSV stays


def test_config_params_are_named_like_the_fit_flags() -> None:
    config = yaml.safe_load("""
        seed_everything: 0
        model:
          class_path: xcit_ssl.methods.DINO
          init_args:
            optim: {base_lr: 0.002, betas: [0.9, 0.999]}
        trainer:
          logger: null
          callbacks:
          - class_path: xcit_ssl.evaluation.online.OnlineKNN
            init_args: {k: 20, root: /data}
    """)
    assert config_params(config) == {
        "seed_everything": "0",
        "model": "xcit_ssl.methods.DINO",
        "model.optim.base_lr": "0.002",
        "model.optim.betas": "[0.9, 0.999]",
        "trainer.logger": "null",
        "trainer.callbacks.0": "xcit_ssl.evaluation.online.OnlineKNN",
        "trainer.callbacks.0.k": "20",
        "trainer.callbacks.0.root": "/data",
    }


def test_failures_that_are_not_a_trackers_pass_through() -> None:
    from xcit_ssl.errors import UserError

    assert explain_tracker_failure(ValueError("bad value")) is None
    assert explain_tracker_failure(KeyboardInterrupt()) is None
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = UserError("ours")
    assert explain_tracker_failure(wrapped) is None
