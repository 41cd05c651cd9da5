"""Exports: a frozen, headless backbone that loads in timm, the official code and deployment runtimes.

- :mod:`.backbone`: :func:`export_backbone`, the export and its read-back check;
- :mod:`.formats`: the deployable writers (``pt2``, ``onnx``, ``torchscript``);
- :mod:`.provenance`: the record an export carries (variant, training statistics, k-NN results).
"""

from __future__ import annotations

from .backbone import FORMATS, TOLERANCE, ExportReport, check_shapes, export_backbone, max_difference, resolve_format
from .provenance import describe_knn, find_knn_results

__all__ = [
    "FORMATS", "TOLERANCE", "ExportReport", "check_shapes", "describe_knn", "export_backbone", "find_knn_results",
    "max_difference", "resolve_format",
]  # fmt: skip
