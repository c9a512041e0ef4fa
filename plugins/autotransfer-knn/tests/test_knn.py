"""The k-NN leave-one-out accuracy itself: scikit-learn agreement, a plain brute-force reference
with the tie rules, constructed orderings, chunking and edge cases. No autotransfer machinery here;
that is test_knn_plugin.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.model_selection import LeaveOneOut, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from autotransfer_knn import knn as knn_module
from autotransfer_knn.knn import default_chunk_rows, knn_loo_accuracy, nearest, unit_rows, vote


# --------------------------------------------------------------------------- references

def sklearn_loo(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    model = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    return float(cross_val_score(model, features, labels, cv=LeaveOneOut()).mean())


def brute_force_loo(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The definition, written out over the full N x N matrix with exactly summed dot products.

    Neighbours: most similar first, equal similarity -> lower index. Vote: most neighbours, then the
    larger summed similarity, then the lowest label. Zero rows have similarity 0 to everything.
    """
    rows = [[float(v) for v in row] for row in features]
    unit = []
    for row in rows:
        norm = math.sqrt(math.fsum(v * v for v in row))
        unit.append([v / norm for v in row] if norm > 0 else [0.0] * len(row))
    n = len(unit)
    sims = [[math.fsum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)] for i in range(n)]
    k = min(k, n - 1)
    correct = 0
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (-sims[i][j], j))[:k]
        by_label: dict[int, list[float]] = {}
        for j in others:
            by_label.setdefault(int(labels[j]), []).append(sims[i][j])
        predicted = min(by_label, key=lambda lab: (-len(by_label[lab]), -math.fsum(by_label[lab]), lab))
        correct += predicted == labels[i]
    return correct / n


def with_duplicates(rng: np.random.Generator, n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Random rows, then exact copies (some relabelled), copies scaled by 2 and 0.5, and zero rows."""
    x = rng.normal(size=(n, d))
    y = rng.integers(0, classes, n)
    copies = rng.integers(0, n, n // 3)
    x = np.vstack([x, x[copies], 2.0 * x[copies[:3]], 0.5 * x[copies[3:5]], np.zeros((3, d))])
    y = np.concatenate([y, rng.integers(0, classes, len(copies)), y[copies[:3]], y[copies[3:5]],
                        rng.integers(0, classes, 3)])
    order = rng.permutation(len(x))
    return x[order], y[order]


# --------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k, classes", [(1, 2), (1, 5), (5, 2), (3, 2)])
def test_agrees_with_scikit_learn_leave_one_out(seed, k, classes):
    """Continuous random features: no equal similarities, and no vote ties (k odd, 2 classes; or k = 1)."""
    rng = np.random.default_rng(seed)
    n, d = rng.integers(30, 90), rng.integers(2, 12)
    x = rng.normal(size=(n, d)) + rng.normal(size=d)  # off-centre: similarities are not symmetric about 0
    y = rng.integers(0, classes, n)
    assert abs(knn_loo_accuracy(x, y, k) - sklearn_loo(x, y, k)) <= 1e-12


def test_agrees_with_scikit_learn_on_separable_clusters():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 25)
    x = centres[y] + 0.8 * rng.normal(size=(len(y), 16))
    for k in (1, 5):
        ours, theirs = knn_loo_accuracy(x, y, k), sklearn_loo(x, y, k)
        assert abs(ours - theirs) <= 1e-12 and 0.5 < ours < 1.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_matches_brute_force_with_duplicates_zero_rows_and_ties(seed, k):
    x, y = with_duplicates(np.random.default_rng(seed), n=24, d=4, classes=3)
    assert knn_loo_accuracy(x, y, k) == brute_force_loo(x, y, k)


def test_matches_brute_force_when_every_row_is_the_same():
    """All similarities tie: neighbours are the lowest other indices, whatever the floating point does."""
    x = np.tile(np.random.default_rng(1).normal(size=5), (9, 1))
    y = np.array([2, 0, 1, 1, 0, 2, 2, 1, 0])
    for k in range(1, 9):
        assert knn_loo_accuracy(x, y, k) == brute_force_loo(x, y, k)


def test_matches_brute_force_on_integer_features():
    """Small integer features: many exactly equal similarities between distinct rows."""
    rng = np.random.default_rng(3)
    x = rng.integers(-1, 2, size=(40, 3)).astype(float)
    y = rng.integers(0, 2, 40)
    for k in (1, 2, 3, 6):
        assert knn_loo_accuracy(x, y, k) == brute_force_loo(x, y, k)


# --------------------------------------------------------------------------- tie rules by hand

def test_equal_similarity_goes_to_the_lower_index():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # rows 1 and 2 are equally close to row 0
    assert knn_loo_accuracy(x, np.array([1, 0, 1]), k=1) == 0.0  # row 0 takes row 1's label 0
    assert knn_loo_accuracy(x, np.array([0, 0, 1]), k=1) == pytest.approx(1 / 3)


def test_vote_ties_go_to_summed_similarity_then_lowest_label():
    sims = np.array([[0.75, 0.625, 0.5, 0.375]])
    assert vote(np.array([[3, 1, 3, 1]]), sims).tolist() == [3]  # 2-2; sums 1.25 vs 1.125
    assert vote(np.array([[2, 1, 1, 2]]), sims).tolist() == [1]  # 2-2; sums 1.125 each: lowest label
    assert vote(np.array([[0, 1, 1, 5]]), sims).tolist() == [1]  # the majority beats the closest
    assert vote(np.array([[4], [7]]), np.array([[0.1], [-0.5]])).tolist() == [4, 7]


def test_zero_rows_have_similarity_zero_to_everything():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    # row 0 ties at 0 with both (lower index: row 1); rows 1 and 2 find the zero row (0) above each other (-1)
    assert knn_loo_accuracy(x, np.array([0, 0, 1]), k=1) == pytest.approx(2 / 3)
    assert np.array_equal(unit_rows(x), x)


def test_nearest_orders_by_similarity_then_index():
    sims = np.array([[-np.inf, 0.5, 0.9, 0.5, 0.5], [0.2, -np.inf, 0.2, 0.2, 0.1]])
    cols, values = nearest(sims, 3)
    assert cols.tolist() == [[2, 1, 3], [0, 2, 3]]
    assert values.tolist() == [[0.9, 0.5, 0.5], [0.2, 0.2, 0.2]]


# --------------------------------------------------------------------------- orderings and range

def test_class_clusters_score_higher_than_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    noise = rng.normal(size=(len(y), 32))
    clusters = 3.0 * rng.normal(size=(4, 32))[y] + noise
    for k in (1, 5):
        separated, random = knn_loo_accuracy(clusters, y, k), knn_loo_accuracy(noise, y, k)
        shuffled = knn_loo_accuracy(clusters, rng.permutation(y), k)
        assert 0.0 <= random < 0.5 < 0.95 <= separated <= 1.0
        assert shuffled < 0.5


def test_score_is_a_fraction_of_the_samples():
    rng = np.random.default_rng(2)
    for n in (2, 3, 17):
        x, y = rng.normal(size=(n, 3)), np.arange(n) % 2
        value = knn_loo_accuracy(x, y, 5)
        assert 0.0 <= value <= 1.0 and (value * n) == round(value * n)


def test_cosine_ignores_positive_row_scales():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(60, 8)), rng.integers(0, 3, 60)
    scaled = x * rng.uniform(1e-3, 1e3, size=(60, 1))
    for k in (1, 5):
        assert knn_loo_accuracy(scaled, y, k) == knn_loo_accuracy(x, y, k)
    assert knn_loo_accuracy(x * 1e-200, y, 5) == knn_loo_accuracy(x * 1e200, y, 5) == knn_loo_accuracy(x, y, 5)


def test_k_above_n_minus_one_is_clipped():
    x, y = np.random.default_rng(5).normal(size=(4, 3)), np.array([0, 1, 0, 1])
    assert knn_loo_accuracy(x, y, 50) == knn_loo_accuracy(x, y, 3) == brute_force_loo(x, y, 3)
    assert knn_loo_accuracy(x[:2], y[:2], 5) == 0.0  # each one's only neighbour has the other label


def test_float32_and_list_inputs_give_the_float64_result():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(40, 5)).astype(np.float32), rng.integers(0, 2, 40)
    assert knn_loo_accuracy(x, y) == knn_loo_accuracy(x.astype(np.float64), y) == knn_loo_accuracy(x.tolist(), y.tolist())


@pytest.mark.parametrize("kwargs, message", [
    ({"features": np.zeros(4)}, "2-D"),
    ({"labels": np.zeros(3, dtype=int)}, "one entry per feature row"),
    ({"labels": np.zeros(4)}, "integers"),
    ({"features": np.array([[0.0], [np.nan], [1.0], [2.0]])}, "NaN"),
    ({"features": np.zeros((1, 2)), "labels": np.zeros(1, dtype=int)}, "at least 2 samples"),
    ({"k": 0}, "k must be"),
    ({"k": 1.5}, "k must be"),
    ({"chunk_rows": 0}, "chunk_rows"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    call = {"features": np.eye(4), "labels": np.array([0, 1, 0, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        knn_loo_accuracy(**call)


# --------------------------------------------------------------------------- chunking and memory

@pytest.mark.parametrize("k", [1, 5])
def test_tiny_chunks_give_the_full_result(k):
    x, y = with_duplicates(np.random.default_rng(11), n=150, d=6, classes=4)
    full = knn_loo_accuracy(x, y, k, chunk_rows=len(x))
    for rows in (1, 2, 7, 64, len(x) - 1, 10 * len(x)):
        assert knn_loo_accuracy(x, y, k, chunk_rows=rows) == full
    assert knn_loo_accuracy(x, y, k) == full


def test_blocks_stay_small(monkeypatch):
    """No N x N matrix: every similarity block holds at most BLOCK_ELEMENTS entries, also at N = 50 000."""
    monkeypatch.setattr(knn_module, "BLOCK_ELEMENTS", 4096)
    shapes = []
    real = knn_module.block_similarities
    monkeypatch.setattr(knn_module, "block_similarities", lambda *a: shapes.append(real(*a).shape) or real(*a))
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(300, 8)), rng.integers(0, 3, 300)
    value = knn_loo_accuracy(x, y, 5)
    assert sum(rows for rows, _ in shapes) == 300 and all(cols == 300 for _, cols in shapes)
    assert len(shapes) == 300 // (4096 // 300) + 1 and max(rows * cols for rows, cols in shapes) <= 4096
    monkeypatch.undo()
    assert value == knn_loo_accuracy(x, y, 5, chunk_rows=300)
    assert default_chunk_rows(50_000) * 50_000 <= knn_module.BLOCK_ELEMENTS
    assert default_chunk_rows(10) == knn_module.MAX_CHUNK_ROWS and default_chunk_rows(10**9) == 1
