"""The XCiT backbone family, its registry, heads and checkpoint readers."""

from .build import build_backbone
from .checkpoints import LoadReport, load_backbone, load_backbone_weights, read_state_dict
from .record import ARCH_KEYS, BackboneRecord, read_record
from .registry import VARIANTS, create_backbone, list_backbones, variant_args
from .xcit import XCiT, XCiTFeatures

__all__ = [
    "ARCH_KEYS",
    "VARIANTS",
    "BackboneRecord",
    "LoadReport",
    "XCiT",
    "XCiTFeatures",
    "build_backbone",
    "create_backbone",
    "list_backbones",
    "load_backbone",
    "load_backbone_weights",
    "read_record",
    "read_state_dict",
    "variant_args",
]
