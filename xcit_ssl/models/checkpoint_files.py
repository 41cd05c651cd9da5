"""Open checkpoint files safely: ``.pth``/``.pt``/``.ckpt`` (torch.save) and ``.safetensors``.

Nothing from a file is ever executed: ``torch.load`` runs with ``weights_only=True``. Files that
also pickle other objects (Lightning's hyper-parameters, DINO's ``argparse.Namespace``) are
read again by an unpickler that resolves only the globals of torch's ``weights_only`` allowlist
and turns every other class into an inert :class:`OpaqueObject`, since only tensors matter here. The file type is recognised by its first bytes, not its extension.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import UserError

logger = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch.save's legacy (pre-1.6) format is a bare pickle stream


class OpaqueObject:
    """Stands in for a pickled object of a class we refuse to import; keeps its raw state.

    Supports what the pickle machine may do to an object: construction with arguments, state,
    items (dict subclasses such as Lightning's ``AttributeDict``) and appends (list subclasses).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return "OpaqueObject(...)"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals torch's ``weights_only`` loader allows; any other class or
    function becomes :class:`OpaqueObject`, so nothing outside that list is imported or called."""

    allowed: dict[str, Any] = {}
    replaced: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        self.replaced.add(full)
        return OpaqueObject


def _restricted_pickle_module() -> Any:
    try:  # torch's own allowlist (private API, stable since torch 2.4)
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:
        return None
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"allowed": dict(_get_allowed_globals()), "replaced": set()})
    return SimpleNamespace(
        __name__="xcit_ssl_restricted_pickle", Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load()
    )


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


def _torch_load(path: Path, kind: str) -> Any:
    load_kw: dict[str, Any] = dict(map_location="cpu", mmap=kind == "zip")
    try:
        return torch.load(path, weights_only=True, **load_kw)
    except pickle.UnpicklingError as err:
        # the file pickles objects beyond tensors and containers (hyper-parameters, argparse
        # namespaces): read it again with those objects replaced by inert placeholders
        module = _restricted_pickle_module()
        if module is None:
            raise UserError(
                f"{path} pickles objects besides its weights and this torch cannot skip them safely; "
                "re-save it with torch.save(model.state_dict(), ...)"
            ) from err
        try:
            obj = torch.load(path, weights_only=False, pickle_module=module, **load_kw)
        except Exception as err2:  # noqa: BLE001 - any failure here means a damaged file
            raise _corrupt(path, "PyTorch checkpoint", err2) from err2
        logger.debug("%s: replaced pickled %s by placeholders", path, ", ".join(sorted(module.Unpickler.replaced)))
        return obj
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
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
