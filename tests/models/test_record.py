"""The backbone record: read from every file shape xcit-ssl writes, written byte for byte as before.

The expected entries are literals copied from what the code wrote before the record existed
(``methods/checkpointing.backbone_spec`` and ``xcit-ssl export``), not the module's own output,
so a change of key, order or type shows here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from xcit_ssl.errors import UserError
from xcit_ssl.methods.checkpointing import backbone_spec
from xcit_ssl.models import ARCH_KEYS, BackboneRecord, create_backbone, read_record
from xcit_ssl.models.record import arch_overrides

NAME = "xcit_nano_12_p16_224"
TINY = {"depth": 1}
WEIGHTS = {"cls_token": torch.zeros(1, 1, 4)}  # the record does not look at the weights

# checkpoint["xcit_ssl"] as backbone_spec wrote it for `create_backbone(NAME, num_classes=0, depth=1)`
# with no trainer: overrides are the build arguments, mean/std ImageNet's, recipe unknown
TODAY_CHECKPOINT_ENTRY = {
    "backbone": {"name": NAME, "overrides": {"num_classes": 0, "depth": 1}},
    "method": "dino",
    "img_size": 224,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "recipe": None,
}

# the JSON `xcit-ssl export` wrote into safetensors metadata (and <out>.json beside .pth exports)
TODAY_EXPORT_ENTRY = {
    "name": NAME, "overrides": {"depth": 1}, "img_size": 32, "mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35],
    "recipe": "dino_nano_fmnist", "method": "dino", "checkpoint_key": "teacher", "source": "last.ckpt",
    "source_sha256": "ab" * 32, "knn": [{"protocol": "knn_fmnist", "k": 20, "top1": 80.0, "top5": 99.0}],
    "embed_dim": 128, "patch_size": 16,
    "output": "normalised CLS features [B, D] of images [B, 3, H, W] (H, W multiples of patch_size)",
    "format": "safetensors", "layout": "timm", "xcit_ssl_version": "0.1.0",
}  # fmt: skip


def _save_safetensors(path: Path, metadata: dict[str, str]) -> Path:
    save_file(WEIGHTS, str(path), metadata=metadata)
    return path


# -- reading every shape -----------------------------------------------------------------------


def test_reads_a_training_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "xcit_ssl": TODAY_CHECKPOINT_ENTRY, "epoch": 3}, path)
    record = read_record(path)
    assert record == BackboneRecord(
        architecture=NAME, overrides={"num_classes": 0, "depth": 1}, img_size=224,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), method="dino", recipe=None,
    )  # fmt: skip
    # a checkpoint already loaded (resume reads its own) gives the same record
    assert read_record(torch.load(path, weights_only=True)) == record


def test_reads_an_export_and_keeps_its_provenance(tmp_path: Path) -> None:
    path = _save_safetensors(tmp_path / "b.safetensors", {"format": "pt", "xcit_ssl": json.dumps(TODAY_EXPORT_ENTRY)})
    record = read_record(path)
    assert record is not None
    assert (record.architecture, record.overrides, record.img_size) == (NAME, {"depth": 1}, 32)
    assert (record.mean, record.std) == ((0.3,) * 3, (0.35,) * 3)
    assert (record.method, record.recipe) == ("dino", "dino_nano_fmnist")
    assert record.extra["knn"][0]["top1"] == 80.0 and record.extra["checkpoint_key"] == "teacher"
    assert "name" not in record.extra and "mean" not in record.extra


def test_reads_a_pth_export_through_its_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "b.pth"
    torch.save(WEIGHTS, path)
    (tmp_path / "b.pth.json").write_text(json.dumps(TODAY_EXPORT_ENTRY, indent=2) + "\n")
    record = read_record(path)
    assert record is not None and record.architecture == NAME and record.img_size == 32


def test_the_variant_is_found_nested_or_at_the_top(tmp_path: Path) -> None:
    # a checkpoint entry holding the export's flat shape, and an export carrying the nested one too
    flat = {"name": NAME, "overrides": {"depth": 2}, "method": "dino"}
    assert BackboneRecord.from_checkpoint_entry(flat).architecture == NAME  # type: ignore[union-attr]
    both = {"backbone": {"name": NAME, "overrides": {"depth": 2}}, "name": NAME, "overrides": {"depth": 2}}
    path = _save_safetensors(tmp_path / "b.safetensors", {"xcit_ssl": json.dumps(both)})
    record = read_record(path)
    assert record is not None and record.overrides == {"depth": 2} and "backbone" not in record.extra
    # a record without a variant still carries what it knows (a foreign backbone's mean/std)
    nameless = BackboneRecord.from_checkpoint_entry({"backbone": {"name": None}, "img_size": 64, "mean": [0.5] * 3})
    assert nameless is not None and nameless.architecture is None and nameless.img_size == 64


@pytest.mark.parametrize("kind", ["pth", "safetensors", "ckpt_without_entry"])
def test_a_file_without_a_record_reads_none(tmp_path: Path, kind: str) -> None:
    if kind == "pth":
        path = tmp_path / "timm.pth"
        torch.save(create_backbone(NAME, num_classes=0, **TINY).state_dict(), path)
    elif kind == "safetensors":
        path = _save_safetensors(tmp_path / "timm.safetensors", {"format": "pt"})
    else:
        path = tmp_path / "other.ckpt"
        torch.save({"state_dict": {}, "xcit_ssl": "not a dict", "epoch": 0}, path)
    assert read_record(path) is None


def test_bad_json_metadata_names_the_file(tmp_path: Path) -> None:
    path = _save_safetensors(tmp_path / "broken.safetensors", {"xcit_ssl": '{"name": "xcit_'})
    with pytest.raises(UserError, match=r"broken\.safetensors: its 'xcit_ssl' metadata is not valid JSON"):
        read_record(path)


# -- writing exactly what was written before ----------------------------------------------------


def test_checkpoint_entry_is_what_backbone_spec_wrote() -> None:
    backbone = create_backbone(NAME, num_classes=0, **TINY)
    entry = backbone_spec(backbone, method="dino", trainer=None)
    assert list(entry) == list(TODAY_CHECKPOINT_ENTRY)  # key order: torch.save pickles it as is
    assert pickle.dumps(entry) == pickle.dumps(TODAY_CHECKPOINT_ENTRY)


def test_checkpoint_entry_takes_size_and_statistics_from_the_training_transform() -> None:
    backbone = create_backbone(NAME, num_classes=0, img_size=32, **TINY)
    transform = SimpleNamespace(global_crop_size=32, mean=(0.3, 0.3, 0.3), std=[0.35, 0.35, 0.35])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_transform=transform),
                              lightning_module=SimpleNamespace(recipe="dino_nano_fmnist"))  # fmt: skip
    entry = backbone_spec(backbone, method="dino", trainer=trainer)  # type: ignore[arg-type]
    expected = {
        "backbone": {"name": NAME, "overrides": {"num_classes": 0, "img_size": 32, "depth": 1}},
        "method": "dino", "img_size": 32, "mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35],
        "recipe": "dino_nano_fmnist",
    }  # fmt: skip
    assert pickle.dumps(entry) == pickle.dumps(expected)


def test_export_metadata_is_written_as_before() -> None:
    record = BackboneRecord.from_metadata({"xcit_ssl": json.dumps(TODAY_EXPORT_ENTRY)}, "b.safetensors")
    assert record is not None
    assert record.to_metadata() == {"xcit_ssl": json.dumps(TODAY_EXPORT_ENTRY)}  # bytes and key order
    assert list(record.to_metadata_entry()) == list(TODAY_EXPORT_ENTRY)


@pytest.mark.parametrize("shape", ["checkpoint", "safetensors"])
def test_round_trip(tmp_path: Path, shape: str) -> None:
    record = BackboneRecord(
        architecture=NAME, overrides={"depth": 1, "eta": 1e-5}, img_size=48, mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25), method="supervised", recipe="sup_nano_fmnist", extra={"note": "kept"},
    )  # fmt: skip
    if shape == "checkpoint":
        path = tmp_path / "last.ckpt"
        torch.save({"state_dict": {}, "xcit_ssl": record.to_checkpoint_entry()}, path)
    else:
        path = _save_safetensors(tmp_path / "b.safetensors", {"format": "pt", **record.to_metadata()})
    assert read_record(path) == record


def test_arch_keys_filter_what_changes_the_network() -> None:
    build_args = {"num_classes": 0, "drop_path_rate": 0.1, "img_size": 32, "tokens_norm": False, "depth": 2}
    # ARCH_KEYS order, not the caller's: export metadata must not depend on how a model was built
    assert list(arch_overrides(build_args)) == ["depth", "tokens_norm"]
    assert ARCH_KEYS[:3] == ("patch_size", "in_chans", "embed_dim") and len(set(ARCH_KEYS)) == len(ARCH_KEYS)
