"""`xcit-ssl --version` / `-V` and a misspelt command: answered at once, before torch or Lightning load."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import xcit_ssl
from xcit_ssl.cli import main

REPO = Path(__file__).parent.parent
HEAVY = ("torch", "lightning", "numpy", "jsonargparse", "timm")


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -X importtime -m xcit_ssl.cli ARGS`` as a user's shell runs it; (result, top-level
    packages imported), read from the import log, which names every module the process imported."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "xcit_ssl.cli", *args],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    imported = {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert "xcit_ssl" in imported  # the log is there: an empty set would prove nothing
    return proc, imported


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_installed_version_without_loading_torch(flag: str) -> None:
    proc, imported = _run(flag)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.splitlines()
    assert line.startswith(f"xcit-ssl {xcit_ssl.__version__} (Python ")
    assert f"torch {metadata.version('torch')}" in line and f"Lightning {metadata.version('lightning')}" in line
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    # pyproject.toml reads it from xcit_ssl.__version__: one place to bump it
    assert metadata.version("xcit-ssl") == xcit_ssl.__version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"xcit-ssl {metadata.version('xcit-ssl')} ")


@pytest.mark.parametrize(("typo", "meant"), [("fitt", "fit"), ("train", None), ("--verison", "--version"),
                                             ("-v", "--version"), ("exprot", "export")])  # fmt: skip
def test_a_misspelt_command_names_the_closest_without_loading_torch(typo: str, meant: str | None) -> None:
    proc, imported = _run(typo, "--recipe", "dino_nano_fmnist")
    assert proc.returncode == 2 and proc.stdout == ""
    error = next(ln for ln in proc.stderr.splitlines() if ln.startswith("xcit-ssl: unknown command"))
    assert f"'{typo}'" in error
    assert (f"Did you mean {meant}" in error) if meant else ("Did you mean" not in error)
    assert "fit" in proc.stderr and "commands:" in proc.stderr  # the command list follows
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("args", [("--recipe", "dino_smal_p8"), ("--recipe=dino_smal_p8", "--trainer.max_steps", "3")])
def test_a_misspelt_recipe_names_the_closest_without_loading_torch(args: tuple[str, ...]) -> None:
    proc, imported = _run("fit", *args)
    assert proc.returncode == 2 and proc.stdout == ""
    error = next(ln for ln in proc.stderr.splitlines() if ln.startswith("xcit-ssl fit: error:"))
    assert "unknown recipe 'dino_smal_p8'" in error and "dino_small_p8" in error
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_piped_into_a_closed_reader_ends_quietly() -> None:
    """`xcit-ssl --help | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "xcit_ssl.cli", "--help"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything was written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err
