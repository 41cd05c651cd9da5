"""Weighted k-NN against a brute-force reference written from the DINO formulas."""

from __future__ import annotations

import math

import pytest
import torch

from xcit_ssl.evaluation.knn import find_neighbours, knn_evaluate, knn_scores

BACKENDS = ["faiss", "torch"]


def reference_scores(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, k: int, t: float,
                     num_classes: int) -> torch.Tensor:  # fmt: skip
    """score[m, c] = sum over the k most cosine-similar train samples j with y_j = c of exp(sim/T).

    Double precision, Python loops, full similarity matrix: independent of the implementation.
    """
    a = train.double() / train.double().norm(dim=1, keepdim=True)
    b = test.double() / test.double().norm(dim=1, keepdim=True)
    sims = b @ a.T
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for m in range(test.shape[0]):
        order = sorted(range(train.shape[0]), key=lambda j: -float(sims[m, j]))[:k]
        for j in order:
            scores[m, int(train_y[j])] += math.exp(float(sims[m, j]) / t)
    return scores


def reference_accuracy(scores: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    top1 = (scores.argmax(1) == y).double().mean().item() * 100
    hits5 = []
    for m in range(scores.shape[0]):
        # true class counts when it got votes and fewer than 5 classes scored strictly higher
        s = scores[m]
        hits5.append(bool(s[y[m]] > 0 and int((s > s[y[m]]).sum()) < 5))
    return top1, 100.0 * sum(hits5) / len(hits5)


def random_problem(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    y_train = torch.randint(0, classes, (n_train,), generator=g)
    y_test = torch.randint(0, classes, (n_test,), generator=g)
    # overlapping clusters so that predictions are neither trivial nor random
    x_train = centers[y_train] + 1.5 * torch.randn(n_train, dim, generator=g)
    x_test = centers[y_test] + 1.5 * torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force_reference(backend: str) -> None:
    x_train, y_train, x_test, y_test = random_problem(300, 60, 16, 8)
    ks = (1, 10, 20, 100)
    scores = knn_scores(x_train, y_train, x_test, ks=ks, temperature=0.07, num_classes=8, backend=backend)
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=ks, temperature=0.07, backend=backend)
    for k in ks:
        ref = reference_scores(x_train, y_train, x_test, k, 0.07, 8)
        torch.testing.assert_close(scores[k].double(), ref, rtol=1e-4, atol=1e-6)
        assert torch.equal(scores[k].argmax(1), ref.argmax(1))
        top1, top5 = reference_accuracy(ref, y_test)
        assert result.top1[k] == pytest.approx(top1)
        assert result.top5[k] == pytest.approx(top5)
    assert 20 < result.top1[20] < 100  # the problem is neither trivial nor hopeless


def test_backends_agree_on_neighbours() -> None:
    x_train, _, x_test, _ = random_problem(500, 40, 32, 5, seed=1)
    s_f, i_f, _ = find_neighbours(x_train, x_test, 50, backend="faiss")
    s_t, i_t, _ = find_neighbours(x_train, x_test, 50, backend="torch")
    assert torch.equal(i_f, i_t)
    torch.testing.assert_close(s_f, s_t, rtol=1e-5, atol=1e-5)
    assert bool((s_t[:, :-1] >= s_t[:, 1:]).all())  # sorted descending


def test_chunking_is_exact() -> None:
    """Tiny query and train chunks (running top-k merges across blocks) change nothing."""
    x_train, y_train, x_test, y_test = random_problem(700, 90, 24, 6, seed=2)
    full = knn_evaluate(x_train, y_train, x_test, y_test, backend="torch")
    chunked = knn_evaluate(
        x_train, y_train, x_test, y_test, backend="torch", query_chunk=7, train_chunk=64, vote_chunk=11
    )
    assert full.top1 == chunked.top1 and full.top5 == chunked.top5
    s_a, i_a, _ = find_neighbours(x_train, x_test, 200, backend="torch")
    s_b, i_b, _ = find_neighbours(x_train, x_test, 200, backend="torch", query_chunk=13, train_chunk=50)
    assert torch.equal(i_a, i_b) and torch.equal(s_a, s_b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separated_clusters_are_perfect(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    centers = torch.eye(10, 64) * 10
    y_train = torch.arange(10).repeat_interleave(30)
    y_test = torch.arange(10).repeat_interleave(5)
    x_train = centers[y_train] + 0.1 * torch.randn(300, 64, generator=g)
    x_test = centers[y_test] + 0.1 * torch.randn(50, 64, generator=g)
    # k=200 > 30 per class: far neighbours vote too but weigh exp(-(1-0)/0.07) less than near ones
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=(10, 20, 100, 200), backend=backend)
    for k in (10, 20, 100, 200):
        assert result.top1[k] == 100.0 and result.top5[k] == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_test_set_and_k_larger_than_train(backend: str) -> None:
    """7 test images (DINO's chunking needed >= 100) and k=200 with only 40 train samples."""
    x_train, y_train, x_test, y_test = random_problem(40, 7, 8, 3, seed=4)
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=(10, 20, 100, 200), backend=backend)
    assert result.num_test == 7
    assert result.k_used == {10: 10, 20: 20, 100: 40, 200: 40}
    ref = reference_scores(x_train, y_train, x_test, 40, 0.07, 3)
    top1, top5 = reference_accuracy(ref, y_test)
    assert result.top1[200] == pytest.approx(top1) and result.top1[100] == result.top1[200]
    assert result.top5[200] is None  # only 3 classes: top-5 would be the classes voted for at all
    assert result.notes[0].startswith("top-5 not reported: with 3 classes") and result.as_dict()["notes"] == result.notes
    single = knn_evaluate(x_train, y_train, x_test[:1], y_test[:1], ks=(20,), backend=backend)
    assert single.top1[20] in (0.0, 100.0)


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="feature dims"):
        knn_evaluate(torch.randn(5, 4), torch.zeros(5), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="at least one"):
        knn_evaluate(torch.randn(5, 4), torch.zeros(5), torch.randn(0, 4), torch.zeros(0))
