"""Deployable exports: the eval-mode network ``images [B, 3, H, W] -> features [B, D]``.

- ``pt2`` (recommended, with ONNX): ``torch.export`` with a dynamic batch and image size (H and W
  any multiple of the patch size), saved with ``torch.export.save``; load it with
  ``torch.export.load(path).module()``, or compile it ahead of time (AOTInductor).
- ``onnx``: for ONNX Runtime, TensorRT and the like (needs ``pip install 'xcit-ssl[onnx]'``).
- ``torchscript`` (legacy): ``torch.jit.trace``; TorchScript is deprecated upstream in favour of
  ``torch.export``, kept for runtimes that still need it.

Each writer writes to ``tmp`` and returns a callable that runs the file as it was written (read
back from disk), which ``export_backbone`` compares with the eager model before anything is moved
into place. The metadata entry ``xcit_ssl`` (a JSON string) travels inside each file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError

Runner = Callable[[Tensor], Tensor]
# the largest image side the pt2 program accepts, in patches (8192 px at patch 16, 4096 at patch 8)
MAX_PATCHES = 512


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    # the input-size check in XCiT._embed becomes a constant in a trace (fine: H, W stay dynamic,
    # which the parity check at a second size proves); torch.jit's deprecation notice is not news
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def write_pt2(model: nn.Module, tmp: Path, example: Tensor, meta: dict[str, Any]) -> Runner:
    """``torch.export`` program; batch and H, W (as multiples of the patch size) are symbolic."""
    patch = int(meta["patch_size"])
    batch = torch.export.Dim("batch", min=1, max=65536)
    rows = torch.export.Dim("h_patches", min=1, max=MAX_PATCHES)
    cols = torch.export.Dim("w_patches", min=1, max=MAX_PATCHES)
    with torch.no_grad():
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 2: patch * rows, 3: patch * cols},))
        except Exception as err:  # noqa: BLE001 - torch.export fails in many ways; say which export failed
            raise UserError(
                f"torch.export could not capture {meta['name']} ({type(err).__name__}: {str(err)[:300]}); "
                "nothing was written. Export as --format onnx or safetensors instead"
            ) from err
    torch.export.save(program, str(tmp), extra_files={"xcit_ssl.json": json.dumps(meta)})
    loaded = torch.export.load(str(tmp)).module()

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded(images)

    return run


def write_torchscript(model: nn.Module, tmp: Path, example: Tensor, meta: dict[str, Any]) -> Runner:
    """Legacy TorchScript (``torch.jit.trace``; shapes stay symbolic)."""
    with _quiet_tracing(), torch.no_grad():
        # tracing (not scripting) keeps the model code plain Python
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"xcit_ssl.json": json.dumps(meta)})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    return loaded


def write_onnx(model: nn.Module, tmp: Path, example: Tensor, meta: dict[str, Any]) -> Runner:
    """ONNX (opset 17) with dynamic batch, height and width, run back through ONNX Runtime."""
    try:
        import onnx  # noqa: PLC0415
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as err:
        raise UserError(
            f"ONNX export needs onnx and onnxruntime ({err.name} is missing): pip install 'xcit-ssl[onnx]'"
        ) from err
    with _quiet_tracing(), torch.no_grad():
        # the TorchScript-based exporter: the torch.export one needs onnxscript, an extra dependency
        torch.onnx.export(
            model, (example,), str(tmp), input_names=["images"], output_names=["features"], opset_version=17,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "features": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "xcit_ssl", json.dumps(meta)
    onnx.save(proto, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])

    return run


WRITERS: dict[str, Callable[[nn.Module, Path, Tensor, dict[str, Any]], Runner]] = {
    "pt2": write_pt2,
    "onnx": write_onnx,
    "torchscript": write_torchscript,
}
