"""Shared set-up for the model tests."""

import torch


@torch.no_grad()
def randomise_stats(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics, layer scales and temperatures, so eval mode exercises every term."""
    g = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    for name, p in model.named_parameters():
        if "gamma" in name or "temperature" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
