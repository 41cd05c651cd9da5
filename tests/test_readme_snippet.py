"""The README's "Use your backbone elsewhere" snippet runs as written, on a real export.

The snippet opens ``backbone.safetensors`` in the working directory, as a user who just ran
``xcit-ssl export ... --out backbone.safetensors`` would; here that file is exported from a tiny
DINO checkpoint written by hand following the checkpoint contract.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from xcit_ssl.export import export_backbone
from xcit_ssl.models import create_backbone

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Use your backbone elsewhere"
TINY = dict(depth=1, embed_dim=32, num_heads=2)


def readme_snippet() -> str:
    """The first ```python block under the section heading (before the next ``## `` heading)."""
    text = README.read_text()
    assert HEADING in text, f"README.md lacks the section '{HEADING}'"
    section = text.split(HEADING, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
    match = re.search(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no ```python block under '{HEADING}'"
    return match.group(1)


def _tiny_dino_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    teacher = create_backbone("xcit_nano_12_p8_224", num_classes=0, img_size=32, **TINY)
    student = create_backbone("xcit_nano_12_p8_224", num_classes=0, img_size=32, **TINY)
    state = {f"teacher_backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student_backbone.{k}": v for k, v in student.state_dict().items()}
    state["teacher_head.mlp.0.weight"] = torch.randn(16, 32)  # a DINO head: not part of the export
    spec = {
        "backbone": {"name": "xcit_nano_12_p8_224", "overrides": {"num_classes": 0, "img_size": 32, **TINY}},
        "method": "dino", "img_size": 32, "mean": [0.286] * 3, "std": [0.353] * 3, "recipe": "dino_nano_fmnist",
    }  # fmt: skip
    torch.save({"state_dict": state, "xcit_ssl": spec, "epoch": 0}, path)


def test_readme_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only stall on a busy machine
    try:
        _tiny_dino_checkpoint(tmp_path / "last.ckpt")
        export_backbone(tmp_path / "last.ckpt", tmp_path / "backbone.safetensors")
        monkeypatch.chdir(tmp_path)
        namespace: dict = {"__name__": "readme_snippet"}
        exec(compile(readme_snippet(), str(README), "exec"), namespace)  # noqa: S102 - our own README
    finally:
        torch.set_num_threads(threads)
    assert namespace["meta"]["recipe"] == "dino_nano_fmnist"
    assert tuple(namespace["features"].shape) == (2, 32)
