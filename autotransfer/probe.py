"""Converged linear heads on frozen features: the logistic-regression probe, as a torch layer.

Invariant: a fully frozen trial with a linear head, the head a LP-FT trial starts from, and the
benchmark's `linear-probe` method all fit the same model with this one function: standardised
features, multinomial L2-regularised logistic regression solved to convergence (lbfgs), its C chosen
by stratified k-fold cross-validation on the training split alone. The validation split is never
seen, so the val accuracy a trial reports is as honest as the probe baseline's, and on the same
features the search's probe cannot be worse than the baseline's: it is the baseline.

C is chosen along a path, as `LogisticRegressionCV` does: each fold's model is warm-started from its
fit at the next stronger regularisation, strongest first, and the path stops at the first C whose
mean fold accuracy falls below the best so far (CV accuracy over C is unimodal in practice, and the
weakly regularised end, which converges slowest, is reached only when it keeps paying). The solver
runs in float32, as the features are stored.

The fitted scaler is folded into the layer (W / s, b - W m / s), so the result loads into an
ordinary `nn.Linear` head that saves, loads and predicts like any other.

The solver runs on one BLAS thread by default: lbfgs makes many small products, and BLAS threads
contending with torch's idle pool make them far slower than one thread (`benchmarks/probe_fit.py`).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PROBE_CS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the C path CV walks, strongest regularisation first
FALLBACK_C = 0.1  # when the training split is too small to cross-validate
MAX_ITER = 2000
CV_FOLDS = 3
BLAS_THREADS = 1  # see the module docstring; None leaves the BLAS pool as it is


@dataclass(frozen=True)
class Probe:
    """A fitted probe as logits = features @ weight.T + bias, over all `num_classes` classes."""

    weight: np.ndarray  # (classes, features), float32, the scaler folded in
    bias: np.ndarray  # (classes,)
    c: float  # the L2 strength CV chose
    seconds: float  # CV and the final fit

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float32) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def load_into(self, layer: nn.Linear) -> None:
        """Copy into a linear head (shapes must match: in_features, num_classes)."""
        if tuple(layer.weight.shape) != self.weight.shape:
            raise ValueError(f"probe of shape {self.weight.shape} does not fit a head of shape "
                             f"{tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.weight))
            layer.bias.copy_(torch.from_numpy(self.bias))


def cv_folds(labels: np.ndarray) -> int:
    """As many folds (at most CV_FOLDS) as the rarest training class allows; 0 when CV is impossible."""
    counts = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    counts = counts[counts > 0]
    return min(CV_FOLDS, int(counts.min())) if len(counts) > 1 else 0


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
              cs: tuple[float, ...] | list[float] = PROBE_CS, blas_threads: int | None = BLAS_THREADS) -> Probe:
    """Fit the probe on the training split only (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    with warnings.catch_warnings(), threadpool_limits(blas_threads, user_api="blas"):
        warnings.simplefilter("ignore")  # convergence chatter on tiny folds
        c = cv_choice(features, labels, sorted(float(c) for c in cs), seed)
        scaler = StandardScaler().fit(features)
        regression = LogisticRegression(C=c, max_iter=MAX_ITER).fit(scaler.transform(features), labels)
    weight, bias = _as_softmax(regression.coef_, regression.intercept_, regression.classes_, num_classes)
    scale = scaler.scale_ if scaler.scale_ is not None else np.ones(features.shape[1])
    folded = weight / scale
    return Probe(folded.astype(np.float32), (bias - folded @ scaler.mean_).astype(np.float32), c,
                 time.perf_counter() - start)


def cv_choice(features: np.ndarray, labels: np.ndarray, cs: list[float], seed: int) -> float:
    """The C (from `cs`, ascending) with the best mean stratified k-fold accuracy on the training split,
    walked as a warm-started path that stops once the accuracy falls (module docstring); the earliest C
    wins a tie. FALLBACK_C, or the only C, when there is nothing to choose or too few images per class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    folds = cv_folds(labels)
    if len(cs) == 1 or folds < 2:
        return cs[0] if len(cs) == 1 else FALLBACK_C
    splits = []
    for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        scaler = StandardScaler().fit(features[train])
        splits.append((scaler.transform(features[train]), labels[train], scaler.transform(features[held]),
                       labels[held], LogisticRegression(max_iter=MAX_ITER, warm_start=True)))
    best_c, best_score = cs[0], -1.0
    for c in cs:
        score = float(np.mean([model.set_params(C=c).fit(x, y).score(x_held, y_held)
                               for x, y, x_held, y_held, model in splits]))
        if score > best_score:
            best_c, best_score = c, score
        elif score < best_score:
            break
    return best_c


def _as_softmax(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's coefficients as one row per class of the dataset: a binary model's single row becomes
    two (+-half, the same probabilities under softmax); classes absent from training never win."""
    if coef.shape[0] == 1:  # binary
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, float(intercept.min()) - 1e4 if len(intercept) else 0.0)
    for row, label in enumerate(classes):
        weight[int(label)], bias[int(label)] = coef[row], intercept[row]
    return weight, bias
