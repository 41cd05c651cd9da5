"""Online k-NN monitoring during ``fit``: a Lightning callback.

Every ``every_n_epochs`` training epochs it embeds a fixed, stratified labelled subset (``n_train``
memory images, ``n_val`` queries) with ``pl_module.embed(images [B, 3, H, W]) -> [B, D]`` in eval
mode under ``torch.no_grad``, runs the weighted k-NN and logs ``knn/top1`` and ``knn/top5`` (top-5
only with more than 5 classes).

Under DDP each rank embeds an equal share of the subset and the shares are all-gathered, so every
rank ends with identical features and logs the same value; every rank makes the same collective
calls in the same order, so nothing can deadlock. ``embed`` must not run collectives itself (the
raw module is called, not the DDP wrapper, and BatchNorm in eval mode does not synchronise).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..data.workers import worker_init
from .features import FeatureSet, TransformedDataset, embed_loader
from .knn import knn_evaluate
from .protocol import build_feature_transform

log = logging.getLogger(__name__)


class OnlineKNN(pl.Callback):
    """Log weighted k-NN accuracy of ``pl_module.embed`` on a held-out labelled subset.

    Args:
        dataset: ``"fashion_mnist"`` (default, uses ``root`` or the installed copy) or
            ``"imagefolder"`` (see ``xcit_ssl.data.datasets.open_dataset``).
        root: dataset root; None means the default location for Fashion-MNIST.
        train_split: split the memory bank is drawn from.
        val_split: split the queries are drawn from.
        n_train: memory-bank size (stratified subset; 0 = the whole split).
        n_val: number of queries (stratified subset; 0 = the whole split).
        every_n_epochs: evaluate after every this many training epochs.
        k: neighbours (DINO headline: 20); T: vote temperature (DINO: 0.07).
        pad_to: Fashion-MNIST only: zero-pad the 28 px images to this size (the demo trains at 32).
        resize_size, crop_size, mean, std: the eval transform (should match the training
            resolution and normalisation).
        batch_size, num_workers: for embedding the subset.
        seed: fixes the subset, so the curve is comparable across epochs and runs.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        n_train: int = 10000,
        n_val: int = 2000,
        every_n_epochs: int = 1,
        k: int = 20,
        T: float = 0.07,
        pad_to: int | None = 32,
        resize_size: int = 32,
        crop_size: int = 32,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.dataset, self.root = dataset, root
        self.train_split, self.val_split = train_split, val_split
        self.n_train, self.n_val, self.seed = n_train, n_val, seed
        self.every_n_epochs, self.k, self.T = every_n_epochs, k, T
        self.pad_to = pad_to if dataset == "fashion_mnist" else None
        self.transform = build_feature_transform(resize_size, crop_size, tuple(mean), tuple(std), "bicubic")
        self.batch_size, self.num_workers = batch_size, num_workers
        self._sets: dict[str, Dataset] | None = None
        self.last: dict[str, float] = {}

    @classmethod
    def from_datasets(cls, train: Dataset, val: Dataset, **kwargs: Any) -> OnlineKNN:
        """Use given ``(PIL image, label)`` datasets as memory bank and queries (no subsetting)."""
        callback = cls(**kwargs)
        callback._sets = {"train": train, "val": val}
        return callback

    def _datasets(self) -> dict[str, Dataset]:
        if self._sets is None:
            from ..data.datasets import open_dataset, subset  # noqa: PLC0415 - lazy: data opened on first use

            sets: dict[str, Dataset] = {}
            classes = None
            for name, split, n in (("train", self.train_split, self.n_train), ("val", self.val_split, self.n_val)):
                extra = {"classes": classes} if self.dataset == "imagefolder" else {"pad_to": self.pad_to}
                ds = open_dataset(self.dataset, self.root, split, **extra)  # type: ignore[arg-type]
                classes = getattr(ds, "classes", None)  # val labels indexed by the train classes
                sets[name] = subset(ds, n, self.seed) if n and n < len(ds) else ds  # type: ignore[arg-type]
            self._sets = sets
        return self._sets

    def _embed_split(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ds: Dataset) -> FeatureSet:
        world, rank = trainer.world_size, trainer.global_rank
        n = len(ds)  # type: ignore[arg-type]
        per_rank = math.ceil(n / world)
        # equal-size shares (the last rank repeats index n-1 as padding) so all_gather lines up
        indices = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        loader = DataLoader(
            TransformedDataset(Subset(ds, indices), self.transform), batch_size=self.batch_size,
            shuffle=False, num_workers=self.num_workers,
            worker_init_fn=worker_init if self.num_workers > 0 else None,  # signals: the training process's
        )  # fmt: skip
        with trainer.precision_plugin.forward_context():
            local = embed_loader(pl_module.embed, loader, pl_module.device)
        if world == 1:
            return local
        feats = trainer.strategy.all_gather(local.features.to(pl_module.device))  # [world, per_rank, D]
        labels = trainer.strategy.all_gather(local.labels.to(pl_module.device))
        return FeatureSet(feats.reshape(-1, feats.shape[-1])[:n].cpu(), labels.reshape(-1)[:n].cpu())

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Embed both subsets and return ``{"knn/top1": .., "knn/top5": ..}`` (percent; top-5 only with
        more than 5 classes)."""
        sets = self._datasets()
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                train = self._embed_split(trainer, pl_module, sets["train"])
                val = self._embed_split(trainer, pl_module, sets["val"])
        finally:
            for m, mode in modes.items():  # restore exactly (some submodules may be eval on purpose)
                m.train(mode)
        result = knn_evaluate(train.features, train.labels, val.features, val.labels, ks=(self.k,),
                              temperature=self.T, backend="torch", device=pl_module.device)  # fmt: skip
        top5 = result.top5[self.k]  # None with 5 classes or fewer: no column that always reads ~100 %
        return {"knn/top1": result.top1[self.k], **({} if top5 is None else {"knn/top5": top5})}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking:
            return
        if not hasattr(pl_module, "embed"):
            raise TypeError(f"{type(pl_module).__name__} has no embed(images) method for OnlineKNN")
        sets = self._datasets()  # said before the work: on a CPU it takes as long as many steps
        log.info("epoch %d: online k-NN: extracting features of %s train / %s val images", trainer.current_epoch,
                 f"{len(sets['train']):,}", f"{len(sets['val']):,}")  # type: ignore[arg-type]  # fmt: skip
        self.last = self.evaluate(trainer, pl_module)
        # identical on every rank already: no sync needed
        pl_module.log_dict(self.last, on_step=False, on_epoch=True, sync_dist=False)
        log.info("epoch %d: %s", trainer.current_epoch, " ".join(f"{k} {v:.2f}" for k, v in self.last.items()))

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))
