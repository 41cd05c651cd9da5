"""Every parameter's gradient has exactly its parameter's strides (the gradient layout contract).

DDP compares ``param.grad.stride()`` with its bucket view (the parameter's strides) exactly and
warns "Grad strides do not match bucket view strides" otherwise; autograd itself ignores the
strides of size-1 axes, so a ``[C, 1, 3, 3]`` depthwise weight fed a channels-last input used to
get channels-last grad strides unnoticed. The reference is the parameter's own layout.
"""

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xcit_ssl.models.heads import DINOHead
from xcit_ssl.models.xcit import XCiT

STRIDE_WARNING = "Grad strides do not match bucket view strides"


def _tiny(patch_size: int = 16, **kwargs) -> XCiT:
    return XCiT(patch_size=patch_size, embed_dim=32, depth=2, num_heads=4, num_classes=5, **kwargs)


def _mismatched(module: torch.nn.Module) -> list[str]:
    bad = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name} got no gradient"
        if p.grad.stride() != p.stride() or not p.grad.is_contiguous():
            bad.append(f"{name}: param {tuple(p.shape)} strides {p.stride()}, grad strides {p.grad.stride()}")
    return bad


@pytest.mark.parametrize(
    "patch_size, kwargs",
    [(16, {}), (8, {"tokens_norm": True}), (16, {"grad_checkpointing": True})],
    ids=["p16", "p8-tokens-norm", "grad-checkpointing"],
)
def test_every_gradient_has_its_parameters_strides(patch_size: int, kwargs: dict) -> None:
    checkpointing = kwargs.pop("grad_checkpointing", False)
    model = _tiny(patch_size, **kwargs).train()
    model.set_grad_checkpointing(checkpointing)
    head = DINOHead(32, out_dim=64, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    feats = model.forward_features(torch.randn(2, 3, 32, 48))[:, 0]
    (model.head(feats).logsumexp(-1).sum() + head(feats).pow(2).sum()).backward()
    assert _mismatched(model) == [] and _mismatched(head) == []


def test_depthwise_weights_were_the_ones_at_risk() -> None:
    """The plain conv on the same channels-last view gives the mismatched strides (the case the fix covers)."""
    model = _tiny()
    conv = model.blocks[0].local_mp.conv1
    x = torch.randn(2, 16, 32).transpose(1, 2).reshape(2, 32, 4, 4)  # LPI's view of the tokens
    w = torch.nn.Parameter(conv.weight.detach().clone())
    torch.nn.functional.conv2d(x, w, conv.bias, padding=1, groups=32).sum().backward()
    conv(x).sum().backward()
    # the set-up reproduces the hazard (should a torch release stop producing it, the workaround
    # in DepthwiseConv2d may go)
    assert w.grad.stride() != w.stride()
    assert conv.weight.grad.stride() == conv.weight.stride()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=0, atol=0)  # same numbers


def _ddp_rank(rank: int, world: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.pop("LOCAL_RANK", None)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_tiny().train())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                model.zero_grad()
                x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank * 10 + step))
                model(x).logsumexp(-1).sum().backward()
        Path(out_dir, f"rank{rank}.txt").write_text("\n".join(str(w.message) for w in caught))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_ddp_ranks_warn_of_no_grad_strides(tmp_path: Path) -> None:
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert STRIDE_WARNING not in text, text
