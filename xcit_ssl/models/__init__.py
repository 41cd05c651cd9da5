"""The XCiT backbone family, its registry, heads and checkpoint readers."""

from .checkpoints import LoadReport, load_backbone, load_backbone_weights, read_backbone_spec, read_state_dict
from .registry import VARIANTS, build_backbone, create_backbone, list_backbones, variant_args
from .xcit import XCiT, XCiTFeatures

__all__ = [
    "VARIANTS",
    "LoadReport",
    "XCiT",
    "XCiTFeatures",
    "build_backbone",
    "create_backbone",
    "list_backbones",
    "load_backbone",
    "load_backbone_weights",
    "read_backbone_spec",
    "read_state_dict",
    "variant_args",
]
