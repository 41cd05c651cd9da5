"""Weighted k-NN classification on frozen features (the DINO protocol, REFERENCE.md section 3).

Train and test features are L2-normalised, neighbours are found by cosine similarity (an exact
inner-product search), and each of the k nearest neighbours votes for its class with weight
``exp(sim / T)`` (T = 0.07). All k of a protocol come from one search of ``max(ks)`` neighbours,
since the first k of a sorted top-``k_max`` list are exactly the top-k.

Memory stays bounded at ImageNet scale (1.28M train x 50k test): queries are processed in chunks,
the torch backend also chunks the train set and merges running top-k lists, and voting is done per
query chunk, so nothing of size ``num_test x num_train`` or ``num_test x num_classes`` for the
whole test set at once is ever materialised.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import top5_applies, top5_note, topk_hits

log = logging.getLogger(__name__)

Backend = Literal["auto", "faiss", "torch"]
DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
# Chunk sizes bound the torch backend's peak memory to about query_chunk * train_chunk * 4 bytes
# for the similarity block (128 MiB with these values) plus the running top-k lists.
QUERY_CHUNK = 1024
TRAIN_CHUNK = 32768


def _faiss() -> Any | None:
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported only when searched with
    except ImportError:
        return None
    return faiss


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees a GPU."""
    faiss = _faiss()
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: Backend, device: torch.device | str | None = None) -> str:
    """Pick the search backend: ``"faiss-gpu"``, ``"faiss"`` (CPU) or ``"torch"``.

    ``auto`` prefers a faiss GPU index; with only faiss-cpu installed but a CUDA device given,
    torch matrix products on the GPU beat a CPU index by far, so torch is chosen then.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "torch":
        return "torch"
    faiss = _faiss()
    if backend == "faiss":
        if faiss is None:
            raise ImportError("backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return "faiss-gpu" if faiss_has_gpu() else "faiss"
    if faiss_has_gpu():
        return "faiss-gpu"
    if device.type == "cuda" or faiss is None:
        return "torch"
    return "faiss"


def _search_faiss(train: Tensor, test: Tensor, k: int, gpu: bool) -> tuple[Tensor, Tensor]:
    faiss = _faiss()
    assert faiss is not None
    index = faiss.IndexFlatIP(train.shape[1])  # exact inner product == cosine on unit vectors
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    # add and search in chunks: the numpy views share memory with the tensors (no extra copy
    # beyond the index's own), and the per-call result stays small
    for start in range(0, train.shape[0], 262144):
        index.add(train[start : start + 262144].numpy())
    sims, idx = [], []
    for start in range(0, test.shape[0], 16384):
        s, i = index.search(test[start : start + 16384].numpy(), k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(idx)


def _search_torch(
    train: Tensor, test: Tensor, k: int, device: torch.device, query_chunk: int, train_chunk: int
) -> tuple[Tensor, Tensor]:
    sims_out = torch.empty(test.shape[0], k, dtype=torch.float32)
    idx_out = torch.empty(test.shape[0], k, dtype=torch.int64)
    # on a GPU keep the whole train set resident when it fits; blocks are views either way
    train_dev = train.to(device, non_blocking=True)
    for q0 in range(0, test.shape[0], query_chunk):
        q = test[q0 : q0 + query_chunk].to(device)
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=device)
        for t0 in range(0, train_dev.shape[0], train_chunk):
            block = q @ train_dev[t0 : t0 + train_chunk].T  # [q, t]
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            # merge the block's top-k with the running top-k: still exact, memory O(q * k)
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, i + t0], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims_out[q0 : q0 + q.shape[0]] = best_s.cpu()
        idx_out[q0 : q0 + q.shape[0]] = best_i.cpu()
    return sims_out, idx_out


def find_neighbours(
    train_features: Tensor,
    test_features: Tensor,
    k: int,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
    query_chunk: int = QUERY_CHUNK,
    train_chunk: int = TRAIN_CHUNK,
) -> tuple[Tensor, Tensor, str]:
    """Exact top-k cosine neighbours of every test feature among the train features.

    Args: ``train_features [N, D]``, ``test_features [M, D]`` (normalised here), ``k <= N``.
    Returns ``sims [M, k]`` (descending) and ``indices [M, k]`` into the train set, and the
    backend actually used.
    """
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must be in [1, {train_features.shape[0]}], got {k}")
    name = resolve_backend(backend, device)
    train = F.normalize(train_features.float().cpu(), dim=1).contiguous()
    test = F.normalize(test_features.float().cpu(), dim=1).contiguous()
    if name.startswith("faiss"):
        sims, idx = _search_faiss(train, test, k, gpu=name == "faiss-gpu")
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        sims, idx = _search_torch(train, test, k, dev, query_chunk, train_chunk)
    return sims, idx, name


def vote(neighbour_sims: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores of the weighted vote: ``score[m, c] = sum_j [label_j == c] exp(sim_j / T)``.

    ``neighbour_sims, neighbour_labels: [M, k]`` -> ``[M, num_classes]``.
    """
    weights = (neighbour_sims.float() / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, dtype=torch.float32)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


@dataclass
class KNNResult:
    """Accuracies in percent, keyed by the requested k.

    ``k_used[k]`` differs from ``k`` only when the train set has fewer than ``k`` samples.
    ``top5[k]`` is None with 5 classes or fewer (:func:`~.metrics.top5_applies`), and ``notes``
    then says why.
    """

    top1: dict[int, float]
    top5: dict[int, float | None]
    k_used: dict[int, int]
    num_train: int
    num_test: int
    num_classes: int
    temperature: float
    backend: str
    search_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """What a reader of the numbers must know (top-5 left out with few classes)."""
        return [] if top5_applies(self.num_classes) else [top5_note(self.num_classes)]

    def as_dict(self) -> dict[str, Any]:
        notes = {"notes": self.notes} if self.notes else {}
        return {
            "results": {str(k): {"top1": self.top1[k], "top5": self.top5[k], "k_used": self.k_used[k]}
                        for k in self.top1},
            "num_train": self.num_train, "num_test": self.num_test, "num_classes": self.num_classes,
            "temperature": self.temperature, "backend": self.backend,
            "search_seconds": round(self.search_seconds, 3), **notes, **self.extra,
        }  # fmt: skip


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """Full class-score matrices ``{k: [M, C]}``: for inspection and tests on small sets."""
    k_max = min(max(ks), train_features.shape[0])
    sims, idx, _ = find_neighbours(train_features, test_features, k_max, backend, device)
    num_classes = num_classes or int(train_labels.max()) + 1
    labels = train_labels.long().cpu()[idx]
    return {k: vote(sims[:, : min(k, k_max)], labels[:, : min(k, k_max)], num_classes, temperature) for k in ks}


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: Backend = "auto",
    device: torch.device | str | None = None,
    vote_chunk: int = 8192,
    query_chunk: int = QUERY_CHUNK,
    train_chunk: int = TRAIN_CHUNK,
) -> KNNResult:
    """Weighted k-NN top-1/top-5 (percent) for every k in ``ks`` from a single search.

    ``train_features [N, D]``, ``train_labels [N]``, ``test_features [M, D]``, ``test_labels [M]``.
    Any ``M >= 1`` works; a k larger than N is clamped to N (with a warning) and reported in
    ``k_used``.
    """
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test feature")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dims differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    n_train = train_features.shape[0]
    k_used = {k: min(k, n_train) for k in ks}
    if any(k > n_train for k in ks):
        log.warning("k-NN: only %d train samples; k clamped to %d for k in %s", n_train, n_train,
                    [k for k in ks if k > n_train])  # fmt: skip
    k_max = max(k_used.values())
    start = time.perf_counter()
    sims, idx, used_backend = find_neighbours(
        train_features, test_features, k_max, backend, device, query_chunk, train_chunk
    )
    elapsed = time.perf_counter() - start
    train_labels = train_labels.long().cpu()
    test_labels = test_labels.long().cpu()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    hits1 = {k: 0 for k in ks}
    hits5 = {k: 0 for k in ks}
    for c0 in range(0, sims.shape[0], vote_chunk):
        s, labels = sims[c0 : c0 + vote_chunk], train_labels[idx[c0 : c0 + vote_chunk]]
        truth = test_labels[c0 : c0 + vote_chunk]
        for k in ks:
            scores = vote(s[:, : k_used[k]], labels[:, : k_used[k]], num_classes, temperature)
            hits1[k] += int(topk_hits(scores, truth, 1, positive_only=True).sum())
            hits5[k] += int(topk_hits(scores, truth, 5, positive_only=True).sum())
    m = test_features.shape[0]
    top5 = {k: 100.0 * hits5[k] / m if top5_applies(num_classes) else None for k in ks}
    return KNNResult(
        top1={k: 100.0 * hits1[k] / m for k in ks}, top5=top5,
        k_used=k_used, num_train=n_train, num_test=m, num_classes=num_classes,
        temperature=temperature, backend=used_backend, search_seconds=elapsed,
    )  # fmt: skip
