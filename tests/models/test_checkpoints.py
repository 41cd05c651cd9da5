"""Reading every checkpoint scheme into our XCiT, strictly, and the errors a user can cause.

Foreign schemes are built here by renaming a timm state dict with mappings written from the
official, DINO and mmpretrain sources, independently of the converters under test; every
scheme must then give timm's outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path

import pytest
import timm
from model_helpers import randomise_stats
import torch
from lightning.fabric.utilities.data import AttributeDict
from safetensors.torch import save_file

from xcit_ssl.errors import UserError
from xcit_ssl.models import create_backbone, read_record
from xcit_ssl.models.checkpoints import (
    load_backbone,
    load_backbone_weights,
    read_state_dict,
    summarise_keys,
)

NAME = "xcit_nano_12_p16_224"
TINY = dict(depth=2)


class Payload:
    """Unpickling this would delete ``path``: loading must not run it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.remove, (str(self.path),))


def _timm_model(num_classes: int = 0, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, num_classes=num_classes, **TINY).eval()
    randomise_stats(model, seed)
    return model


def _ours(num_classes: int = 0) -> torch.nn.Module:
    return create_backbone(NAME, num_classes=num_classes, **TINY).eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same_outputs(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(X), reference(X), atol=1e-5, rtol=0)


def _to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/xcit naming: pos_embeder, fused class-attention qkv ([q; k; v] rows)."""
    out = {}
    for k, v in sd.items():
        if re.match(r"cls_attn_blocks\.\d+\.attn\.[kv]\.", k):
            continue
        if m := re.match(r"(cls_attn_blocks\.\d+\.attn)\.q\.(weight|bias)", k):
            parts = [sd[f"{m[1]}.{n}.{m[2]}"] for n in "qkv"]
            out[f"{m[1]}.qkv.{m[2]}"] = torch.cat(parts, 0)
            continue
        out[k.replace("pos_embed.", "pos_embeder.")] = v
    return out


def _to_mmpretrain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain ImageClassifier naming (backbone XCiT + LinearClsHead), from its xcit.py."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"patch_embed\.proj\.(\d+)\.([01])\.(.+)", k):
            k = f"patch_embed.proj.{int(m[1]) // 2}.{'conv' if m[2] == '0' else 'bn'}.{m[3]}"
        k = k.replace("pos_embed.token_projection.", "pos_embed.token_projection.conv.")
        k = re.sub(r"^blocks\.", "xca_layers.", k)
        k = re.sub(r"^cls_attn_blocks\.", "ca_layers.", k)
        k = k.replace("local_mp.conv1.", "local_mp.conv1.conv.").replace("local_mp.bn.", "local_mp.conv1.bn.")
        k = k.replace("local_mp.conv2.", "local_mp.conv2.conv.")
        k = k.replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
        out[k if k.startswith("head.") else f"backbone.{k}"] = v
    return {("head.fc." + k[5:] if k.startswith("head.") else k): v for k, v in out.items()}


def _dino_head(prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(16, 128),
        f"{prefix}head.last_layer.weight_g": torch.ones(32, 1),
        f"{prefix}head.last_layer.weight_v": torch.randn(32, 16),
    }


# -- schemes ---------------------------------------------------------------------------------------


def test_timm_file_loads_to_timm_outputs(tmp_path: Path) -> None:
    ref = _timm_model()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ours = _ours()
    report = load_backbone_weights(ours, tmp_path / "timm.pth")
    assert report.scheme == "timm" and not report.dropped_head
    assert report.loaded == len(ours.state_dict())
    _same_outputs(ours, ref)


def test_official_scheme_loads_to_same_outputs(tmp_path: Path) -> None:
    ref = _timm_model(num_classes=1000)
    torch.save({"model": _to_official(ref.state_dict()), "epoch": 300}, tmp_path / "xcit.pth")
    ours = _ours(num_classes=1000)
    assert load_backbone_weights(ours, tmp_path / "xcit.pth").scheme == "official"
    _same_outputs(ours, ref)


def test_mmpretrain_scheme_loads_to_same_outputs(tmp_path: Path) -> None:
    ref = _timm_model(num_classes=1000)
    ckpt = {"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": _to_mmpretrain(ref.state_dict())}
    torch.save(ckpt, tmp_path / "mm.pth")
    assert "backbone.ca_layers.0.ffn.layers.0.0.weight" in ckpt["state_dict"]  # the scheme really differs
    ours = _ours(num_classes=1000)
    assert load_backbone_weights(ours, tmp_path / "mm.pth").scheme == "mmpretrain"
    _same_outputs(ours, ref)


def test_dino_file_picks_teacher_or_student_and_drops_dino_head(tmp_path: Path) -> None:
    teacher, student = _timm_model(seed=1), _timm_model(seed=2)

    def wrapped(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        sd = {f"module.backbone.{k}": v for k, v in _to_official(model.state_dict()).items()}
        return sd | _dino_head("module.")

    ckpt = {
        "teacher": wrapped(teacher),
        "student": wrapped(student),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "args": argparse.Namespace(arch="xcit_nano_12_p16"),  # pickled object: must be read safely
        "epoch": 10,
    }
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    ours = _ours()
    report = load_backbone_weights(ours, tmp_path / "checkpoint.pth")  # default key: teacher
    assert "ignored beside the backbone 3 keys: head.* (3)" in report.notes  # short: a count and the names
    _same_outputs(ours, teacher)
    load_backbone_weights(ours, tmp_path / "checkpoint.pth", checkpoint_key="student")
    _same_outputs(ours, student)


def _lightning_ckpt(path: Path, method: str, **backbones: torch.nn.Module) -> None:
    state = {}
    for prefix, model in backbones.items():
        state |= {f"{prefix}.{k}": v for k, v in model.state_dict().items()}
    if method == "dino":
        state |= _dino_head("teacher_") | _dino_head("student_")
    torch.save(
        {
            "state_dict": state,
            # what Lightning and LightningCLI pickle beside the weights of other projects' checkpoints
            "hyper_parameters": {
                "args": argparse.Namespace(lr=0.1), "hparams": AttributeDict(lr=0.1), "dirs": [Path("runs")]
            },
            "xcit_ssl": {"backbone": {"name": NAME, "overrides": dict(TINY)}, "method": method, "img_size": 32},
            "epoch": 1,
        },
        path,
    )


def test_our_dino_ckpt_builds_the_variant_from_its_spec(tmp_path: Path) -> None:
    teacher, student = _timm_model(seed=1), _timm_model(seed=2)
    path = tmp_path / "last.ckpt"
    _lightning_ckpt(path, "dino", teacher_backbone=teacher, student_backbone=student)
    record = read_record(path)
    assert record is not None and (record.architecture, record.overrides) == (NAME, dict(TINY))
    model = load_backbone(path)  # depth=2 comes from the stored overrides
    assert len(model.blocks) == 2 and model.num_classes == 0
    _same_outputs(model, teacher)
    _same_outputs(load_backbone(path, checkpoint_key="student"), student)


def test_supervised_ckpt_needs_a_key_naming_one_of_its_backbones(tmp_path: Path) -> None:
    backbone, ema = _timm_model(seed=1), _timm_model(seed=2)
    path = tmp_path / "sup.ckpt"
    _lightning_ckpt(path, "supervised", backbone=backbone, ema_backbone=ema)
    with pytest.raises(UserError, match=r"backbone, ema\) and none is 'teacher'"):
        read_state_dict(path)
    _same_outputs(load_backbone(path, checkpoint_key="ema"), ema)
    _same_outputs(load_backbone(path, checkpoint_key="backbone"), backbone)


def test_exported_safetensors_with_metadata(tmp_path: Path) -> None:
    ref = _timm_model()
    meta = {"xcit_ssl": json.dumps({"name": NAME, "overrides": TINY, "img_size": 32})}
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "b.safetensors", metadata=meta)
    record = read_record(tmp_path / "b.safetensors")
    assert record is not None and (record.architecture, record.overrides, record.img_size) == (NAME, TINY, 32)
    _same_outputs(load_backbone(tmp_path / "b.safetensors"), ref)
    # an exported file loads into timm strictly: the keys really are timm's
    timm.create_model(NAME, num_classes=0, **TINY).load_state_dict(read_state_dict(tmp_path / "b.safetensors"))


def test_load_backbone_infers_a_standard_variant_from_the_weights() -> None:
    ref = timm.create_model("xcit_nano_12_p8_224", pretrained=False, num_classes=0)
    model = load_backbone(ref.state_dict())
    assert model.variant_name == "xcit_nano_12_p8_224" and len(model.blocks) == 12
    with pytest.raises(UserError, match="pass the backbone name"):
        load_backbone(_timm_model().state_dict())  # depth 2 matches no family


# -- strictness and errors ---------------------------------------------------------------------


def test_other_variant_is_refused_naming_both() -> None:
    nano = timm.create_model(NAME, pretrained=False, num_classes=0).state_dict()
    with torch.device("meta"):  # the check runs before any copy, so a meta model suffices
        small = create_backbone("xcit_small_12_p16_224", num_classes=0)
    with pytest.raises(UserError) as err:
        load_backbone_weights(small, nano)
    msg = str(err.value)
    assert "xcit_nano_12_p16 (D=128, depth=12" in msg and "xcit_small_12_p16_224 (D=384, depth=12" in msg


def test_misfit_names_missing_unexpected_and_misshaped_keys() -> None:
    sd = _timm_model().state_dict()
    del sd["blocks.1.norm1.weight"], sd["blocks.0.norm1.weight"]
    sd["blocks.0.attn.extra"] = torch.ones(1)
    sd["cls_attn_blocks.1.mlp.fc1.bias"] = torch.ones(3)
    with pytest.raises(UserError) as err:
        load_backbone_weights(_ours(), sd)
    msg = str(err.value)
    assert "missing from the checkpoint (2): blocks.{0-1}.norm1.weight" in msg
    assert "unexpected in the checkpoint (1): blocks.0.attn.extra" in msg
    assert "cls_attn_blocks.1.mlp.fc1.bias [3] vs model [512]" in msg


@pytest.mark.parametrize(("ckpt_classes", "model_classes"), [(1000, 10), (1000, 0), (0, 10)])
def test_head_that_does_not_fit_is_dropped_with_a_notice(
    ckpt_classes: int, model_classes: int, caplog: pytest.LogCaptureFixture
) -> None:
    ref = _timm_model(num_classes=ckpt_classes)
    ours = _ours(num_classes=model_classes)
    head_before = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith("head.")}
    with caplog.at_level(logging.WARNING):
        report = load_backbone_weights(ours, ref.state_dict())
    assert report.dropped_head and "head" in caplog.text
    for k, v in head_before.items():  # the model's head keeps its initialisation
        assert torch.equal(ours.state_dict()[k], v)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(X), ref.forward_features(X), atol=1e-5)


def test_truncated_and_foreign_files_are_named(tmp_path: Path) -> None:
    torch.save(_timm_model().state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.ckpt").write_text("epoch 3: loss 1.2\n")
    save_file({"cls_token": torch.zeros(1, 1, 4)}, tmp_path / "w.safetensors")
    st = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[:-8])
    cases = {
        "cut.pth": "truncated or corrupt",
        "notes.ckpt": "is not a checkpoint",
        "cut.safetensors": "truncated or corrupt",
        "absent.pth": "checkpoint not found",
    }
    for name, expected in cases.items():
        with pytest.raises(UserError, match=expected) as err:
            read_state_dict(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(UserError, match="holds no XCiT weights"):
        read_state_dict({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0).state_dict()
    with pytest.raises(UserError, match="holds no XCiT blocks"):
        load_backbone_weights(_ours(), vit)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_code_is_refused_naming_it_and_never_run(tmp_path: Path, zip_format: bool) -> None:
    canary = tmp_path / "canary"
    canary.write_text("alive")
    ref = _timm_model()
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in ref.state_dict().items()}, "x": Payload(canary)}
    torch.save(ckpt, tmp_path / "w.ckpt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match=rf"holds a pickled '{os.remove.__module__}.remove' besides its weights"):
        load_backbone_weights(_ours(), tmp_path / "w.ckpt")
    assert canary.read_text() == "alive"


def test_summarise_keys_folds_block_indices() -> None:
    keys = [f"blocks.{i}.attn.qkv.weight" for i in (0, 1, 2, 5)] + ["cls_token"]
    assert summarise_keys(keys) == "blocks.{0-2,5}.attn.qkv.weight, cls_token"


def test_variant_mismatch_names_the_command_line_fix(tmp_path: Path) -> None:
    """The fix is a flag: fit's backbone name for --model.pretrained, --backbone for the other commands."""
    nano = timm.create_model(NAME, pretrained=False, num_classes=0).state_dict()
    with torch.device("meta"):
        small = create_backbone("xcit_small_12_p16_224", num_classes=0)
    with pytest.raises(UserError) as err:
        load_backbone_weights(small, nano)
    assert "pass --model.backbone.init_args.name xcit_nano_12_p16_224" in str(err.value)
    assert "create_backbone" not in str(err.value) and "load_backbone" not in str(err.value)
    torch.save(nano, tmp_path / "nano.pth")
    with pytest.raises(UserError) as err:
        load_backbone(tmp_path / "nano.pth", name="xcit_small_12_p16_224")
    assert "pass --backbone xcit_nano_12_p16_224, or drop --backbone" in str(err.value)
    # the recipe's own size overrides differ: the flags that rebuild the checkpoint's architecture
    with pytest.raises(UserError) as err:
        load_backbone_weights(_ours(), nano)  # depth 2 vs the checkpoint's 12
    assert "pass --model.backbone.init_args.depth 12 (the checkpoint's architecture)" in str(err.value)
    with pytest.raises(UserError) as err:
        load_backbone_weights(create_backbone(NAME, num_classes=0), _ours().state_dict())  # a custom checkpoint
    assert "pass --model.backbone.init_args.depth 2 (the checkpoint's architecture)" in str(err.value)
