"""``xcit-ssl summary``: the demo's final table from knn/linear result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xcit_ssl.cli import main


def _write(path: Path, command: str, top1: float, backbone: str = "xcit", pooling: str = "cls+pyramid") -> str:
    results = {"20": {"top1": top1, "top5": 99.0, "k_used": 20}} if command == "knn" else {"top1": top1}
    path.write_text(json.dumps({"command": command, "protocol": f"{command}_fmnist", "results": results,
                                "weights": {"path": "w", "backbone": backbone}, "num_test": 10000,
                                "protocol_config": {"features": {"pooling": pooling}}}))  # fmt: skip
    return str(path)


def test_summary_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["summary", "--k", "20", "--out", str(tmp_path / "demo_results.json"),
            "--row", "raw pixels", _write(tmp_path / "a.json", "knn", 84.88, "raw_pixels", "cls"),
            _write(tmp_path / "b.json", "linear", 81.6, "raw_pixels", "cls"),
            "--row", "DINO teacher", _write(tmp_path / "c.json", "knn", 86.1)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "raw pixels" in out and "84.88" in out and "81.60" in out and "86.10" in out
    rows = json.loads((tmp_path / "demo_results.json").read_text())["rows"]
    assert [(r["label"], r["knn_top1"], r["linear_top1"]) for r in rows] == [
        ("raw pixels", 84.88, 81.6), ("DINO teacher", 86.1, None)]
    # the tokens column says what each row's feature is: the pixels, or the pooling option
    assert [r["tokens"] for r in rows] == ["pixels", "cls+pyramid"] and "cls+pyramid" in out
    assert main(["summary", "--k", "10", "--row", "x", str(tmp_path / "a.json")]) == 2
    assert "no k = 10 result" in capsys.readouterr().err


def test_summary_leads_with_the_first_feature_and_fills_the_pixels_row(tmp_path: Path, capsys) -> None:
    """The demo's table: CLS (DINO's protocol) first, the pyramid as an extra, pixels in both groups."""
    d = tmp_path
    args = ["summary", "--k", "20", "--out", str(d / "s.json"),
            "--row", "raw pixels", _write(d / "p1.json", "knn", 84.88, "raw_pixels", "cls"),
            _write(d / "p2.json", "linear", 84.12, "raw_pixels", "cls"),
            "--row", "DINO teacher", _write(d / "c1.json", "knn", 85.61, pooling="cls"),
            _write(d / "c2.json", "linear", 87.25, pooling="cls"),
            _write(d / "y1.json", "knn", 86.34, pooling="cls+pyramid3"),
            _write(d / "y2.json", "linear", 89.21, pooling="cls+pyramid3")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "features" in line)
    assert header.index("k-NN CLS") < header.index("linear CLS") < header.index("k-NN cls+pyramid3")
    dino_line = next(line for line in out.splitlines() if "DINO teacher" in line)
    assert [v for v in dino_line.split() if "." in v] == ["85.61", "87.25", "86.34", "89.21"]
    pixel_line = next(line for line in out.splitlines() if "raw pixels" in line)
    assert [v for v in pixel_line.split() if "." in v] == ["84.88", "84.12", "84.88", "84.12"]
    rows = json.loads((d / "s.json").read_text())["rows"]
    assert (rows[1]["tokens"], rows[1]["knn_top1"], rows[1]["linear_top1"]) == ("cls", 85.61, 87.25)
    assert rows[1]["by_tokens"]["cls+pyramid3"] == {"knn_top1": 86.34, "linear_top1": 89.21}
