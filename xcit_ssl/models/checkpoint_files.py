"""Open checkpoint files safely: ``.pth``/``.pt``/``.ckpt`` (torch.save) and ``.safetensors``.

Nothing from a file is ever executed, and the loader is never weaker than
``torch.load(weights_only=True)``: torch's own allowlist (tensors, containers, numbers) plus the
few inert types real checkpoints carry beside their weights, named in :data:`EXTRA_SAFE_GLOBALS`
(DINO's and timm's ``argparse.Namespace``, Lightning's ``AttributeDict``, paths in
hyper-parameters). A file that pickles anything else is refused with the type it names. The file
type is recognised by its first bytes, not its extension.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from ..errors import UserError

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch.save's legacy (pre-1.6) format is a bare pickle stream
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header

# (what the unpickler builds, the pickled global it stands for). A dict subclass cannot be filled
# by torch's unpickler (SETITEM is for plain dicts only), so AttributeDict reads as a plain dict;
# paths read as pure paths, which cannot touch the file system (and a WindowsPath reads on Linux).
EXTRA_SAFE_GLOBALS: list[tuple[Any, str]] = [
    (argparse.Namespace, "argparse.Namespace"),
    *[
        (dict, f"{module}.AttributeDict")
        for module in (
            "lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
            "lightning.pytorch.utilities.parsing", "pytorch_lightning.utilities.parsing",
        )
    ],
    *[
        (pure, f"{module}.{name}")
        for module in ("pathlib", "pathlib._local")
        for name, pure in (("PosixPath", PurePosixPath), ("PurePosixPath", PurePosixPath),
                           ("WindowsPath", PureWindowsPath), ("PureWindowsPath", PureWindowsPath))
    ],
]  # fmt: skip

# how torch's weights-only unpickler names what it refused (torch 2.4 - 2.x wording)
_REFUSED_PATTERNS = [
    re.compile(r"GLOBAL (\S+?)(?: was not| whose module|[\s.]*$)", re.MULTILINE),
    re.compile(r"but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|\n|$)"),
]


def _kind(path: Path) -> str:
    """'zip', 'legacy' or 'safetensors' from the file's first bytes; UserError otherwise."""
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: little-endian u64 header length, then the JSON header. Checked first: the
    # length's low byte may be 0x80, which would pass for a pickle's first byte
    header_len = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:9] == b"{" and header_len <= _SAFETENSORS_MAX_HEADER:
        if 8 + header_len > path.stat().st_size:
            raise UserError(
                f"{path} is not a readable .safetensors file: it looks truncated or corrupt (its header "
                f"claims {header_len} bytes, the file holds {path.stat().st_size}); download or copy it again"
            )
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        _refuse_programs(path)
        return "zip"
    if head.startswith(_PICKLE_PROTO):
        return "legacy"
    if path.suffix.lower() == ".onnx":
        raise UserError(
            f"{path} is an ONNX model (a compiled network for ONNX Runtime), not a checkpoint: pass the "
            ".ckpt/.safetensors/.pth file it was exported from"
        )
    raise UserError(
        f"{path} is not a checkpoint: it is neither a PyTorch file (torch.save) nor a .safetensors "
        "file; pass the .pth/.ckpt/.safetensors file that holds the weights"
    )


def _refuse_programs(path: Path) -> None:
    """TorchScript and torch.export archives are zip files like torch.save's: name them, not "corrupt"."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n.split("/", 1)[-1] for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return  # damaged: torch.load says how
    source = "the .ckpt/.safetensors/.pth file it was exported from"
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        raise UserError(
            f"{path} is a TorchScript program (torch.jit.save, or xcit-ssl export --out *.ts), not a checkpoint: "
            f"it holds a compiled network, not weights to load. Pass {source}; to run it: torch.jit.load('{path}')"
        )
    if "archive_format" in names or any(n.startswith("models/") and n.endswith(".json") for n in names):
        raise UserError(
            f"{path} is a torch.export program (*.pt2, e.g. from xcit-ssl export --out *.pt2), not a checkpoint: "
            f"it holds a compiled network, not weights to load. Pass {source}; to run it: "
            f"torch.export.load('{path}').module()"
        )


def _corrupt(path: Path, what: str, err: Exception) -> UserError:
    detail = next((line for line in str(err).splitlines() if line.strip()), "")[:200]
    reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return UserError(
        f"{path} is not a readable {what}: it looks truncated or corrupt ({reason}); download or copy it again"
    )


def refused_type(message: str) -> str | None:
    """The global or type torch's weights-only unpickler names in its error ``message``, if any."""
    for pattern in _REFUSED_PATTERNS:
        if m := pattern.search(message):
            return m[1].strip()
    return None


def _torch_load(path: Path, kind: str) -> Any:
    load_kw: dict[str, Any] = dict(map_location="cpu", mmap=kind == "zip")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allow is None:
            return torch.load(path, weights_only=True, **load_kw)
        with allow(EXTRA_SAFE_GLOBALS):
            return torch.load(path, weights_only=True, **load_kw)
    except pickle.UnpicklingError as err:
        name = refused_type(str(err))
        if name is None:  # garbage opcodes and the like: a damaged file, not a refused type
            raise _corrupt(path, "PyTorch checkpoint", err) from err
        raise UserError(
            f"{path} holds a pickled '{name}' besides its weights, which the safe loader refuses (loading it "
            "could run code). If you trust the file, re-save its weights alone, e.g. python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save(c['state_dict'], 'weights.pth')\" (with "
            "the key that holds the weights), and pass weights.pth"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated files fail in many ways (EOFError, IndexError, ...)
        raise _corrupt(path, "PyTorch checkpoint", err) from err


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # imported lazily: only needed for this format

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # SafetensorError derives from Exception only
        raise _corrupt(path, ".safetensors file", err) from err
    return tensors, metadata


def load_checkpoint_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The object stored in ``path`` and the safetensors metadata (empty for torch files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a checkpoint file; pass the .ckpt/.pth/.safetensors inside it")
    kind = _kind(path)
    if kind == "safetensors":
        return _safetensors_load(path)
    return _torch_load(path, kind), _sidecar_metadata(path)


def _sidecar_metadata(path: Path) -> dict[str, str]:
    """The JSON sidecar ``<file>.json`` that ``xcit-ssl export`` writes beside ``.pth`` exports, in
    the shape of safetensors metadata (``{"xcit_ssl": <json>}``); empty when there is none or it is
    not ours (no variant ``name``), so a stray JSON file never blocks loading the weights."""
    sidecar = path.with_name(path.name + ".json")
    try:
        raw = sidecar.read_text()
        entry = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {"xcit_ssl": raw} if isinstance(entry, dict) and isinstance(entry.get("name"), str) else {}

