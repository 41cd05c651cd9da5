"""Our XCiT against timm's ``Xcit`` with the same weights, in both directions."""

import pytest
import timm
from model_helpers import randomise_stats
import torch

from xcit_ssl.models import VARIANTS, create_backbone, list_backbones

FAST = ["xcit_nano_12_p16_224", "xcit_nano_12_p8_224", "xcit_tiny_12_p16_384"]
# one name per family and patch size: the 224 and 384 variants share an architecture
EVERY_FAMILY = [n for n in list_backbones() if n.endswith("_224")]


def _check(name: str, sizes: list[tuple[int, int]]) -> None:
    ours = create_backbone(name).eval()
    randomise_stats(ours)
    theirs = timm.create_model(name, pretrained=False).eval()
    # ours -> timm, strictly
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # timm -> ours, strictly, after perturbing timm's copy
    ref = timm.create_model(name, pretrained=False).eval()
    ref.load_state_dict(theirs.state_dict())
    ours2 = create_backbone(name).eval()
    ours2.load_state_dict(ref.state_dict(), strict=True)
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = theirs(x)
            assert (ours(x) - expected).abs().max().item() <= 1e-5
            assert (ours2(x) - expected).abs().max().item() <= 1e-5
            feats = ours.forward_features(x)
            assert (feats - theirs.forward_features(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAST)
def test_matches_timm(name: str) -> None:
    size = VARIANTS[name]["img_size"]
    _check(name, [(size, size), (96, 160)])


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_matches_timm_every_family(name: str) -> None:
    _check(name, [(224, 224), (128, 192)])


def test_state_dict_keys_are_timms() -> None:
    for name in ["xcit_nano_12_p16_224", "xcit_small_24_p8_384"]:
        ours = set(create_backbone(name, num_classes=0).state_dict())
        theirs = set(timm.create_model(name, pretrained=False, num_classes=0).state_dict())
        assert ours == theirs
