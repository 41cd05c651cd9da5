
import pytest
import torch

# One intra-op thread: tests are small, and 2-core CI machines also run DataLoader workers and
# 2-process DDP tests, where OpenMP threads competing for cores cost up to 8x.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
