"""``xcit-ssl validate`` on a 4-class folder reports no top-5: it would read 100 % whatever the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from xcit_ssl.cli import main
from xcit_ssl.models import create_backbone


def test_validate_with_four_classes_reports_no_top5(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = tmp_path / "data" / "val" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    model = create_backbone("xcit_nano_12_p8_224", num_classes=4, depth=1)
    weights = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"xcit_ssl": json.dumps({"name": "xcit_nano_12_p8_224", "overrides": {"depth": 1}})})  # fmt: skip
    out = tmp_path / "result.json"
    assert main(["validate", "--weights", str(weights), "--data.root", str(tmp_path / "data"), "--img_size", "32",
                 "--num_workers", "0", "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["num_images"] == 8 and result["top5"] is None
    assert any("top-5 not reported: with 4 classes" in note for note in result["notes"])
    printed = capsys.readouterr().out
    assert "top-5 not reported" in printed and "100.00" not in printed
