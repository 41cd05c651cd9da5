"""A stand-in for the GPU machine's ``python3``, for the CPU rehearsal of ``gpu_check.sh``.

The GPU image has torch, torchvision, Lightning, timm and the rest of ``image_packages.txt``, and
nothing else: what xcit-ssl needs beyond them travels as wheels (``.whl``) and is installed with
``pip --target`` into a fresh folder put first on ``PYTHONPATH``. To rehearse that here, this
script makes a virtual environment of this machine's ``python3`` without pip and without the
system's site-packages, and fills its site-packages with symbolic links to the packages of the
project's ``.venv`` whose distribution is in the image's list, and to no other (not jsonargparse,
faiss-cpu, torchdata, webdataset, litdata and their needs, nor the editable xcit-ssl). So an
import the carried wheels do not satisfy fails here as it would there. One widening: what the
``.venv`` versions of image packages need to import is linked too, unless it is carried
(``.venv``'s huggingface_hub 2.x needs httpx2, where the image's 1.x needs the image's httpx);
the JSON lists those under ``needed_by_linked``.

Why a venv of links rather than ``python3 -S`` and explicit paths: a child process started with
``sys.executable`` (Inductor's compile workers, a spawned DataLoader, the ``xcit-ssl`` commands the
check starts) gets the same isolation without flags, and ``importlib.metadata`` sees the versions
of exactly the linked distributions, as the image's own site-packages would show them.

    python3 benchmarks/gpu_check/rehearsal_python.py --venv .venv --dest /tmp/x --json /tmp/x.json
    /tmp/x/bin/python3 ...        # PYTHONPATH=<the --target folder>:<repo> in front of it

Standard library (and pip's own copy of packaging, for markers) only: it runs under the bare ``python3``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import venv
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path) -> set[str]:
    return {normalise(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def _requirements(meta: str) -> list[str]:
    """The normalised names a distribution needs (no extras; markers evaluated where pip's copy of
    ``packaging`` is importable, else kept)."""
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - python3 without pip
        Requirement = None  # noqa: N806
    names = []
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        if "extra ==" in line:
            continue
        if Requirement is not None:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                names.append(normalise(req.name))
        else:
            names.append(normalise(re.split(r"[ ;<>=!~\[(]", line.strip())[0]))
    return names


def distributions(site: Path) -> dict[str, tuple[str, str, set[str]]]:
    """normalised name -> (name, version, the top-level entries of site-packages its RECORD lists,
    the normalised names it needs)."""
    found = {}
    for info in sorted(site.glob("*.dist-info")):
        meta = (info / "METADATA").read_text(errors="replace") if (info / "METADATA").exists() else ""
        name = re.search(r"^Name: (.+)$", meta, re.M)
        version = re.search(r"^Version: (.+)$", meta, re.M)
        if not name:
            continue
        tops = {info.name}
        record = info / "RECORD"
        if record.exists():
            for line in record.read_text().splitlines():
                path = line.split(",")[0]
                if path and not path.startswith(("..", "/")):
                    tops.add(path.split("/")[0])
        found[normalise(name.group(1).strip())] = (name.group(1).strip(), version.group(1).strip() if version else "?",
                                                   tops, _requirements(meta))  # fmt: skip
    return found


def carried_names(folder: Path) -> set[str]:
    """The distributions of the wheels in ``folder`` (``.whl``): never linked from .venv."""
    return {normalise(whl.name.split("-")[0]) for whl in folder.glob("*.whl")}


def closure(dists: dict, allowed: set[str], carried: set[str]) -> set[str]:
    """The image packages present in .venv, plus what their .venv versions need that is not carried."""
    keep = {key for key in dists if key in allowed and key not in carried}
    todo = list(keep)
    while todo:
        for need in dists[todo.pop()][3]:
            if need in dists and need not in keep and need not in carried:
                keep.add(need)
                todo.append(need)
    return keep


def build(venv_dir: Path, dest: Path, image: set[str], carried: set[str]) -> dict:
    site = next((venv_dir / "lib").glob("python3*/site-packages"))
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=True).create(dest)
    dest_site = next((dest / "lib").glob("python3*/site-packages"))
    dists = distributions(site)
    allowed = closure(dists, image, carried)
    owners: dict[str, set[str]] = defaultdict(set)
    for key, (_, _, tops, _) in dists.items():
        for top in tops:
            owners[top].add(key)
    linked, hidden, shared, needed = {}, {}, [], {}
    for key, (name, version, tops, _) in sorted(dists.items()):
        if key not in allowed:
            hidden[name] = version
            continue
        linked[name] = version
        if key not in image:
            needed[name] = version
        for top in sorted(tops):
            if top in {"__pycache__"} or not (site / top).exists() or (dest_site / top).exists():
                continue
            if owners[top] - allowed:  # a folder shared with a hidden distribution: say so
                shared.append(f"{top} ({', '.join(sorted(owners[top]))})")
            (dest_site / top).symlink_to(site / top)
    return {"python": str(dest / "bin" / "python3"), "python_version": sys.version.split()[0], "from_site": str(site),
            "linked": linked, "needed_by_linked": needed, "hidden": hidden, "carried": sorted(carried),
            "shared_top_level": shared}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, required=True, help="the project's .venv (read only)")
    parser.add_argument("--dest", type=Path, required=True, help="the stand-in environment to (re)create")
    parser.add_argument("--image", type=Path, default=HERE / "image_packages.txt")
    parser.add_argument("--carried", type=Path, default=Path(".whl"), help="the wheel folder: never linked")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = build(args.venv.resolve(), args.dest.resolve(), image_packages(args.image), carried_names(args.carried))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text)
    print(f"rehearsal python: {report['python']} (Python {report['python_version']}), {len(report['linked'])} packages "
          f"linked from {report['from_site']} ({', '.join(report['needed_by_linked']) or 'none'} only as their needs), "
          f"hidden: {', '.join(sorted(report['hidden']))}")  # fmt: skip


if __name__ == "__main__":
    main()
