"""How a search chooses its model: the rule best/, the closing summary and the benchmark all follow.

A later trial replaces the chosen one when its val accuracy is higher and it trains no more parameters;
a larger one (more trainable parameters: a deeper fine-tune, a bigger head) must be higher by more
than the chosen one's standard error on this val set, sqrt(p (1 - p) / n) for accuracy p on n images.
This is the one-standard-error rule (Breiman et al., 1984) in the order trials finish: within the noise
of the val set, prefer the simpler model. On a small val set one image is several points: without the
margin, the more trials a search runs the more surely it picks a larger model that was lucky on val
(the winner's curse), and a 49-image val set made the search choose a fine-tune one image ahead of
the probe that was 8 points behind it on test (benchmarks/results/issue16.csv). Between models of
the same size (two backbones' probes, a probe at another C) nothing favours the earlier one, so the
higher val wins. On a large val set the margin shrinks to nothing and the rule is "best val wins".
A size that is not known (a model saved before sizes were recorded) counts as larger.

Invariant: a pure function of (the chosen trial's accuracy and size, the challenger's, the val size);
the chosen trial is the one in best/, never recomputed from the leaderboard's order.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def margin(accuracy: float, val_images: int | None) -> float:
    """The standard error of `accuracy` measured on `val_images` images (0 when the size is unknown)."""
    if not val_images:
        return 0.0
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / val_images)


def replaces(challenger: float, chosen: float | None, val_images: int | None,
             challenger_size: int | None = None, chosen_size: int | None = None) -> bool:
    """Whether a trial with val accuracy `challenger` replaces the chosen one (None: nothing chosen yet);
    the sizes are their trainable parameter counts (see the module docstring)."""
    if chosen is None:
        return True
    if challenger_size is not None and chosen_size is not None and challenger_size <= chosen_size:
        return challenger > chosen
    return challenger > chosen + margin(chosen, val_images)


def chosen_over_time(points: Sequence[tuple], val_images: int | None,
                     size: Callable[[tuple], int | None] = lambda point: None) -> list[tuple]:
    """The anytime curve of a search: from (time, val accuracy, ...) points in completion order, the
    ones that replaced the chosen trial when they finished (what best/ held, and when); `size` gives a
    point's trainable parameter count."""
    curve: list[tuple] = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if not curve or replaces(point[1], curve[-1][1], val_images, size(point), size(curve[-1])):
            curve.append(point)
    return curve
