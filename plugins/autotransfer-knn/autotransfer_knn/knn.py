"""k-nearest-neighbour leave-one-out accuracy of frozen features under cosine similarity.

Each sample is classified by the majority label of its k most cosine-similar *other* samples;
the score is the fraction classified correctly. It asks the plainest question a transferability
score can ask: do the backbone's features already put same-class images next to each other?
No fitting, no distributional assumption, so it is a sanity baseline next to LogME/LEEP.

Rules, all deterministic:

- rows are L2-normalised; an all-zero row stays zero, i.e. has similarity 0 to everything;
- neighbours are ordered by similarity, equal similarities by lower row index; the sample itself
  is never its own neighbour, and k is clipped to N - 1;
- rows that are identical after normalisation share one column of the similarity computation,
  so duplicates tie exactly (bit for bit) instead of by floating-point noise;
- a vote tie goes to the label with the larger summed similarity, then to the lowest label.

Cost: O(N^2 D) time (one pass of blocked matrix products over all pairs) and O(chunk_rows * N)
extra memory; the N x N matrix is never formed. N = 50 000, D = 2048 is about 10^13 flops.
"""

from __future__ import annotations

import hashlib

import numpy as np

MAX_CHUNK_ROWS = 1024
BLOCK_ELEMENTS = 1 << 23  # similarities per block: 64 MiB of float64


def unit_rows(features: np.ndarray) -> np.ndarray:
    """A float64 copy with unit-L2 rows; zero rows stay zero (similarity 0 to everything).

    Rows are first divided by their largest |value| so that tiny or huge rows neither underflow
    to a zero norm nor overflow; ``+ 0.0`` turns -0.0 into 0.0 so equal rows have equal bytes.
    """
    x = np.array(features, dtype=np.float64, order="C")
    if x.shape[1] == 0:
        return x
    peak = np.maximum(x.max(axis=1), -x.min(axis=1))[:, None]
    x /= np.where(peak > 0, peak, 1.0)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    x /= np.where(norm > 0, norm, 1.0)
    x += 0.0
    return x


def duplicate_groups(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row, first row of each group): rows with identical bytes share a group.

    Hashing rows is O(N D) and needs O(N) memory, unlike sorting them; a 128-bit digest makes a
    false merge practically impossible.
    """
    seen: dict[bytes, int] = {}
    first_rows: list[int] = []
    group = np.empty(len(unit), dtype=np.int64)
    for i, row in enumerate(unit):
        key = hashlib.blake2b(row, digest_size=16).digest()
        if key not in seen:
            seen[key] = len(first_rows)
            first_rows.append(i)
        group[i] = seen[key]
    return group, np.asarray(first_rows, dtype=np.int64)


def default_chunk_rows(n: int) -> int:
    """Query rows per block: keeps a block near BLOCK_ELEMENTS similarities, at most 1024 rows."""
    return int(min(MAX_CHUNK_ROWS, max(1, BLOCK_ELEMENTS // max(n, 1))))


def block_similarities(unit: np.ndarray, distinct: np.ndarray, group: np.ndarray | None,
                       start: int, stop: int) -> np.ndarray:
    """Cosine similarities of rows start:stop to every row, with each row's own entry at -inf.

    Columns are computed once per distinct row and copied to its duplicates (``group``), so
    duplicate columns are exactly equal whatever the matrix-product kernel does.
    """
    sims = unit[start:stop] @ distinct.T
    if group is not None:
        sims = sims[:, group]
    sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    return sims


def nearest(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row as (column indices, similarities), shape (rows, k),
    ordered by similarity then lower column index (so ties at the k-th place are deterministic).
    """
    n = sims.shape[1]
    kth = np.partition(sims, n - k, axis=1)[:, n - k]  # the k-th largest of each row
    rows, cols = np.nonzero(sims >= kth[:, None])  # k or more per row (more only on ties)
    values = sims[rows, cols]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, np.arange(len(sims)))[rows]
    keep = rank < k
    return cols[keep].reshape(-1, k), values[keep].reshape(-1, k)


def vote(neighbour_labels: np.ndarray, neighbour_sims: np.ndarray) -> np.ndarray:
    """Majority label per row; ties go to the larger summed similarity, then the lowest label.

    Inputs are (rows, k) with each row's neighbours in descending similarity, so a class's
    similarities are summed in a fixed order and two classes with the same similarities tie
    exactly.
    """
    count_rows, k = neighbour_labels.shape
    row = np.repeat(np.arange(count_rows), k)
    labels, sims = neighbour_labels.ravel(), neighbour_sims.ravel()
    order = np.lexsort((np.tile(np.arange(k), count_rows), labels, row))  # runs of (row, label)
    row, labels, sims = row[order], labels[order], sims[order]
    starts = np.flatnonzero(np.r_[True, (row[1:] != row[:-1]) | (labels[1:] != labels[:-1])])
    run_row, run_label = row[starts], labels[starts]
    run_count = np.diff(np.r_[starts, len(row)])
    run_sum = np.add.reduceat(sims, starts)
    best = np.lexsort((run_label, -run_sum, -run_count, run_row))  # winner first within each row
    first = np.r_[True, run_row[best][1:] != run_row[best][:-1]]
    return run_label[best][first]


def knn_loo_accuracy(features, labels, k: int = 5, *, chunk_rows: int | None = None) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote under cosine similarity, in [0, 1].

    ``features`` (N, D), ``labels`` (N,) integers. O(N^2 D) time, O(chunk_rows * N) extra memory.
    ``chunk_rows`` (default: sized so a block holds about 8 M similarities) changes only speed
    and memory, never the result.
    """
    unit = unit_rows(_features(features))
    labels = _labels(labels, len(unit))
    n = len(unit)
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples, got {n}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if chunk_rows is not None and (int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    k = min(int(k), n - 1)
    group, firsts = duplicate_groups(unit)
    distinct, group = (unit, None) if len(firsts) == n else (unit[firsts], group)
    step = int(chunk_rows) if chunk_rows is not None else default_chunk_rows(n)
    correct = 0
    for start in range(0, n, step):
        stop = min(start + step, n)
        cols, sims = nearest(block_similarities(unit, distinct, group, start, stop), k)
        correct += int(np.count_nonzero(vote(labels[cols], sims) == labels[start:stop]))
    return correct / n


def _features(features) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def _labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must be 1-D with one entry per feature row ({n}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)
