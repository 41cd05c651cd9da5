"""Params and GFLOPs of every variant against the seed table, timm and fvcore itself."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import timm
import torch

from xcit_ssl.models import VARIANTS, create_backbone
from xcit_ssl.models.flops import count_flops, count_gflops, count_params_m, variant_table

# a verbatim copy of the seed table (shared/reference/xcit_variants.csv), so CI needs nothing outside the repo
SEED_TABLE = Path(__file__).with_name("data") / "xcit_variants.csv"


def _seed_rows() -> list[dict[str, str]]:
    with SEED_TABLE.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    return {row["name"]: row for row in variant_table()}


def test_every_seed_row_matches_params_and_gflops_to_printed_precision(table: dict[str, dict]) -> None:
    rows = _seed_rows()
    assert len(rows) == 42
    for row in rows:
        ours = table[row["arch"]]
        assert int(row["img_size"]) == ours["img_size"], row["seed_name"]
        assert f"{ours['params_m']:.2f}" == row["params_m"], (row["seed_name"], ours["params_m"])
        assert f"{ours['gflops']:.2f}" == row["gflops"], (row["seed_name"], ours["gflops"])


def _check_full_model(name: str, table: dict[str, dict]) -> None:
    """The table extrapolates in depth: check it against whole models (built on meta: free)."""
    with torch.device("meta"):
        ours = create_backbone(name, num_classes=1000)
        theirs = timm.create_model(name, pretrained=False, num_classes=1000)
    assert count_params_m(ours) == pytest.approx(table[name]["params_m"], abs=1e-9)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    ours.reset_classifier(0)
    assert count_gflops(ours, VARIANTS[name]["img_size"]) == pytest.approx(table[name]["gflops"], abs=1e-12)


def test_table_covers_every_variant(table: dict[str, dict]) -> None:
    assert sorted(table) == sorted(VARIANTS)


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_small_24_p8_384"])
def test_depth_extrapolation_equals_full_models(name: str, table: dict[str, dict]) -> None:
    _check_full_model(name, table)


@pytest.mark.slow
def test_depth_extrapolation_equals_full_models_for_every_variant(table: dict[str, dict]) -> None:
    for name in VARIANTS:
        _check_full_model(name, table)


def _fvcore_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    import fvcore.nn as fvcore_nn  # a test dependency: the independent reference for the counting rules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore traces with torch.jit, which warns on this torch
        analysis = fvcore_nn.FlopCountAnalysis(model.eval(), x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return float(analysis.total())


def _sdpa_macs(model: torch.nn.Module, grid: int) -> int:
    """fvcore has no rule for SDPA: the CLS query's q k^T and attn v over 1 + N tokens, per CA block."""
    return 2 * len(model.cls_attn_blocks) * model.embed_dim * (1 + grid * grid)


def _check_against_fvcore(name: str, size: int, num_classes: int, **overrides: int) -> None:
    model = create_backbone(name, num_classes=num_classes, **overrides).eval()
    x = torch.randn(1, 3, size, size)
    expected = _fvcore_flops(model, x) + _sdpa_macs(model, size // model.patch_size)
    assert count_flops(model, x) == expected


def test_counts_match_fvcore_on_a_tiny_model() -> None:
    _check_against_fvcore("xcit_nano_12_p16_224", 64, num_classes=1000, depth=2)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), [("xcit_nano_12_p8_224", 224), ("xcit_tiny_12_p16_384", 384)])
def test_counts_match_fvcore(name: str, size: int) -> None:
    _check_against_fvcore(name, size, num_classes=0)


def test_counting_runs_in_eval_mode_and_restores_the_mode() -> None:
    # fvcore's eval-mode BatchNorm rule: 2 per element with an affine transform
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(4)).train()
    assert count_flops(bn, torch.zeros(2, 4, 3, 3)) == 2 * 2 * 4 * 3 * 3
    assert bn.training


@pytest.mark.slow
def test_every_seed_row_with_full_depth_counts() -> None:
    for row in _seed_rows():
        with torch.device("meta"):
            model = create_backbone(row["arch"], num_classes=0)
        assert f"{count_gflops(model, int(row['img_size'])):.2f}" == row["gflops"], row["seed_name"]

