"""``benchmarks/gpu_check.sh`` cannot rot: it needs nothing from outside, and its CPU rehearsal runs.

The GPU machine reaches no network: the check installs only the wheels carried in ``.whl`` (filled
by ``scripts/fetch_wheels.sh``) into a fresh ``--target`` folder, beside the image's own torch. The
rehearsal (``--rehearse``) runs the same script on this machine's CPU with a python3 that sees only
the packages the GPU image has. Fast: the script's text and the dependency list. The ``env`` part
alone (14-23 s on the 2-core VM, more when .whl/ must be fetched first): the wheels install and every
module imports from where it should. ``slow``: every part (127-174 s there, 6 min under heavy load).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
FETCH = REPO / "scripts" / "fetch_wheels.sh"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _code_lines(path: Path) -> list[str]:
    """The script's lines without comments (the header explains what it does not do)."""
    return [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _carried() -> dict[str, str]:
    out = subprocess.run(["bash", str(FETCH), "--list"], capture_output=True, text=True, check=True).stdout
    return {_norm(spec.split("==")[0]): spec.split("==")[1] for spec in (line.split()[0] for line in out.splitlines())}


def test_the_check_fetches_nothing() -> None:
    """No setup.sh, no venv, no registry: pip only with --no-index, no curl/wget/apt."""
    code = "\n".join(_code_lines(SCRIPT))
    assert "setup.sh" not in code and "-m venv" not in code and "pip install -e" not in code
    assert not re.search(r"\b(curl|wget|apt|apt-get|conda)\b", code)
    assert "pip download" not in code
    installs = [line for line in code.splitlines() if re.search(r"pip\S* install", line)]
    assert installs and all("--no-index" in line and "--no-deps" in line and "--target" in line for line in installs), installs
    assert "PIP_NO_INDEX=1" in code
    # the one network step is the rehearsal's wheel fetch, before the clock starts
    fetches = [i for i, line in enumerate(code.splitlines()) if "fetch_wheels.sh" in line]
    clock = next(i for i, line in enumerate(code.splitlines()) if line.startswith("START="))
    assert fetches and all(i < clock for i in fetches)


def test_every_dependency_is_in_the_gpu_image_or_carried() -> None:
    """A dependency added to pyproject.toml must be in the image's list or in fetch_wheels.sh."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {_norm(re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0]) for d in deps}
    image = {_norm(line.strip()) for line in (REPO / "benchmarks" / "gpu_check" / "image_packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}  # fmt: skip
    carried = _carried()
    assert not carried.keys() & image, "a carried wheel shadows an image package"
    assert names - image - carried.keys() == set(), "add these to scripts/fetch_wheels.sh (and their own needs)"
    assert {"jsonargparse", "docstring-parser", "typeshed-client", "faiss-cpu", "torchdata"} <= carried.keys()


def _wheels_or_skip() -> None:
    if not list((REPO / ".whl").glob("*.whl")):
        done = subprocess.run(["bash", str(FETCH)], cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f".whl/ is empty and scripts/fetch_wheels.sh could not fill it (no registry?): {done.stderr[-500:]}")


def _rehearse(tmp_path: Path, parts: str | None, timeout: int) -> tuple[dict, dict, str]:
    _wheels_or_skip()
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1",
               GPU_CHECK_VENV=sys.prefix)  # fmt: skip
    env.pop("PYTHONPATH", None)
    if parts:
        env["GPU_CHECK_PARTS"] = parts
    done = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["console.log", "parts.json", "results.json"]  # 8 files at most come back
    return json.loads((out / "parts.json").read_text()), json.loads((out / "results.json").read_text()), log


def _check_env(parts: dict, results: dict, tmp_path: Path) -> None:
    assert parts["mode"] == "rehearse" and parts["parts"]["install"]["status"] == "ok"
    env = results["env"]
    assert parts["parts"]["env"]["status"] == "ok", env.get("problems")
    assert env["problems"] == [] and env["python"] == str(tmp_path / "work" / "python" / "bin" / "python3")
    site = str(tmp_path / "work" / "site")
    for module in ("faiss", "torchdata.stateful_dataloader", "jsonargparse", "webdataset", "litdata"):
        assert env["modules"][module].startswith(site), (module, env["modules"][module])  # the wheel, not .venv's copy
    assert env["modules"]["xcit_ssl"] == str(REPO / "xcit_ssl" / "__init__.py")  # the source tree, no install
    assert {_norm(name) for name in env["carried"]} == set(_carried())
    hidden = set(results["rehearsal_python"]["hidden"])
    assert {"jsonargparse", "faiss-cpu", "torchdata", "xcit-ssl"} <= {_norm(h) for h in hidden}


def test_rehearsal_installs_the_wheels_and_imports_from_them(tmp_path: Path) -> None:
    parts, results, _ = _rehearse(tmp_path, "env", timeout=300)
    _check_env(parts, results, tmp_path)
    assert {name for name, p in parts["parts"].items() if p["status"] == "not selected"} == {
        "step_eager", "data_write", "data_pipeline", "fit", "kill_resume", "knn", "step_compiled", "photometric"}


@pytest.mark.slow
def test_rehearsal_runs_every_part(tmp_path: Path) -> None:
    parts, results, log = _rehearse(tmp_path, None, timeout=900)
    _check_env(parts, results, tmp_path)
    assert {name: p["status"] for name, p in parts["parts"].items() if p["status"] != "ok"} == {}, log[-4000:]
    kr = results["kill_resume"]
    assert kr["strategy"] == "ddp" and "fsdp" in kr["note"]
    assert kr["runs"]["ddp_killed"]["sigterm_sent"] and kr["runs"]["ddp_killed"]["exit_code"] == 143
    assert kr["same_final_step"] and kr["resumed_vs_uninterrupted"]["max_abs_diff"] <= 1e-6  # fp32 on the CPU: exact
    assert results["knn"]["num_train"] == 48 and results["knn"]["train_features_img_per_s"] > 0
    assert results["summary"]["verdict"] in ("data-bound", "compute-bound")
    assert results["step_compiled"]["compile"] and results["photometric"]["compile_backend"] == "aot_eager"
