"""`xcit-ssl models --recipe`: the backbone a recipe builds (a smaller XCiT than its named variant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from xcit_ssl.cli import main
from xcit_ssl.models import create_backbone
from xcit_ssl.models.flops import backbone_row, count_flops


def test_backbone_row_counts_the_overridden_network() -> None:
    row = backbone_row("xcit_nano_12_p8_224", depth=3, img_size=32)
    model = create_backbone("xcit_nano_12_p8_224", num_classes=1000, depth=3)
    assert row["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    model.reset_classifier(0)
    assert row["gflops"] == pytest.approx(count_flops(model.eval(), torch.zeros(1, 3, 32, 32)) / 1e9)
    assert row["img_size"] == 32 and row["patch"] == 8
    full = backbone_row("xcit_nano_12_p8_224", img_size=32)
    assert full["gflops"] > 3 * row["gflops"] * 0.9  # 12 blocks vs 3 (+ stem and class attention)


def test_models_recipe_names_the_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {"init_args": {
        "name": "xcit_nano_12_p8_224", "depth": 4, "img_size": 32}}}}}))  # fmt: skip
    assert main(["models", "--recipe", str(recipe), "--recipe", "dino_nano_fmnist"]) == 0
    out = capsys.readouterr().out
    assert "xcit_nano_12_p8_224 with depth 4" in out and "dino_nano_fmnist" in out
    assert f"{backbone_row('xcit_nano_12_p8_224', depth=4, img_size=32)['gflops']:.3f}" in out
    assert main(["models", "--recipe"]) == 2
    assert main(["models", "--recipe", str(tmp_path / "none.yaml")]) == 2
