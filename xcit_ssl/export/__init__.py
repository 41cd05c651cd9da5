"""Exports: a frozen, headless backbone that loads in timm, the official code and deployment runtimes.

- :mod:`.backbone`: :func:`export_backbone`, the export and its read-back check;
- :mod:`.formats`: the deployable writers (``pt2``, ``onnx``, ``torchscript``);
- :mod:`.provenance`: the record an export carries (variant, training statistics, k-NN and linear results);
- :mod:`.hub`: :func:`export_hub`, a folder in timm's Hugging Face Hub layout, with its model card (:mod:`.card`).
"""

from __future__ import annotations

from .backbone import FORMATS, TOLERANCE, ExportReport, check_shapes, export_backbone, max_difference, resolve_format
from .hub import HUB_FILES, HubReport, export_hub
from .provenance import describe_knn, describe_linear, find_knn_results, find_linear_results

__all__ = [
    "FORMATS", "HUB_FILES", "TOLERANCE", "ExportReport", "HubReport", "check_shapes", "describe_knn",
    "describe_linear", "export_backbone", "export_hub", "find_knn_results", "find_linear_results",
    "max_difference", "resolve_format",
]  # fmt: skip
