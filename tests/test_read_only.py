"""An output on a read-only mount is refused before the work, in one line that names the flag and
the path, with exit code 2 (a mistake the user fixes by pointing elsewhere), for every command that
writes: ``fit --run_dir`` (and its default ``runs/`` under a read-only current folder), ``export
--out``, ``knn``/``linear`` ``--out`` (and its default beside weights on a read-only share) and
``--cache_dir``, ``attention --out``, ``summary --out``, ``validate --out``, ``plot --out``.

The mount is a real read-only bind mount (root refuses nothing to itself in a chmod-0555 folder).
"Before the work" is checked by making the command's first piece of work fail the test: loading
the weights, opening the data, reading the results; a check after it would never be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_files import read_only_mount
from xcit_ssl.cli import main


@pytest.fixture
def ro(tmp_path: Path) -> Iterator[Path]:
    """A read-only folder holding weights, as a shared model store often is."""
    where = tmp_path / "ro"
    where.mkdir()
    (where / "weights.pth").write_bytes(b"never read: the output is refused first")
    (where / "knn.json").write_text('{"command": "knn", "results": {}}\n')
    with read_only_mount(where):
        yield where


def _forbid(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``target`` (the command's first piece of work) fail the test if it is reached."""

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{target} ran before the output folder was checked")

    monkeypatch.setattr(target, reached)


EVAL = ["--protocol", "knn_fmnist", "--device", "cpu", "--num_workers", "0"]

# command -> (argv in the read-only folder RO, the work it must not reach, the flag, the path named)
CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str, str, str]] = {
    "export --out": (
        lambda ro, rw: ["export", "--checkpoint", str(ro / "weights.pth"), "--out", str(ro / "b.safetensors")],
        "xcit_ssl.export.backbone.load_backbone", "--out", "{ro}/b.safetensors"),
    "knn --out": (
        lambda ro, rw: ["knn", *EVAL, "--weights", str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224",
                        "--out", str(ro / "k.json"), "--cache_dir", str(rw)],
        "xcit_ssl.commands.evaluate.open_splits", "--out", "{ro}/k.json"),
    "knn, default --out beside the weights": (
        lambda ro, rw: ["knn", *EVAL, "--weights", str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224",
                        "--cache_dir", str(rw)],
        "xcit_ssl.commands.evaluate.open_splits", "--out", "{ro}/eval/knn_fmnist_weights.json"),
    "knn --cache_dir": (
        lambda ro, rw: ["knn", *EVAL, "--weights", str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224",
                        "--out", str(rw / "k.json"), "--cache_dir", str(ro / "cache")],
        "xcit_ssl.commands.evaluate.open_splits", "--cache_dir", "{ro}/cache"),
    "linear --out": (
        lambda ro, rw: ["linear", "--protocol", "linear_fmnist", "--device", "cpu", "--weights",
                        str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224", "--out", str(ro / "l.json"),
                        "--no_cache"],
        "xcit_ssl.commands.evaluate.open_splits", "--out", "{ro}/l.json"),
    "attention --out": (
        lambda ro, rw: ["attention", "--random_init", "xcit_nano_12_p8_224", "--images", str(rw), "--out",
                        str(ro / "maps")],
        "xcit_ssl.analysis.images.collect_images", "--out", "{ro}/maps"),
    "summary --out": (
        lambda ro, rw: ["summary", "--row", "DINO", str(ro / "knn.json"), "--out", str(ro / "s.json")],
        "xcit_ssl.commands.summary.summarize", "--out", "{ro}/s.json"),
    "validate --out": (
        lambda ro, rw: ["validate", "--weights", str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224",
                        "--data.dataset", "fashion_mnist", "--out", str(ro / "v.json")],
        "xcit_ssl.commands.validate.load_classifier", "--out", "{ro}/v.json"),
    "validate, default --out beside the weights": (
        lambda ro, rw: ["validate", "--weights", str(ro / "weights.pth"), "--backbone", "xcit_nano_12_p8_224",
                        "--data.dataset", "fashion_mnist"],
        "xcit_ssl.commands.validate.load_classifier", "--out", "{ro}/eval/validate_val_weights.json"),
    "plot --out": (
        lambda ro, rw: ["plot", str(rw), "--out", str(ro / "curves.png")],
        "xcit_ssl.analysis.plot.plot_run", "--out", "{ro}/curves.png"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_read_only_output_is_refused_before_the_work(
    case: str, ro: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, work, flag, named = CASES[case]
    _forbid(monkeypatch, work)
    code = main(argv(ro, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    path = named.format(ro=ro)
    assert err[-1] == (f"xcit-ssl {argv(ro, tmp_path)[0]}: error: {flag} {path}: {ro} is on a read-only file system; "
                       f"pass a writable folder to {flag}"), err  # fmt: skip
    assert code == 2
    assert sorted(p.name for p in ro.iterdir()) == ["knn.json", "weights.pth"]


def test_fit_run_dir_on_a_read_only_mount(ro: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fit", "--recipe", "dino_nano_fmnist", "--run_dir", str(ro / "run"), "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"xcit-ssl fit: error: --run_dir {ro / 'run'}: {ro} is on a read-only file system; "
                       "pass a writable folder to --run_dir"), err  # fmt: skip
    assert code == 2


def test_fit_default_run_folder_under_a_read_only_current_folder(
    ro: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --run_dir: the default runs/<recipe> lands in the current folder, here read-only."""
    monkeypatch.chdir(ro)
    code = main(["fit", "--recipe", "dino_nano_fmnist", "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"xcit-ssl fit: error: --run_dir runs/dino_nano_fmnist (in {ro}): {ro} is on a read-only "
                       "file system; pass a writable folder to --run_dir"), err  # fmt: skip
    assert code == 2
