"""Built-in transferability scorers against plain reference implementations written from the papers.

The references below deliberately avoid the tricks the library uses (one-hot matmuls, the SVD in
LogME, the shared class-mean helper): loops, explicit matrices, ``np.cov``, sklearn's LedoitWolf.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from autotransfer.scorers import (BUILTIN_SCORERS, SOURCE_PROBS, NotApplicable, check_inputs, hscore, hscore_shrink,
                                  leep, logme, nce, nleep, score)

FEATURE_SCORERS = ("hscore", "hscore_shrink", "logme", "nleep")
SOURCE_SCORERS = ("leep", "nce")


# --------------------------------------------------------------------------- data

def random_task(n: int = 60, d: int = 8, classes: int = 3, sources: int = 7, seed: int = 0):
    """Random features, labels with every class present, and softmax source probabilities."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    features = rng.normal(size=(n, d)) + 0.7 * rng.normal(size=(classes, d))[labels]
    logits = 1.5 * rng.normal(size=(n, sources))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return features, labels, probs


def separated_and_noise(n: int = 120, d: int = 10, classes: int = 3, seed: int = 1):
    """Features with well separated class means (plus small noise), and pure noise of the same shape."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    separated = 3.0 * rng.normal(size=(classes, d))[labels] + 0.1 * rng.normal(size=(n, d))
    return separated, rng.normal(size=(n, d)), labels


def aligned_head(n: int = 90, classes: int = 3, sources: int = 8, seed: int = 2):
    """Source probabilities concentrated on a source class fixed by the label, and the same rows shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    probs = rng.dirichlet(np.ones(sources), size=n) * 0.3
    probs[np.arange(n), (2 * labels + 1) % sources] += 0.7
    return labels, probs, probs[rng.permutation(n)]


# --------------------------------------------------------------------------- references

def ref_hscore(features, labels, cov_f=None) -> float:
    """tr(cov(f)^-1 cov(E[f|y])) with cov(E[f|y]) = sum_k P(k) (mu_k - mu)(mu_k - mu)^T."""
    d = features.shape[1]
    if cov_f is None:
        cov_f = np.cov(features, rowvar=False, bias=True)
    mean = features.mean(axis=0)
    cov_g = np.zeros((d, d))
    for label in sorted(set(labels.tolist())):
        rows = [i for i in range(len(labels)) if labels[i] == label]
        diff = features[rows].mean(axis=0) - mean
        cov_g += len(rows) / len(labels) * np.outer(diff, diff)
    return float(np.trace(np.linalg.inv(cov_f) @ cov_g))


def ref_hscore_shrink(features, labels) -> float:
    """H_alpha = tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f|y])), Ledoit-Wolf cov_alpha (Ibrahim et al.)."""
    estimate = LedoitWolf().fit(features)
    return (1.0 - estimate.shrinkage_) * ref_hscore(features, labels, estimate.covariance_)


def ref_leep(labels, probs) -> float:
    """(1/n) sum_i log sum_z P(y_i | z) theta_z(x_i), P(y, z) = (1/n) sum_{i: y_i = y} theta_z(x_i)."""
    n, sources = probs.shape
    classes = sorted(set(labels.tolist()))
    joint = {(y, z): sum(probs[i, z] for i in range(n) if labels[i] == y) / n for y in classes for z in range(sources)}
    marginal = [sum(joint[y, z] for y in classes) for z in range(sources)]
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[labels[i], z] / marginal[z] * probs[i, z] for z in range(sources)))
    return total / n


def ref_nce(labels, probs) -> float:
    """-H(Y | Z) = sum_{y,z} P(y, z) log P(y | z), Z = argmax of the source head."""
    n = len(labels)
    hard = [int(np.argmax(row)) for row in probs]
    total = 0.0
    for y in set(labels.tolist()):
        for z in set(hard):
            both = sum(1 for i in range(n) if labels[i] == y and hard[i] == z)
            if both:
                total += both / n * math.log(both / sum(1 for i in range(n) if hard[i] == z))
    return total


def ref_logme(features, labels, tol: float = 1e-3, max_iter: int = 100) -> float:
    """LogME with explicit matrices: A = alpha I + beta F^T F, m = beta A^-1 F^T y, gamma = D - alpha tr(A^-1).

    Same start (alpha = ||F||_F^2 / D, beta = 1) and stopping rule (alpha and beta both within `tol`
    relative) as the library, so the two agree to rounding.
    """
    n, d = features.shape
    gram = features.T @ features

    def posterior(target, alpha, beta):
        a = alpha * np.eye(d) + beta * gram
        m = beta * np.linalg.solve(a, features.T @ target)
        return a, m, d - alpha * np.trace(np.linalg.inv(a))

    evidences = []
    for label in sorted(set(labels.tolist())):
        target = (labels == label).astype(np.float64)
        alpha, beta = np.trace(gram) / d, 1.0
        for _ in range(max_iter):
            _, m, gamma = posterior(target, alpha, beta)
            new_alpha = gamma / (m @ m)
            new_beta = (n - gamma) / np.sum((target - features @ m) ** 2)
            done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        a, m, _ = posterior(target, alpha, beta)
        sign, logdet = np.linalg.slogdet(a)
        assert sign > 0
        evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * np.sum((features @ m - target) ** 2) - alpha / 2 * (m @ m) - logdet / 2)
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def explicit_evidence(features, target, alpha, beta) -> float:
    """Log marginal likelihood / N of y ~ N(0, F F^T / alpha + I / beta), straight from the Gaussian."""
    n = len(target)
    cov = features @ features.T / alpha + np.eye(n) / beta
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (n * math.log(2 * math.pi) + logdet + target @ np.linalg.solve(cov, target)) / n)


def ref_nleep(features, labels) -> float:
    """PCA (80% variance) -> diagonal GMM with 5 x classes components -> LEEP on its posteriors."""
    reduced = PCA(n_components=0.8, svd_solver="full").fit_transform(features)
    components = min(5 * len(set(labels.tolist())), len(features) // 2)
    mixture = GaussianMixture(components, covariance_type="diag", reg_covar=1e-4, max_iter=200,
                              random_state=0).fit(reduced)
    return ref_leep(labels, mixture.predict_proba(reduced))


# --------------------------------------------------------------------------- against the references

@pytest.mark.parametrize("seed", [0, 1])
def test_hscore_matches_reference(seed):
    features, labels, _ = random_task(seed=seed)
    assert hscore(features, labels) == pytest.approx(ref_hscore(features, labels), rel=1e-6)


@pytest.mark.parametrize("n, d", [(60, 8), (30, 50)])
def test_hscore_shrink_matches_sklearn_ledoit_wolf(n, d):
    features, labels, _ = random_task(n=n, d=d)
    expected = ref_hscore_shrink(features, labels)
    assert 0 < expected and hscore_shrink(features, labels) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_leep_matches_reference(seed):
    features, labels, probs = random_task(seed=seed)
    assert leep(features, labels, probs) == pytest.approx(ref_leep(labels, probs), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_nce_matches_reference(seed):
    features, labels, probs = random_task(n=80, sources=5, seed=seed)
    assert nce(features, labels, probs) == pytest.approx(ref_nce(labels, probs), rel=1e-6)


@pytest.mark.parametrize("n, d, classes", [(80, 6, 3), (60, 15, 4), (20, 50, 3), (30, 45, 2)],
                         ids=["N>D", "N>D-wider", "N<D", "N<D-two-classes"])
def test_logme_matches_explicit_matrix_reference(n, d, classes):
    features, labels, _ = random_task(n=n, d=d, classes=classes)
    assert logme(features, labels) == pytest.approx(ref_logme(features, labels), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("n, d", [(50, 5), (12, 30)], ids=["N>D", "N<D-noise-free-limit"])
def test_logme_is_the_maximised_gaussian_evidence(n, d):
    """Independent of the fixed point: the score is (close to) the max over (alpha, beta) of the marginal
    likelihood of the one-hot column under y ~ N(0, F F^T / alpha + I / beta). In the N < D case one
    class's optimum is at beta -> infinity (noise-free interpolation), where the explicit-A reference
    above turns singular but this form, and the library's SVD form, stay finite."""
    from scipy.optimize import minimize

    features, labels, _ = random_task(n=n, d=d, classes=2)
    best = []
    for label in (0, 1):
        target = (labels == label).astype(np.float64)
        result = minimize(lambda x: -explicit_evidence(features, target, math.exp(x[0]), math.exp(x[1])),
                          x0=[0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-12})
        best.append(-result.fun)
    assert logme(features, labels) == pytest.approx(np.mean(best), rel=1e-5)


def test_logme_ignores_feature_scale():
    features, labels, _ = random_task()
    base = logme(features, labels)
    for scale in (1e-6, 1e6):
        assert logme(scale * features, labels) == pytest.approx(base, rel=1e-9)


def test_nleep_matches_reference():
    features, labels, _ = random_task(n=60, d=12)
    assert nleep(features, labels) == pytest.approx(ref_nleep(features, labels), rel=1e-6)


def test_nleep_is_deterministic():
    features, labels, _ = random_task(n=60, d=12, seed=3)
    assert nleep(features, labels) == nleep(features, labels)


def test_scores_do_not_depend_on_label_values():
    """Labels need not be 0..K-1: renaming classes (even to negative ids) changes nothing."""
    features, labels, probs = random_task()
    renamed = np.array([-4, 7, 1000])[labels]
    for fn in (hscore, hscore_shrink, leep, nce, logme, nleep):
        assert fn(features, renamed, probs) == pytest.approx(fn(features, labels, probs), rel=1e-12), fn.__name__


# --------------------------------------------------------------------------- known orderings

@pytest.mark.parametrize("name", FEATURE_SCORERS)
def test_separated_features_beat_noise(name):
    separated, noise, labels = separated_and_noise()
    assert score(name, separated, labels) > score(name, noise, labels)


@pytest.mark.parametrize("name", SOURCE_SCORERS)
def test_aligned_source_head_beats_shuffled(name):
    labels, aligned, shuffled = aligned_head()
    features = np.zeros((len(labels), 2))
    assert score(name, features, labels, aligned) > score(name, features, labels, shuffled)


# --------------------------------------------------------------------------- public API and validation

def test_builtin_scorers_are_registered_with_descriptions():
    assert [s.name for s in BUILTIN_SCORERS] == ["hscore", "leep", "nce", "logme", "hscore_shrink", "nleep"]
    for scorer in BUILTIN_SCORERS:
        assert scorer.description
        assert (SOURCE_PROBS in scorer.requires) == (scorer.name in SOURCE_SCORERS)


@pytest.mark.parametrize("name, fn", [("hscore", hscore), ("hscore_shrink", hscore_shrink), ("leep", leep),
                                      ("nce", nce), ("logme", logme), ("nleep", nleep)])
def test_score_api_matches_the_function(name, fn):
    features, labels, probs = random_task()
    # lists and int32 labels go through check_inputs first
    assert score(name, features.tolist(), labels.astype(np.int32), probs) == pytest.approx(
        fn(features, labels, probs), rel=1e-12)


@pytest.mark.parametrize("name", SOURCE_SCORERS)
def test_source_scorers_need_source_probs(name):
    features, labels, _ = random_task()
    with pytest.raises(NotApplicable, match=name):
        score(name, features, labels)


def test_feature_scorers_need_no_source_probs():
    features, labels, _ = random_task()
    for name in FEATURE_SCORERS:
        assert np.isfinite(score(name, features, labels))


def _bad_probs():
    _, _, probs = random_task()
    probs = probs.copy()
    probs[5] *= 0.5
    return probs


@pytest.mark.parametrize("features, labels, probs, message", [
    (np.zeros(12), np.arange(12) % 2, None, r"2-D.*\(12,\)"),
    (np.zeros((12, 3)), np.arange(11) % 2, None, r"\(12\).*\(11,\)"),
    (np.zeros((12, 3)), (np.arange(12) % 2).astype(float), None, "integers.*float64"),
    (np.where(np.arange(36).reshape(12, 3) == 8, np.nan, 0.0), np.arange(12) % 2, None, "nan at row 2, column 2"),
    (np.zeros((12, 3)), np.full(12, 7), None, r"at least 2 classes.*\[7\]"),
    (random_task()[0], random_task()[1], _bad_probs(), r"row 5 .*sum 0\.5"),
    (np.zeros((12, 3)), np.arange(12) % 2, np.full((12, 4), 0.25) - np.eye(12, 4) * 0.5, r"row 0 has min -0\.25"),
], ids=["1-D features", "length mismatch", "float labels", "NaN", "one class", "rows not summing to 1",
        "negative probability"])
def test_check_inputs_rejects_bad_input_naming_the_value(features, labels, probs, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(features, labels, probs)


def test_plain_hscore_is_not_applicable_without_more_samples_than_dimensions():
    """At N <= D pinv(cov f) whitens the samples' whole span and H = C - 1 for pure noise too."""
    rng = np.random.default_rng(0)
    labels = np.arange(20) % 2
    noise = rng.normal(size=(20, 30))
    centred = noise - noise.mean(axis=0)
    between = np.stack([centred[labels == c].mean(axis=0) for c in (0, 1)])
    weights = np.bincount(labels) / len(labels)
    cov_g = (between.T * weights) @ between
    degenerate = np.trace(np.linalg.pinv(centred.T @ centred / 20) @ cov_g)
    assert degenerate == pytest.approx(1.0)  # the reason for refusing: noise scores the maximum C - 1
    with pytest.raises(NotApplicable, match="N=20 <= D=30.*hscore_shrink"):
        score("hscore", noise, labels)
    assert 0 < score("hscore_shrink", noise, labels) < 1.0
