"""Sharded data: `xcit-ssl shard`, WebDataset and litdata readers, DINO fits on shards, resume,
corrupt members and truncated shards, distributed reading, k-NN from shards equal to the folder."""

from __future__ import annotations

import json
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.runs.test_kill_resume import _assert_same_state, _finish, _fit, _record, _recipe, _wait_for
from tests.test_cli_fit import _tiny_recipe, _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.datasets import ImageFolderDataset, open_dataset
from xcit_ssl.data import shard_writer
from xcit_ssl.data.resumable import EpochTaggedSampler, default_sampler
from xcit_ssl.data.shard_writer import file_list_hash, open_shard_source, write_litdata, write_webdataset
from xcit_ssl.data.shards import WebDatasetShards
from xcit_ssl.errors import UserError
from xcit_ssl.commands.evaluate import knn_main

SMALL = ["--features.resize_size", "32", "--features.crop_size", "32", "--num_workers", "0",
         "--progress", "false", "--device", "cpu", "--batch_size", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("shard_src"), per_class=12)


@pytest.fixture(scope="module")
def shards(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shards")
    assert main(["shard", "--root", str(folder), "--out", str(out / "wds"), "--shard_size", "7"]) == 0
    assert main(["shard", "--root", str(folder), "--out", str(out / "lit"), "--format", "litdata"]) == 0
    return {"webdataset": out / "wds", "litdata": out / "lit"}


@pytest.mark.parametrize("kind", ["webdataset", "litdata"])
def test_shards_hold_the_folder_images_labels_and_manifest(kind: str, folder: Path, shards: dict[str, Path]) -> None:
    source = ImageFolderDataset(folder, "train")
    sharded = open_dataset(kind, shards[kind], "train")  # type: ignore[arg-type]
    assert len(sharded) == len(source) == 36 and sharded.classes == source.classes
    np.testing.assert_array_equal(sharded.targets, source.targets)
    for i in (0, 17, 35):
        assert np.array_equal(np.asarray(sharded[i][0]), np.asarray(source[i][0]))  # the same decoded pixels
    manifest = json.loads((shards[kind] / "train" / "manifest.json").read_text())
    assert manifest["format"] == kind and manifest["samples"] == 36 and manifest["classes"] == source.classes
    assert len(manifest["file_list_sha256"]) == 64
    if kind == "webdataset":
        assert [s["samples"] for s in manifest["shards"]] == [7, 7, 7, 7, 7, 1]


def test_shard_resumes_an_interrupted_run_and_keeps_complete_shards(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "wds"
    assert main(["shard", "--root", str(folder), "--out", str(out), "--shard_size", "10"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    # simulate a kill after two shards: the partial manifest lists them, shard 2 is a temporary file
    (out / "train" / "manifest.json").unlink()
    for name in ("shard-000002.tar", "shard-000003.tar"):
        (out / "train" / name).unlink()
    partial = {"file_list_sha256": manifest["file_list_sha256"], "shards": manifest["shards"][:2]}
    (out / "train" / ".manifest.partial.json").write_text(json.dumps(partial))
    (out / "train" / ".shard-000002.tar.tmp-123").write_bytes(b"half a shard")
    kept = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    assert main(["shard", "--root", str(folder), "--out", str(out), "--shard_size", "10"]) == 0
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == kept  # not written again
    assert json.loads((out / "train" / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]


def test_shard_writer_library_writes_what_the_readers_read(folder: Path, tmp_path: Path) -> None:
    """The library half of `xcit-ssl shard`: tar names, manifest keys and pixels the readers expect."""
    sources = open_shard_source(folder)
    assert sorted(sources) == ["train", "val"] and sources["val"].classes == sources["train"].classes
    train = sources["train"]
    out = tmp_path / "wds"
    manifest = write_webdataset(train, out, folder, shard_size=10)
    assert set(manifest) == {"format", "samples", "classes", "labelled", "file_list_sha256", "source", "shards"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["file_list_sha256"] == file_list_hash(train, folder) and manifest["labelled"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(f"shard-{k:06d}.tar" for k in range(4))]
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    stored = [Path(train.path(i)).suffix.lower()[1:].replace("jpeg", "jpg") for i in range(10)]
    assert set(stored) == {"jpg", "png"}  # both kinds of file, their own bytes (JPEG spelt jpg)
    assert sorted(names) == sorted([f"{i:09d}.cls" for i in range(10)] + [f"{i:09d}.{e}" for i, e in enumerate(stored)])
    read = WebDatasetShards(out)
    np.testing.assert_array_equal(read.targets, train.targets)
    for i in (0, 9, 10, 35):
        assert np.array_equal(np.asarray(read[i][0]), np.asarray(train[i][0]))
    lit = write_litdata(sources["val"], tmp_path / "lit", folder, "1MB")
    assert lit["labels"] == sources["val"].targets.tolist() and lit["format"] == "litdata"
    assert json.loads((tmp_path / "lit" / "manifest.json").read_text()) == lit


def test_shard_writer_failure_leaves_no_shard_and_no_temporary(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "wds"
    monkeypatch.setattr(shard_writer, "index_tar", lambda path: ([], True))  # a shard that reads back short
    with pytest.raises(UserError, match="writing shard-000000.tar failed"):
        write_webdataset(open_shard_source(folder)["train"], out, folder, shard_size=10)
    assert list(out.iterdir()) == []


def test_corrupt_member_and_truncated_shard_are_skipped_and_counted(shards: dict[str, Path], tmp_path: Path) -> None:
    src = shards["webdataset"] / "train"
    work = tmp_path / "damaged"
    work.mkdir()
    manifest = json.loads((src / "manifest.json").read_text())
    for p in src.glob("*.tar"):
        (work / p.name).write_bytes(p.read_bytes())
    # one member's bytes overwritten with garbage (same size): it no longer decodes
    first = manifest["shards"][0]["members"][1]
    data = bytearray((work / "shard-000000.tar").read_bytes())
    data[first[2] : first[2] + first[3]] = b"\x00" * first[3]
    (work / "shard-000000.tar").write_bytes(bytes(data))
    # the last full shard cut in the middle of its third member (no manifest: indexed by scanning)
    cut = manifest["shards"][4]["members"][2]
    whole = (work / "shard-000004.tar").read_bytes()
    (work / "shard-000004.tar").write_bytes(whole[: cut[2] + cut[3] // 2])
    ds = WebDatasetShards(work)
    assert ds.num_truncated_shards == 1
    assert len(ds) == 36 - 7 + 3  # the cut shard keeps the members before the cut (the cut one is unreadable)
    images = [ds[i] for i in range(len(ds))]
    assert all(img is not None for img in images)
    assert ds.num_skipped == 2  # the garbage member and the member cut short, each replaced by the next sample


def test_ranks_read_disjoint_samples_whose_union_is_the_data_set(shards: dict[str, Path]) -> None:
    ds = open_dataset("webdataset", shards["webdataset"], "train")  # type: ignore[arg-type]
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            sampler = EpochTaggedSampler(default_sampler(ds, 2, rank, seed=5), start_epoch=epoch)
            seen.append([i % len(ds) for i in sampler])
        assert len(seen[0]) == len(seen[1]) == 18 and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(36))
    # an uneven split: every rank gets ceil(N / world), the union is the set plus world - 1 repeats at most
    ranks = [list(EpochTaggedSampler(default_sampler(ds, 5, r, seed=5))) for r in range(5)]
    assert {len(r) for r in ranks} == {8} and set().union(*map(set, ranks)) == set(range(36))


@pytest.mark.parametrize("kind", ["webdataset", "litdata"])
def test_dino_fit_on_shards(kind: str, shards: dict[str, Path], tmp_path: Path, folder: Path) -> None:
    recipe = _tiny_recipe(tmp_path, folder)
    run = tmp_path / "run"
    args = ["fit", "--recipe", str(recipe), "--run_dir", str(run), "--data.dataset", kind,
            "--data.root", str(shards[kind]), "--trainer.callbacks", "[]", "--trainer.max_epochs", "1"]  # fmt: skip
    assert main(args) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # limit_train_batches 2 of the recipe


def test_knn_on_shards_equals_knn_on_the_folder(shards: dict[str, Path], folder: Path, tmp_path: Path) -> None:
    results = {}
    for kind, root in (("imagefolder", folder), ("webdataset", shards["webdataset"]), ("litdata", shards["litdata"])):
        out = tmp_path / f"{kind}.json"
        args = ["--random_init", "xcit_nano_12_p16_224", "--data.dataset", kind, "--data.root", str(root),
                *SMALL, "--knn.ks", "[5, 20]", "--out", str(out)]  # fmt: skip
        assert knn_main(args) == 0
        results[kind] = json.loads(out.read_text())
    assert results["webdataset"]["results"] == results["imagefolder"]["results"] == results["litdata"]["results"]
    assert results["webdataset"]["num_train"] == 36


def test_killed_fit_on_shards_resumes_with_exactly_the_remaining_samples(
    shards: dict[str, Path], folder: Path, tmp_path: Path
) -> None:
    """SIGKILL mid-epoch 0 of a fit on WebDataset shards, resume by last: the same batches as a run
    that was not killed, and the same final weights."""
    runs = {}
    for name in ("reference", "killed"):
        log, marker = tmp_path / f"{name}.batches", tmp_path / f"{name}.paused"
        callbacks = [{"class_path": "kill_helpers.RecordBatches", "init_args": {"path": str(log)}}]
        if name == "killed":
            callbacks.append({"class_path": "kill_helpers.PauseAt", "init_args": {"step": 5, "marker": str(marker)}})
        recipe = yaml.safe_load(_recipe(tmp_path, folder, "dino", 0, callbacks).read_text())
        recipe["data"]["init_args"].update(dataset="webdataset", root=str(shards["webdataset"]))
        recipe["data"]["init_args"]["train_transform"]["init_args"]["photometric"] = "per_image"  # the other path
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        run = tmp_path / name
        proc = _fit("--recipe", str(path), "--run_dir", str(run), "--checkpoint_every_n_steps", "1")
        if name == "killed":
            _wait_for(marker, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            recipe["trainer"]["callbacks"] = callbacks[:1]
            path.write_text(yaml.safe_dump(recipe))
            proc = _fit("--recipe", str(path), "--run_dir", str(run), "--ckpt_path", "last")
        code, out = _finish(proc)
        assert code == 0, out[-3000:]
        runs[name] = (run, _record(log))
    assert runs["killed"][1] == runs["reference"][1]  # nothing repeated, skipped or redrawn
    _assert_same_state(runs["reference"][0] / "checkpoints" / "last.ckpt", runs["killed"][0] / "checkpoints" / "last.ckpt")


def test_datamodule_validation_split_of_shards(shards: dict[str, Path]) -> None:
    dm = ImageDataModule(root=str(shards["webdataset"]), dataset="webdataset", num_workers=0, batch_size=4)
    dm.setup("fit")
    assert dm.num_classes == 3 and len(dm.eval_dataset("val")) == 36
