"""Opening weight files safely: never weaker than ``torch.load(weights_only=True)``.

The refused files are crafted the way an attacker would write them (a pickle calling a function,
a BUILD on a class, a dict subclass); the allowed ones carry what real checkpoints carry beside
their weights (DINO's ``argparse.Namespace``, Lightning's ``AttributeDict``, paths).
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xcit_ssl.errors import UserError
from xcit_ssl.models.checkpoint_files import load_checkpoint_file

# GLOBAL argparse.Namespace (allowed), then BUILD {'pwned': 1} on the class itself, not an instance
_BUILD_ON_CLASS = b"\x80\x02cargparse\nNamespace\n}q\x00X\x05\x00\x00\x00pwnedq\x01K\x01sb."


def _legacy_file(path: Path, payload: bytes) -> None:
    """A pre-1.6 torch.save file (a bare pickle stream) whose object pickle is ``payload``."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    header = b"".join(
        pickle.dumps(v, protocol=2)
        for v in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, info)
    )
    path.write_bytes(header + payload)


def _zip_file(path: Path, payload: bytes) -> None:
    """A torch.save zip archive whose ``data.pkl`` is ``payload``."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, payload if name.endswith("/data.pkl") else src.read(name))


@pytest.mark.parametrize("writer", [_legacy_file, _zip_file])
def test_build_on_a_class_is_refused_without_side_effect(tmp_path: Path, writer) -> None:
    writer(tmp_path / "evil.pth", _BUILD_ON_CLASS)
    with pytest.raises(UserError, match=r"evil\.pth holds a pickled 'type' besides its weights"):
        load_checkpoint_file(tmp_path / "evil.pth")
    assert not hasattr(argparse.Namespace, "pwned")


class _Tracked(collections.OrderedDict):
    """An OrderedDict subclass: torch's allowlist has OrderedDict, not its subclasses."""


def test_ordered_dict_subclass_is_refused_naming_it(tmp_path: Path) -> None:
    torch.save({"state_dict": _Tracked(w=torch.ones(2))}, tmp_path / "od.pth")
    with pytest.raises(UserError, match=rf"holds a pickled '{__name__}._Tracked'") as err:
        load_checkpoint_file(tmp_path / "od.pth")
    assert "weights.pth" in str(err.value)  # the fix, in terms a user can run


def test_what_real_checkpoints_carry_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pytorch_lightning 1.x pickled its AttributeDict under this name; fake the module to write one
    fake = {name: types.ModuleType(name) for name in ("pytorch_lightning", "pytorch_lightning.utilities")}
    legacy_pl = fake["pytorch_lightning.utilities.parsing"] = types.ModuleType("pytorch_lightning.utilities.parsing")
    attr_dict = type("AttributeDict", (dict,), {"__module__": legacy_pl.__name__})
    legacy_pl.AttributeDict = attr_dict
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    ckpt = {
        "teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)},
        "args": argparse.Namespace(arch="xcit_small_12_p16", lr=5e-4, out_dim=65536),  # DINO's main_dino.py
        "hyper_parameters": attr_dict(lr=0.1, root=Path("/data/imagenet")),
    }
    torch.save(ckpt, tmp_path / "dino.pth")
    for name in fake:  # the reader need not have it installed
        monkeypatch.delitem(sys.modules, name)
    obj, _ = load_checkpoint_file(tmp_path / "dino.pth")
    assert obj["args"].arch == "xcit_small_12_p16"
    assert obj["hyper_parameters"] == {"lr": 0.1, "root": Path("/data/imagenet")}
    assert torch.equal(obj["teacher"]["backbone.cls_token"], torch.zeros(1, 1, 4))


def test_truncated_legacy_file_is_called_truncated(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(100)}, tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "w.pth").read_bytes()
    for cut in (5, 20, 50, 200, len(data) // 2, len(data) - 10):  # EOFError(''), IndexError, RuntimeError
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"cut\.pth is not a readable PyTorch checkpoint: it looks truncated"):
            load_checkpoint_file(tmp_path / "cut.pth")


def test_safetensors_cut_inside_its_header_is_called_truncated(tmp_path: Path) -> None:
    save_file({f"w{i}": torch.zeros(2) for i in range(20)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    for cut in (9, 8 + header_len // 2, 8 + header_len - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"cut\.safetensors is not a readable \.safetensors file: it looks trunc"):
            load_checkpoint_file(tmp_path / "cut.safetensors")


def test_compiled_networks_are_named_not_called_corrupt(tmp_path: Path) -> None:
    """TorchScript and torch.export archives are zip files like torch.save's; say what they are."""
    net = torch.nn.Linear(4, 2).eval()
    example = torch.randn(1, 4)
    torch.jit.save(torch.jit.trace(net, example), str(tmp_path / "net.ts"))
    torch.export.save(torch.export.export(net, (example,)), str(tmp_path / "net.pt2"))
    with pytest.raises(UserError, match=r"net\.ts is a TorchScript program .* not a checkpoint") as err:
        load_checkpoint_file(tmp_path / "net.ts")
    assert "corrupt" not in str(err.value) and "torch.jit.load" in str(err.value)
    with pytest.raises(UserError, match=r"net\.pt2 is a torch\.export program .* not a checkpoint") as err:
        load_checkpoint_file(tmp_path / "net.pt2")
    assert "corrupt" not in str(err.value)
