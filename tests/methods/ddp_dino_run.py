"""Train the tiny DINO for a few steps on 1 process or 2 gloo processes and save teacher + center.

Run by tests/methods/test_dino_ddp.py: ``python ddp_dino_run.py DEVICES PER_DEVICE_BATCH OUT``.
Lightning's DDP launcher re-executes this script for rank 1, as it would under torchrun.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dino_helpers import loader, tiny_dino  # noqa: E402


class FrozenBatchNorm(L.Callback):
    """BatchNorm in eval mode: per-sample computation, so 2 x B/2 equals 1 x B exactly.

    torch's SyncBatchNorm (what recipes enable on GPUs) refuses CPU modules, so on gloo the
    BatchNorm statistics are taken out of the comparison; everything else (gradient averaging,
    per-parameter clipping, the all-reduced center, the EMA teacher) is compared as is.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for m in pl_module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def main() -> None:
    devices, batch, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = tiny_dino()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=[FrozenBatchNorm()],
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out.parent),
    )  # fmt: skip
    trainer.fit(model, loader(batch_size=batch, n=16))
    state = {
        "teacher": {k: v.clone() for k, v in model.teacher_backbone.state_dict().items()},
        "teacher_head": {k: v.clone() for k, v in model.teacher_head.state_dict().items()},
        "center": model.loss_fn.center.clone(),
    }
    torch.save(state, out.with_suffix(f".rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
