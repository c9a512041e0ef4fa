"""How a search chooses its model: the rule best/, the closing summary and the benchmark all follow.

A later trial replaces the chosen one only when its val accuracy is higher by more than the chosen
one's standard error on this val set, sqrt(p (1 - p) / n) for accuracy p on n images. On a small
val set one image is several points: without the margin, the more trials a search runs the more
surely it picks one that was lucky on val (the winner's curse), and a 49-image val set made the
search choose a fine-tune one image ahead of the probe that was 8 points behind it on test
(benchmarks/results/issue16.csv). Trials run cheapest first (the opening's probes, then its expensive
recipes), so a near-tie stays with the cheaper trial. On a large val set the margin shrinks to
nothing and the rule is "best val wins".

Invariant: a pure function of (the chosen trial's accuracy, the challenger's, the val size); the
chosen trial is the one in best/, never recomputed from the leaderboard's order.
"""

from __future__ import annotations

import math
from typing import Sequence


def margin(accuracy: float, val_images: int | None) -> float:
    """The standard error of `accuracy` measured on `val_images` images (0 when the size is unknown)."""
    if not val_images:
        return 0.0
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / val_images)


def replaces(challenger: float, chosen: float | None, val_images: int | None) -> bool:
    """Whether a trial with val accuracy `challenger` replaces the chosen one (None: nothing chosen yet)."""
    return chosen is None or challenger > chosen + margin(chosen, val_images)


def chosen_over_time(points: Sequence[tuple], val_images: int | None) -> list[tuple]:
    """The anytime curve of a search: from (time, val accuracy, ...) points in completion order, the
    ones that replaced the chosen trial when they finished (what best/ held, and when)."""
    curve: list[tuple] = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if replaces(point[1], curve[-1][1] if curve else None, val_images):
            curve.append(point)
    return curve
