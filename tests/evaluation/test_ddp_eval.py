"""Two gloo processes (launched like torchrun): sharded feature extraction reassembles exactly (equal
to one process), and OnlineKNN logs the same value on every rank, without deadlock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch, lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset
    sys.path.insert(0, {tests!r})
    from test_online import Patterns, TinyModule
    from xcit_ssl.evaluation.features import CLSFeatures, extract_features
    from xcit_ssl.evaluation.online import OnlineKNN
    from xcit_ssl.evaluation.protocol import build_feature_transform

    out, devices = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    module = TinyModule()
    module.frozen.requires_grad_(False)  # DDP: every trainable parameter must get a gradient
    tf = build_feature_transform(32, 32, (0.5,) * 3, (0.25,) * 3)
    feats = extract_features(CLSFeatures(module.backbone), Patterns(13, 2), tf, batch_size=4, num_workers=0,
                             accelerator="cpu", devices=devices, progress=False)
    callback = OnlineKNN.from_datasets(Patterns(22, 0), Patterns(9, 1), every_n_epochs=1, k=5, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=2))
    # the callback ran after the (identical, DDP-synchronised) training step on every rank
    params = {{k: v.detach() for k, v in module.backbone.named_parameters()}}
    torch.save({{"features": feats, "knn": callback.last, "weights": params}},
               f"{{out}}.rank{{trainer.global_rank}}.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_extraction_and_online_knn(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
               "TORCHELASTIC_RUN_ID": "test", "XCIT_SSL_SHARD_DIR": str(tmp_path / "shards"),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "ddp"), "2"], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]

    r0, r1 = (torch.load(tmp_path / f"ddp.rank{r}.pt", weights_only=False) for r in range(2))
    one = torch.load(tmp_path / "one.rank0.pt", weights_only=False)
    # extraction: rank 0 holds all 13 features in dataset order, equal to one process; rank 1 None
    assert r1["features"] is None
    torch.testing.assert_close(r0["features"].features, one["features"].features, rtol=1e-4, atol=1e-5)
    assert torch.equal(r0["features"].labels, one["features"].labels)
    # online k-NN: both ranks logged the same value (each rank embedded its share of the subset;
    # BatchNorm running statistics are per rank under plain DDP, parameters are identical)
    assert r0["knn"] == r1["knn"] and set(r0["knn"]) == {"knn/top1"}  # 4 classes: no top-5
    for k, v in r0["weights"].items():
        assert torch.equal(v, r1["weights"][k]), k
    assert not list((tmp_path / "shards").glob("*/*.pt"))  # shards cleaned up
