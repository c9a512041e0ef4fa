"""Task-similarity scorers: how well a backbone should transfer, from one forward pass.

A scorer is a function of pooled features (N x D), integer labels (N,) and, when it says so in
``requires``, the backbone's source-classifier probabilities (N x C_source). Higher is better.
The built-ins below register through the ``autotransfer_scorers`` hook like any plugin's:

- ``hscore``: H-score, class separation of the features (Bao et al., ICIP 2019);
- ``leep``: log expected empirical prediction through the source head (Nguyen et al., ICML 2020);
- ``nce``: negative conditional entropy of labels given source labels (Tran et al., ICCV 2019);
- ``logme``: log marginal evidence of a Bayesian linear head (You et al., ICML 2021);
- ``hscore_shrink``: H-score with a Ledoit-Wolf covariance (Ibrahim, Ponomareva & Mazumder,
  arXiv:2110.06893, "Newer is not always better: rethinking transferability metrics...");
- ``nleep``: LEEP with a Gaussian mixture on PCA features as the "source head" (Li et al., CVPR 2021).

``leep`` and ``nce`` need the source head's probabilities; the others need the features only.
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
        row, col = np.argwhere(~np.isfinite(features))[0]
        raise ValueError(f"features must be finite, got {features[row, col]} at row {row}, column {col}")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"scoring needs at least 2 classes, got only {classes.tolist()}")
    if source_probs is not None:
        source_probs = np.asarray(source_probs, dtype=np.float64)
        if source_probs.ndim != 2 or len(source_probs) != len(features):
            raise ValueError(f"source_probs must be (N, C) with N = {len(features)}, got shape {source_probs.shape}")
        sums = source_probs.sum(axis=1)
        bad = np.flatnonzero(~np.isfinite(sums) | (source_probs < 0).any(axis=1) | ~np.isclose(sums, 1.0, atol=1e-3))
        if len(bad):
            row = bad[0]
            raise ValueError(f"source_probs rows must be probabilities (non-negative, summing to 1; apply softmax): "
                             f"row {row} has min {source_probs[row].min():.4g} and sum {sums[row]:.4g}")
    return features, labels.astype(np.int64), source_probs


# --------------------------------------------------------------------------- built-in scorers

def _onehot(labels: np.ndarray) -> np.ndarray:
    """(N, K) indicator of the K labels present, in sorted order: labels need not be 0..K-1 (or >= 0)."""
    classes, index = np.unique(labels, return_inverse=True)
    onehot = np.zeros((len(labels), len(classes)))
    onehot[np.arange(len(labels)), index] = 1.0
    return onehot


def _class_mean_cov(centred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """cov(E[f | y]) of centred features: each row replaced by its class mean (Bao et al., 2019)."""
    class_means = np.zeros_like(centred)
    for label in np.unique(labels):
        rows = labels == label
        class_means[rows] = centred[rows].mean(axis=0)
    return class_means.T @ class_means / len(centred)


def hscore(features: np.ndarray, labels: np.ndarray, source_probs=None) -> float:
    """H-score (Bao et al., 2019): tr(cov(f)^+ cov(E[f | y])), the class separation of the features.

    With no more samples than dimensions the centred features span their own N - 1 dimensions, the
    class means lie inside that span, and the score is C - 1 for any features at all: not applicable
    then (`hscore_shrink` is the estimator for that regime)."""
    n, d = features.shape
    if n <= d:
        raise NotApplicable(f"hscore needs more samples than feature dimensions (N={n} <= D={d}: the plain "
                            "H-score is C-1 for any features there); use hscore_shrink")
    centred = features - features.mean(axis=0)
    cov_f = centred.T @ centred / len(features)
    cov_g = _class_mean_cov(centred, labels)
    return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-12, hermitian=True) @ cov_g))


def hscore_shrink(features: np.ndarray, labels: np.ndarray, source_probs=None) -> float:
    """Shrinkage H-score (Ibrahim, Ponomareva & Mazumder, arXiv:2110.06893, eq. for H_alpha):
    tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y])) with cov_alpha = (1 - alpha) cov(f) + alpha mu I the
    Ledoit-Wolf estimate. The plain H-score's cov(f) is badly estimated when D is near or above N;
    shrinking it (and, as in the paper, the class-mean covariance by the same 1 - alpha) fixes that."""
    from sklearn.covariance import LedoitWolf  # here, not at import: sklearn takes ~1 s to load

    estimate = LedoitWolf(store_precision=False).fit(features)
    cov_g = _class_mean_cov(features - estimate.location_, labels)
    try:
        solved = np.linalg.solve(estimate.covariance_, cov_g)
    except np.linalg.LinAlgError:  # only for constant features: cov_f = 0, and no separation either
        solved = np.linalg.pinv(estimate.covariance_, hermitian=True) @ cov_g
    return float((1.0 - estimate.shrinkage_) * np.trace(solved))


def _joint(labels: np.ndarray, source_probs: np.ndarray) -> np.ndarray:
    """Empirical joint P(y, z) of target label y (rows, sorted) and (soft) source label z."""
    return _onehot(labels).T @ source_probs / len(labels)


def leep(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray) -> float:
    """LEEP (Nguyen et al., 2020): mean log-likelihood of the labels under the source head composed
    with the empirical conditional P(y | z)."""
    onehot = _onehot(labels)
    joint = onehot.T @ source_probs / len(labels)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), _EPS)  # P(y | z)
    expected = source_probs @ conditional.T  # (N, classes): sum_z P(y | z) theta_z(x)
    return float(np.mean(np.log(np.maximum((expected * onehot).sum(axis=1), _EPS))))


def nce(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray) -> float:
    """NCE (Tran et al., 2019): -H(Y | Z) with Z the source head's hard labels."""
    hard = np.zeros_like(source_probs)
    hard[np.arange(len(labels)), source_probs.argmax(axis=1)] = 1.0
    joint = _joint(labels, hard)
    marginal_z = joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log((joint / np.maximum(marginal_z, _EPS))[nonzero])))


_TINY = np.finfo(np.float64).tiny


def _logme_evidence(z: np.ndarray, residual_out: float, singular: np.ndarray, n: int, d: int,
                    tol: float = 1e-3, max_iter: int = 100) -> float:
    """Maximised log evidence / N for one target column (You et al., ICML 2021, Algorithm 1).

    `z` = U^T y and `singular` the singular values s of F (thin SVD, r = min(N, D) of them);
    `residual_out` = ||y - U U^T y||^2, the part of y no weight vector can fit. The model is
    y ~ N(F m, 1/beta), m ~ N(0, I/alpha); A = alpha I + beta F^T F has eigenvalues
    alpha + beta sigma (sigma = s^2) and, D - r times, alpha. Iterate the fixed point
    gamma = sum beta sigma / (alpha + beta sigma), alpha = gamma / m^T m, beta = (N - gamma) / ||y - F m||^2
    until alpha and beta change by less than `tol` (relative), then evaluate the evidence at them.
    """
    sigma = singular ** 2

    def posterior(alpha: float, beta: float) -> tuple[float, float, float]:
        shrink = alpha / (alpha + beta * sigma)  # per singular direction: 1 - fitted fraction
        gamma = float(np.sum(1.0 - shrink))  # effective number of parameters
        m_norm2 = float(np.sum((beta * singular * z / (alpha + beta * sigma)) ** 2))  # m^T m
        residual = residual_out + float(np.sum((shrink * z) ** 2))  # ||y - F m||^2
        return gamma, m_norm2, residual

    # The paper starts at alpha = beta = 1; starting at alpha = ||F||_F^2 / D instead makes
    # the iterates scale-equivariant (F -> cF gives alpha -> c^2 alpha), as the maximised evidence is
    # scale-invariant: same optimum, but features of scale 1e-8 or 1e8 converge as fast as scale 1.
    alpha, beta = max(float(np.sum(sigma)) / d, _TINY), 1.0
    for _ in range(max_iter):
        gamma, m_norm2, residual = posterior(alpha, beta)
        new_alpha = max(gamma / max(m_norm2, _TINY), _TINY)
        new_beta = max((n - gamma) / max(residual, _TINY), _TINY)
        done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    _, m_norm2, residual = posterior(alpha, beta)
    logdet_a = np.sum(np.log(alpha + beta * sigma)) + (d - len(sigma)) * np.log(alpha)
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * residual - alpha / 2 * m_norm2 - logdet_a / 2)
    return float(evidence / n)


def logme(features: np.ndarray, labels: np.ndarray, source_probs=None) -> float:
    """LogME (You et al., ICML 2021): mean over classes of the per-sample log marginal evidence of a
    Bayesian linear regression from the features to the class's one-hot column, with the prior and
    noise precisions set by evidence maximisation. It rewards features a linear head fits well
    without overfitting. Features are used as given (no centring or scaling, as in the paper), so
    there is no bias term; one SVD serves every class and iteration."""
    n, d = features.shape
    targets = _onehot(labels)
    u, singular, _ = np.linalg.svd(features, full_matrices=False)
    projected = u.T @ targets  # (r, K)
    residual_out = np.sum((targets - u @ projected) ** 2, axis=0)
    return float(np.mean([_logme_evidence(projected[:, k], residual_out[k], singular, n, d)
                          for k in range(targets.shape[1])]))


def nleep(features: np.ndarray, labels: np.ndarray, source_probs=None, *,
          components_per_class: int = 5) -> float:
    """NLEEP (Li et al., CVPR 2021, "Ranking neural checkpoints"): LEEP with the posteriors of a
    Gaussian mixture fitted to the PCA-reduced features (80% of the variance) in place of a source
    head, so it works for any backbone and is better calibrated than a softmax head. Mixture: V =
    5 x classes components (at most N // 2), diagonal covariances (speed, stability on few samples),
    fixed seed, so the score is deterministic for a given input."""
    from sklearn.decomposition import PCA  # here, not at import: sklearn takes ~1 s to load
    from sklearn.mixture import GaussianMixture

    reduced = PCA(n_components=0.8, svd_solver="full").fit_transform(features)
    components = max(1, min(components_per_class * len(np.unique(labels)), len(features) // 2))
    mixture = GaussianMixture(components, covariance_type="diag", reg_covar=1e-4, max_iter=200,
                              random_state=0).fit(reduced)
    return leep(features, labels, mixture.predict_proba(reduced))


BUILTIN_SCORERS = (
    Scorer("hscore", hscore, description="H-score: feature class separation (Bao et al., 2019)"),
    Scorer("leep", leep, frozenset({SOURCE_PROBS}), "LEEP: log expected empirical prediction (Nguyen et al., 2020)"),
    Scorer("nce", nce, frozenset({SOURCE_PROBS}), "NCE: negative conditional entropy of labels given source labels "
                                                   "(Tran et al., 2019)"),
    Scorer("logme", logme, description="LogME: evidence of a Bayesian linear head on the features (You et al., 2021)"),
    Scorer("hscore_shrink", hscore_shrink, description="H-score with Ledoit-Wolf shrinkage "
                                                       "(Ibrahim, Ponomareva & Mazumder, 2021)"),
    Scorer("nleep", nleep, description="NLEEP: LEEP over a Gaussian mixture on PCA features (Li et al., 2021)"),
)


# --------------------------------------------------------------------------- public API

def score(name: str, features, labels, source_probs=None, *, plugins: tuple[str, ...] = ()) -> float:
    """Score pooled `features` for `labels` with the registered scorer `name` (higher is better).

    Raises NotApplicable when the scorer needs `source_probs` and none are given.
    """
    from .plugins import registries

    return registries(tuple(plugins)).scorer(name)(features, labels, source_probs)
