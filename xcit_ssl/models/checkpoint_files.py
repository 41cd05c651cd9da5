"""Open checkpoint files safely: ``.pth``/``.pt``/``.ckpt`` (torch.save) and ``.safetensors``.

Nothing from a file is ever executed: ``torch.load`` runs with ``weights_only=True``. Files that
also pickle other objects (Lightning's hyper-parameters, DINO's ``argparse.Namespace``) are
still read: those objects are replaced by inert :class:`OpaqueObject` placeholders, since only
the tensors matter here. The file type is recognised by its first bytes, not its extension.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.serialization as serialization

from ..errors import UserError

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch.save's legacy (pre-1.6) format is a bare pickle stream
_MAX_PLACEHOLDERS = 64


class OpaqueObject:
    """Stands in for a pickled object of a class we refuse to import; keeps its raw state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return "OpaqueObject(...)"


def _kind(path: Path) -> str:
    """'zip', 'legacy' or 'safetensors' from the file's first bytes; UserError otherwise."""
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: little-endian u64 header length, then the JSON header. Checked first: the
    # length's low byte may be 0x80, which would pass for a pickle's first byte
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_PICKLE_PROTO):
        return "legacy"
    raise UserError(
        f"{path} is not a checkpoint: it is neither a PyTorch file (torch.save) nor a .safetensors "
        "file; pass the .pth/.ckpt/.safetensors file that holds the weights"
    )


def _corrupt(path: Path, what: str, err: Exception) -> UserError:
    return UserError(
        f"{path} is not a readable {what}: it looks truncated or corrupt ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}); download or copy it again"
    )


def _unsafe_globals(path: Path, kind: str, error: Exception) -> list[str]:
    """Names of the classes/functions the file pickles beyond plain tensors and containers."""
    if kind == "zip":
        try:
            return list(serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - fall back to the name in the error message
            pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _torch_load(path: Path, kind: str) -> Any:
    load_kw: dict[str, Any] = dict(map_location="cpu", weights_only=True, mmap=kind == "zip")
    placeholders: list[str] = []
    for _ in range(_MAX_PLACEHOLDERS):
        try:
            with serialization.safe_globals([(OpaqueObject, name) for name in placeholders]):
                obj = torch.load(path, **load_kw)
            if placeholders:
                logger.debug("%s: replaced pickled %s by placeholders", path, ", ".join(placeholders))
            return obj
        except pickle.UnpicklingError as err:
            found = [n for n in _unsafe_globals(path, kind, err) if n not in placeholders]
            if not found:
                raise _corrupt(path, "PyTorch checkpoint", err) from err
            placeholders.extend(found)
        except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
            raise _corrupt(path, "PyTorch checkpoint", err) from err
    raise UserError(f"{path} pickles too many foreign objects to read safely; save its state_dict alone")


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
    return _torch_load(path, kind), {}


def spec_from_metadata(metadata: dict[str, str], path: str | Path) -> dict[str, Any] | None:
    """The ``xcit_ssl`` entry of an exported ``.safetensors`` file, decoded."""
    raw = metadata.get("xcit_ssl")
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: its 'xcit_ssl' metadata is not valid JSON ({err}); re-export the backbone") from err
    return spec if isinstance(spec, dict) else None
