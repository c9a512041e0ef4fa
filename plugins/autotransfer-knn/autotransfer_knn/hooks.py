"""The autotransfer hook implementations of this package (entry-point group ``autotransfer``)."""

from __future__ import annotations

import numpy as np

from autotransfer.hookspecs import hookimpl
from autotransfer.scorers import Scorer

from .knn import knn_loo_accuracy


def knn_loo(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """5-NN leave-one-out accuracy: a vote of 5 smooths over single mislabelled or odd images."""
    return knn_loo_accuracy(features, labels, k=5)


def knn1_loo(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None) -> float:
    """1-NN leave-one-out accuracy: the finest-grained view, useful on few images per class."""
    return knn_loo_accuracy(features, labels, k=1)


SCORERS = (
    Scorer("knn_loo", knn_loo, description="5-nearest-neighbour leave-one-out accuracy, cosine similarity"),
    Scorer("knn1_loo", knn1_loo, description="1-nearest-neighbour leave-one-out accuracy, cosine similarity"),
)


@hookimpl
def autotransfer_scorers() -> list:
    return list(SCORERS)
