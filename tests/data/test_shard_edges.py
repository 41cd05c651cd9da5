"""The edges of sharded data, as a user meets them through the CLI on real image files:

- one shard folder holds one data set: ``xcit-ssl shard`` into a folder of another data set is
  refused, ``--overwrite`` replaces it (the old set readable until the new one is complete), and
  readers refuse a folder whose shard files are not exactly its manifest's;
- a damaged region of a shard is reported once per file and counted as distinct files;
- ``xcit-ssl shard`` errors name its own flags, ``fit``'s keep theirs.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from tests.test_cli_fit import _write_image_folder
from xcit_ssl.cli import main
from xcit_ssl.data import shard_writer
from xcit_ssl.data.datamodule import ImageDataModule
from xcit_ssl.data.datasets import FlatImageDataset, ImageFolderDataset, open_dataset
from xcit_ssl.data.images import SkipCounter
from xcit_ssl.data.transforms import MultiCropTransform
from xcit_ssl.errors import UserError

KNN = ["--random_init", "xcit_nano_12_p16_224", "--data.dataset", "webdataset", "--features.resize_size", "32",
       "--features.crop_size", "32", "--num_workers", "0", "--progress", "false", "--device", "cpu",
       "--batch_size", "16", "--knn.ks", "[3]", "--no_cache"]  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two labelled ImageNet-layout folders (A: 3 classes x 6 train/val, B: 2 x 4) and a flat one (C: 5 images)."""
    base = tmp_path_factory.mktemp("sources")
    flat = _write_image_folder(base / "c_tmp", per_class=5, classes=1) / "train" / "class_0"
    shutil.copytree(flat, base / "C")
    return {"A": _write_image_folder(base / "A", per_class=6), "B": _write_image_folder(base / "B", per_class=4, classes=2),
            "C": base / "C"}  # fmt: skip


def _shard(root: Path, out: Path, *extra: str) -> int:
    return main(["shard", "--root", str(root), "--out", str(out), "--shard_size", "5", *extra])


def _tars(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ---- 1. one shard folder, one data set -----------------------------------------------------------


def test_shard_into_another_data_set_is_refused_and_overwrite_replaces_it(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "S"
    assert _shard(sources["A"], out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _shard(sources["B"], out) == 2  # before: exit 0, A's shards 2 and 3 beside B's 0 and 1
    err = capsys.readouterr().err
    assert f"--out {out} already holds another data set" in err and "--overwrite" in err
    assert f"{out / 'train'}: 18 samples of {sources['A']}" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    assert _shard(sources["B"], out, "--overwrite") == 0
    for split in ("train", "val"):
        manifest = _manifest(out / split)
        assert manifest["source"] == str(sources["B"]) and manifest["samples"] == 8
        assert _tars(out / split) == sorted(s["name"] for s in manifest["shards"]) == ["shard-000000.tar", "shard-000001.tar"]
        assert sorted(p.name for p in (out / split).iterdir()) == ["manifest.json", *_tars(out / split)]
        assert len(open_dataset("webdataset", out, split)) == 8  # type: ignore[arg-type]

    # a flat source replaces a split one: train/ and val/ go, so readers cannot find the old splits
    assert _shard(sources["C"], out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]
    assert len(open_dataset("webdataset", out, "train")) == 5  # type: ignore[arg-type]


def test_shard_refuses_shard_files_it_cannot_account_for(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tar files without a manifest (another tool's, or a copy): the new set would be read beside them."""
    out = tmp_path / "S"
    assert _shard(sources["C"], tmp_path / "other") == 0
    out.mkdir()
    shutil.copy(tmp_path / "other" / "shard-000000.tar", out / "theirs-000000.tar")
    capsys.readouterr()
    assert _shard(sources["C"], out) == 2  # before: exit 0, and readers took 10 samples for 5
    assert f"{out}: 1 shard file(s) without a readable manifest.json" in capsys.readouterr().err
    assert _shard(sources["C"], out, "--overwrite") == 0
    assert _tars(out) == ["shard-000000.tar"] and len(open_dataset("webdataset", out, "train")) == 5  # type: ignore[arg-type]


def test_shard_reruns_resume_and_recut_the_same_files_without_overwrite(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "S"
    assert _shard(sources["A"], out) == 0
    kept = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    assert _shard(sources["A"], out) == 0
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == kept  # complete shards are kept
    assert main(["shard", "--root", str(sources["A"]), "--out", str(out), "--shard_size", "7"]) == 0
    assert _tars(out / "train") == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in _manifest(out / "train")["shards"]] == [7, 7, 4]


def test_an_interrupted_overwrite_keeps_the_old_set_until_the_new_one_is_complete(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "S"
    assert _shard(sources["A"], out) == 0
    old = {name: (out / "train" / name).read_bytes() for name in _tars(out / "train")}

    def interrupt_after(count: int, real):  # noqa: ANN001, ANN202 - a Ctrl-C after `count` calls
        calls = []

        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if len(calls) == count:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*args, **kwargs)

        return wrapped

    # killed while the new set is written: the old one is complete, unchanged and readable
    monkeypatch.setattr(shard_writer, "_write_tar", interrupt_after(1, shard_writer._write_tar))
    assert _shard(sources["B"], out, "--overwrite") == 130
    assert {name: (out / "train" / name).read_bytes() for name in _tars(out / "train")} == old
    assert len(open_dataset("webdataset", out, "train")) == 18  # type: ignore[arg-type]
    monkeypatch.undo()

    # killed while the new set is swapped in: the folder is refused as unfinished, never read mixed
    monkeypatch.setattr(shard_writer, "_move", interrupt_after(1, shard_writer._move))
    assert _shard(sources["B"], out, "--overwrite") == 130
    with pytest.raises(UserError, match=r"unfinished `xcit-ssl shard` run .*Run the same `xcit-ssl shard` command again"):
        open_dataset("webdataset", out, "train")  # type: ignore[arg-type]
    monkeypatch.undo()
    assert _shard(sources["B"], out, "--overwrite") == 0  # the rerun finishes the swap
    assert _manifest(out / "train")["source"] == str(sources["B"]) and _tars(out / "train") == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json", *_tars(out / "train")]
    assert len(open_dataset("webdataset", out, "train")) == 8  # type: ignore[arg-type]


def test_readers_refuse_a_shard_folder_that_mixes_two_data_sets(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder the old `shard` left after A then B (B's manifest, A's shards 2 and 3 beside B's):
    `knn` read 28 samples of two data sets; now it stops and names the strays and the fix."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert _shard(sources["A"], a) == 0 and _shard(sources["B"], b) == 0
    for name in ("shard-000002.tar", "shard-000003.tar"):
        shutil.copy(a / "train" / name, b / "train" / name)
    capsys.readouterr()
    assert main(["knn", *KNN, "--data.root", str(b), "--out", str(tmp_path / "knn.json")]) == 2
    err = capsys.readouterr().err
    assert f"{b / 'train'} does not hold exactly the data set its manifest.json describes" in err
    assert "2 stray file(s) its manifest.json does not list (shard-000002.tar, shard-000003.tar)" in err
    assert f"`xcit-ssl shard --root {sources['B']} --out {b} --overwrite`" in err

    # the fix the message names: refused without --overwrite (the strays are not this set's), done with it
    assert _shard(sources["B"], b) == 2
    assert "2 shard file(s) that are not of this data set (shard-000002.tar, shard-000003.tar)" in capsys.readouterr().err
    assert _shard(sources["B"], b, "--overwrite") == 0
    assert _tars(b / "train") == ["shard-000000.tar", "shard-000001.tar"]
    assert len(open_dataset("webdataset", b, "train")) == 8  # type: ignore[arg-type]

    (b / "train" / "shard-000001.tar").unlink()  # a shard of the set itself gone
    with pytest.raises(UserError, match=r"1 listed file\(s\) missing \(shard-000001.tar\)"):
        open_dataset("webdataset", b, "train")  # type: ignore[arg-type]


def test_litdata_shard_refuses_another_data_set_and_overwrite_replaces_it(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "L"
    lit = ["--format", "litdata", "--chunk_bytes", "2kB"]  # several chunks, so a stray one can be left
    assert _shard(sources["A"], out, *lit) == 0
    chunks_a = sorted(p.name for p in (out / "train").glob("*.bin"))
    assert len(chunks_a) > 2
    capsys.readouterr()
    assert _shard(sources["B"], out, *lit) == 2  # before: "complete already", exit 0, still A's data
    assert "already holds another data set" in capsys.readouterr().err
    assert _shard(sources["B"], out, *lit, "--overwrite") == 0
    ds = open_dataset("litdata", out, "train")  # type: ignore[arg-type]
    assert len(ds) == 8 and ds.classes == ["class_0", "class_1"] and _manifest(out / "train")["source"] == str(sources["B"])
    index = json.loads((out / "train" / "index.json").read_text())
    chunks_b = sorted(p.name for p in (out / "train").glob("*.bin"))
    assert chunks_b == sorted(c["filename"] for c in index["chunks"]) and not (out / "train" / ".overwrite").exists()
    # a chunk of another set beside this one's: refused with the file's name
    shutil.copy(out / "train" / chunks_b[0], out / "train" / "chunk-0-99.bin")
    with pytest.raises(UserError, match=r"1 stray file\(s\) its manifest.json does not list \(chunk-0-99.bin\)") as err:
        open_dataset("litdata", out, "train")  # type: ignore[arg-type]
    assert f"`xcit-ssl shard --root {sources['B']} --out {out} --format litdata --overwrite`" in str(err.value)


# ---- 2. a damaged shard region: one warning per file, distinct count ----------------------------


def _damaged_shards(sources: dict[str, Path], out: Path) -> tuple[Path, set[int]]:
    """A's 18 training images as one shard, with 7 consecutive members and 2 isolated ones zeroed."""
    assert main(["shard", "--root", str(sources["A"]), "--out", str(out), "--shard_size", "1000"]) == 0
    folder = out / "train"
    members = _manifest(folder)["shards"][0]["members"]
    bad = set(range(5, 12)) | {1, 15}
    data = bytearray((folder / "shard-000000.tar").read_bytes())
    for i in bad:
        _, _, offset, size, _ = members[i]
        data[offset : offset + size] = b"\x00" * size
    (folder / "shard-000000.tar").write_bytes(bytes(data))
    return folder, bad


def test_a_damaged_shard_region_is_reported_once_per_file(
    sources: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: every bad member re-logged every bad member after it on its way to a readable one:
    1+2+...+7 + 2 = 30 warnings and "30 unreadable images" for 9 files; twice that after 2 epochs."""
    _damaged_shards(sources, tmp_path / "S")
    dm = ImageDataModule(
        root=str(tmp_path / "S"), dataset="webdataset", batch_size=4, num_workers=0, drop_last=False,
        train_transform=MultiCropTransform(global_crop_size=32, local_crop_size=16, n_local_crops=0),
    )  # fmt: skip
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two epochs: the same files are not reported again
            assert sum(len(labels) for _, labels in dm.train_dataloader()) == 18
        dm.teardown("fit")
    skipped = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 9 and len(set(skipped)) == 9
    assert dm.num_skipped_images == 9
    assert "9 unreadable images were replaced by neighbours" in caplog.text


def _labels(batch: list) -> list[int]:
    return [label for _, label in batch]


def test_distinct_unreadable_count_reaches_the_main_process_from_workers(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    folder, bad = _damaged_shards(sources, tmp_path / "S")
    ds = open_dataset("webdataset", folder.parent, "train")  # type: ignore[arg-type]
    for _ in range(2):
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=_labels, multiprocessing_context="fork")
        assert len([label for batch in loader for label in batch]) == 18
    assert ds.num_skipped == len(bad)


def test_skip_counter_marks_each_sample_once_and_copies_are_independent() -> None:
    counter = SkipCounter(10)
    assert counter.mark(3) and not counter.mark(3) and 3 in counter and 4 not in counter
    clone = copy.deepcopy(counter)
    clone.mark(4)
    assert (counter.value, clone.value) == (1, 2)


# ---- 3. shard's errors name shard's flags ------------------------------------------------------


def _flat_split(root: Path) -> Path:
    src = _write_image_folder(root.parent / f"{root.name}_src", per_class=2, classes=1)
    (root / "train").mkdir(parents=True)
    for image in (src / "train" / "class_0").iterdir():
        shutil.copy(image, root / "train" / image.name)  # train/ holds images, no class folders
    return root


@pytest.mark.parametrize("case", ["empty", "no_class_folders", "empty_classes", "dangling_file", "chunk_bytes"])
def test_shard_errors_name_the_shard_flags(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, extra = tmp_path / "images", []
    root.mkdir()
    expected = {"empty": f"No images (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff, .ppm, .pgm, .gif) found under {root}: check --root.",
                "no_class_folders": f"{root / 'train'} has no class sub-folders. Expected <root>/<split>/<class>/<image>.JPEG; "
                                    "for a folder of unlabelled images use that folder on its own as --root",
                "empty_classes": f"found under {root}: check --root and the split name.",
                "dangling_file": f"cannot read {root / 'gone.png'} (No such file or directory): fix or remove the file under --root",
                "chunk_bytes": "--chunk_bytes 64XB: use a size such as 64MB"}[case]  # fmt: skip
    if case == "no_class_folders":
        _flat_split(root)
    elif case == "empty_classes":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("not an image")
    elif case == "dangling_file":
        _write_image_folder(tmp_path / "src", per_class=1, classes=1)
        shutil.copy(next((tmp_path / "src" / "train" / "class_0").iterdir()), root / "real.png")
        (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    elif case == "chunk_bytes":  # before: litdata's ValueError, after the images were listed, as a traceback
        shutil.copytree(_write_image_folder(tmp_path / "src", per_class=2, classes=1) / "train", root, dirs_exist_ok=True)
        extra = ["--format", "litdata", "--chunk_bytes", "64XB"]
    capsys.readouterr()
    assert main(["shard", "--root", str(root), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert case == "dangling_file" or not (tmp_path / "out").exists()  # refused before anything was written
    assert expected in err and "--data." not in err, err


def test_fit_messages_keep_fit_flags(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"for a folder of unlabelled images use --data.dataset flat\."):
        ImageFolderDataset(_flat_split(tmp_path / "images"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"found under .*empty: check --data.root\."):
        FlatImageDataset(tmp_path / "empty")


def test_shards_written_hold_the_source_bytes(sources: dict[str, Path], tmp_path: Path) -> None:
    """The writer's source reading (now through one function that names an unreadable file) still
    stores every image's own bytes."""
    assert _shard(sources["C"], tmp_path / "S") == 0
    with tarfile.open(tmp_path / "S" / "shard-000000.tar") as tar:
        stored = sorted(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(("png", "jpg")))
    assert stored == sorted(p.read_bytes() for p in sources["C"].iterdir())
    images = np.stack([np.asarray(open_dataset("webdataset", tmp_path / "S", "train")[i][0]) for i in range(5)])
    assert images.shape == (5, 32, 32, 3)
