"""Rank candidate backbones before training, from one forward pass each (`autotransfer rank`,
`search --prerank`), and measure afterwards how well each scorer predicted the search."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from .backbones import provider_for, weights_label
from .errors import UserError
from .cache.features import FEATURES_DIR, FeatureCache, extract
from .scorers import NotApplicable

if TYPE_CHECKING:
    from .prepared import Prepared

log = logging.getLogger(__name__)
NOT_APPLICABLE = "n/a"


@dataclass
class BackboneScores:
    backbone: str
    pretrained: str
    num_features: int
    extract_s: float
    cached: bool
    scores: dict[str, float | None] = field(default_factory=dict)  # None: not applicable or failed
    reasons: dict[str, str] = field(default_factory=dict)  # scorer -> why its score is None

    def row(self, scorers: list[str]) -> dict:
        return {"backbone": self.backbone, "pretrained": self.pretrained,
                **{name: self.scores.get(name) for name in scorers},
                "num_features": self.num_features, "extract_s": round(self.extract_s, 3), "cached": self.cached}


def default_scorers(registries) -> list[str]:
    """Every registered scorer, the built-ins first in their documented order."""
    from .scorers import BUILTIN_SCORERS

    builtin = [s.name for s in BUILTIN_SCORERS]
    return [n for n in builtin if any(s.name == n for s in registries.scorers)] + \
        [s.name for s in registries.scorers if s.name not in builtin]


def default_by(names: list[str]) -> str:
    return "logme" if "logme" in names else names[0]


def check_scorers(registries, names: list[str]) -> list:
    if not names:
        raise UserError("--scorers is empty; give at least one scorer (see `autotransfer plugins`)")
    return [registries.scorer(name) for name in names]


def score_backbones(prepared: Prepared, scorer_names: list[str], backbones: list[str] | None = None,
                    say: Callable[[str], None] = lambda message: None) -> list[BackboneScores]:
    """Score every backbone of a prepared search (prepared.py) on its training split; features are cached
    under the run folder, keyed by weights, pixels and preprocessing. `say` gets a line per backbone."""

    scorers = check_scorers(prepared.registries, scorer_names)
    cache = FeatureCache(prepared.out / FEATURES_DIR)
    results = []
    for name in backbones or prepared.config.backbones:
        provider = provider_for(name, prepared.registries)
        request = prepared.weights_for(name)
        backbone = provider.create(name, request)
        head = provider.source_classifier(name, request) if hasattr(provider, "source_classifier") else None
        inputs = prepared.inputs_for(name)
        images = prepared.data.train.at_size(inputs.resize_size)
        say(f"scoring {name}: features of {len(images)} train images at {inputs.image_size} px")
        found = extract(backbone.module, head, images, inputs, prepared.device, cache,
                        meta={"backbone": name, "weights": backbone.source})
        say(f"  {name}: features {'read from the cache' if found.cached else f'extracted in {found.seconds:.1f}s'}")
        result = BackboneScores(name, weights_label(request, backbone.source), backbone.num_features,
                                found.seconds, found.cached)
        for scorer in scorers:
            result.scores[scorer.name], reason = _score_one(scorer, found, name)
            if reason:
                result.reasons[scorer.name] = reason
        results.append(result)
        del backbone
    return results


def _score_one(scorer, found, backbone: str) -> tuple[float | None, str | None]:
    """The score, or None and the reason it is missing."""
    try:
        value = scorer(found.features, found.labels, found.source_probs)
    except NotApplicable as exc:
        return None, str(exc)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
        log.warning("scorer %s failed on %s: %s", scorer.name, backbone, exc)
        return None, f"failed: {exc}"
    return (value, None) if math.isfinite(value) else (None, f"non-finite value {value}")


def not_applicable_notes(results: list[BackboneScores]) -> list[str]:
    """One line per distinct reason a score is n/a, naming the backbones it hit."""
    hit: dict[str, list[str]] = {}
    for result in results:
        for reason in result.reasons.values():
            hit.setdefault(reason, []).append(result.backbone)
    return [f"n/a on {', '.join(dict.fromkeys(backbones))}: {reason}" for reason, backbones in hit.items()]


def rank_frame(results: list[BackboneScores], scorers: list[str], by: str) -> pd.DataFrame:
    """Backbones x scores, best first by `by`; backbones where it does not apply come last."""
    frame = pd.DataFrame([r.row(scorers) for r in results])
    order = pd.to_numeric(frame[by], errors="coerce").fillna(-np.inf)
    frame = frame.loc[order.sort_values(ascending=False, kind="stable").index].reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


def to_markdown(frame: pd.DataFrame, scorers: list[str]) -> str:
    shown = frame.copy().astype(object)
    for name in scorers:
        shown[name] = [NOT_APPLICABLE if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
                       for v in frame[name]]
    return shown.to_markdown(index=False, disable_numparse=True)


def top_k(results: list[BackboneScores], by: str, k: int) -> list[str]:
    """The k best backbones by scorer `by`; those it does not apply to are kept only to fill k."""
    ordered = sorted(results, key=lambda r: -math.inf if r.scores.get(by) is None else r.scores[by], reverse=True)
    return [r.backbone for r in ordered[:k]]


def scorer_tau(scores: pd.DataFrame, best: pd.Series, scorers: list[str]) -> pd.DataFrame:
    """Weighted Kendall tau (scipy.stats.weightedtau, top ranks weigh more) between each scorer's
    values and the best validation accuracy each backbone reached, over backbones with both."""
    from scipy.stats import weightedtau

    rows = []
    for name in scorers:
        joined = pd.DataFrame({"score": pd.to_numeric(scores.set_index("backbone")[name], errors="coerce"),
                               "best": best}).dropna()
        tau = float(weightedtau(joined["score"], joined["best"]).statistic) if len(joined) >= 2 else float("nan")
        rows.append({"scorer": name, "weighted_tau": tau, "backbones": len(joined)})
    return pd.DataFrame(rows, columns=["scorer", "weighted_tau", "backbones"])
