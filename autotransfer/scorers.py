"""Task-similarity scorers: how well a backbone should transfer, from one forward pass.

A scorer is a function of pooled features (N x D), integer labels (N,) and, when it says so in
``requires``, the backbone's source-classifier probabilities (N x C_source). Higher is better.
The built-ins below register through the ``autotransfer_scorers`` hook like any plugin's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

SOURCE_PROBS = "source_probs"
REQUIREMENTS = frozenset({SOURCE_PROBS})
_EPS = 1e-12


class NotApplicable(ValueError):
    """The scorer needs an input this backbone cannot give (e.g. no source classifier)."""


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]
    requires: frozenset[str] = field(default_factory=frozenset)
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.requires) - REQUIREMENTS
        if unknown:
            raise ValueError(f"scorer {self.name!r} requires unknown input(s) {sorted(unknown)}; "
                             f"known: {sorted(REQUIREMENTS)}")
        object.__setattr__(self, "requires", frozenset(self.requires))

    def applicable(self, has_source_probs: bool) -> bool:
        return SOURCE_PROBS not in self.requires or has_source_probs

    def __call__(self, features, labels, source_probs=None) -> float:
        features, labels, source_probs = check_inputs(features, labels, source_probs)
        if not self.applicable(source_probs is not None):
            raise NotApplicable(f"scorer {self.name!r} needs source-classifier probabilities; "
                                "this backbone has no source head")
        return float(self.fn(features, labels, source_probs))


def check_inputs(features, labels, source_probs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validated float64 features (N, D), int labels (N,) and probabilities (N, C) or None."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {features.shape}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"labels must be 1-D with one entry per feature row ({len(features)}), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"scoring needs at least 2 classes, got {len(np.unique(labels))}")
    if source_probs is not None:
        source_probs = np.asarray(source_probs, dtype=np.float64)
        if source_probs.ndim != 2 or len(source_probs) != len(features):
            raise ValueError(f"source_probs must be (N, C) with N = {len(features)}, got shape {source_probs.shape}")
        if (source_probs < 0).any() or not np.allclose(source_probs.sum(axis=1), 1.0, atol=1e-3):
            raise ValueError("source_probs rows must be probabilities (non-negative, summing to 1); apply softmax")
    return features, labels.astype(np.int64), source_probs


# --------------------------------------------------------------------------- built-in scorers

def hscore(features: np.ndarray, labels: np.ndarray, source_probs=None) -> float:
    """H-score (Bao et al., 2019): tr(cov(f)^+ cov(E[f | y])), the class separation of the features."""
    centred = features - features.mean(axis=0)
    cov_f = centred.T @ centred / len(features)
    class_means = np.zeros_like(features)
    for label in np.unique(labels):
        rows = labels == label
        class_means[rows] = centred[rows].mean(axis=0)
    cov_g = class_means.T @ class_means / len(features)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-12, hermitian=True) @ cov_g))


def _joint(labels: np.ndarray, source_probs: np.ndarray) -> np.ndarray:
    """Empirical joint P(y, z) of target label y and (soft) source label z."""
    classes = labels.max() + 1
    onehot = np.zeros((len(labels), classes))
    onehot[np.arange(len(labels)), labels] = 1.0
    return onehot.T @ source_probs / len(labels)


def leep(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray) -> float:
    """LEEP (Nguyen et al., 2020): mean log-likelihood of the labels under the source head composed
    with the empirical conditional P(y | z)."""
    joint = _joint(labels, source_probs)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), _EPS)  # P(y | z)
    expected = source_probs @ conditional.T  # (N, classes): sum_z P(y | z) theta_z(x)
    return float(np.mean(np.log(np.maximum(expected[np.arange(len(labels)), labels], _EPS))))


def nce(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray) -> float:
    """NCE (Tran et al., 2019): -H(Y | Z) with Z the source head's hard labels."""
    hard = np.zeros_like(source_probs)
    hard[np.arange(len(labels)), source_probs.argmax(axis=1)] = 1.0
    joint = _joint(labels, hard)
    marginal_z = joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log((joint / np.maximum(marginal_z, _EPS))[nonzero])))


BUILTIN_SCORERS = (
    Scorer("hscore", hscore, description="H-score: feature class separation (Bao et al., 2019)"),
    Scorer("leep", leep, frozenset({SOURCE_PROBS}), "LEEP: log expected empirical prediction (Nguyen et al., 2020)"),
    Scorer("nce", nce, frozenset({SOURCE_PROBS}), "NCE: negative conditional entropy of labels given source labels "
                                                   "(Tran et al., 2019)"),
)


# --------------------------------------------------------------------------- public API

def score(name: str, features, labels, source_probs=None, *, plugins: tuple[str, ...] = ()) -> float:
    """Score pooled `features` for `labels` with the registered scorer `name` (higher is better).

    Raises NotApplicable when the scorer needs `source_probs` and none are given.
    """
    from .plugins import registries

    return registries(tuple(plugins)).scorer(name)(features, labels, source_probs)
