"""What a search shows on stderr while it runs.

One interface, three forms, chosen once by `make_display`: `LiveDisplay` on a terminal (a tqdm
bar kept at the bottom, `trials k/N`, elapsed, ETA, best so far, the current trial and epoch, with
every message printed above it), `Display` when stderr is a pipe or a file (plain lines, nothing
redrawn, no control characters), and the quiet one for `--quiet` (nothing). The display only
renders what it is told: it reads no storage and changes nothing, so a search behaves the same
whichever form it got.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

FALLBACK_COLUMNS, FALLBACK_ROWS = 120, 24

if TYPE_CHECKING:
    from .space import TrialParams
    from .trainer import EpochStats


def trial_line(number: int, params: "TrialParams") -> str:
    """One line naming what trial `number` trains."""
    head = params.head.kind + (f"({params.head.hidden}, p={params.head.dropout:.2f})" if params.head.kind == "mlp" else "")
    frozen = f"{params.backbone} frozen {params.frozen_stages}/{params.num_stages}"
    if params.probe:
        features = " on every stage's features" if params.features == "stages" else ""
        c = "C by CV on train" if params.probe_c is None else f"C {params.probe_c:g}"
        return f"trial {number}: {frozen} head linear: logistic-regression probe{features} ({c})"
    start = " from the probe (LP-FT)" if params.head_init == "probe" else ""
    return f"trial {number}: {frozen} head {head}{start} {params.optimizer} lr {params.lr:.2e}"


class Display:
    """Plain lines: what a piped or logged run gets."""

    def __init__(self, total: int | None = None, finished: int = 0, stream: TextIO | None = None):
        self.total, self.finished = total, finished
        self.stream = stream
        self.best: tuple[float, int] | None = None  # (value, trial)

    def say(self, message: str) -> None:
        print(message, file=self.stream or sys.stderr, flush=True)

    def trial_started(self, number: int, params: "TrialParams") -> None:
        self.say(trial_line(number, params))

    def path(self, number: int, mode: str, note: str) -> None:
        self.say(f"  trial {number}: {mode} path" + (f" ({note})" if note else ""))

    def epoch(self, number: int, stats: "EpochStats", epochs: int, best: float | None) -> None:
        best_text = "-" if best is None else f"{best:.4f}"
        self.say(f"  trial {number} epoch {stats.epoch}/{epochs}: loss {stats.train_loss:.4f} "
                 f"val_acc {stats.val_accuracy:.4f} ({stats.seconds:.1f}s) best {best_text}")

    def trial_finished(self, finished: int, best: tuple[float, int] | None) -> None:
        """`finished` trials of the study are done (complete or pruned); `best` is (value, trial)."""
        self.finished, self.best = finished, best

    def close(self) -> None:
        pass


class QuietDisplay(Display):
    """`--quiet`: nothing."""

    def say(self, message: str) -> None:
        pass


class LiveDisplay(Display):
    """A tqdm bar on a terminal: trials k/N, elapsed, ETA, best so far and what runs now."""

    BAR = "{desc} {n_fmt}/{total_fmt} |{bar:16}| {elapsed} elapsed, ETA {remaining}{postfix}"

    def __init__(self, total: int | None = None, finished: int = 0, stream: TextIO | None = None):
        super().__init__(total, finished, stream)
        self.bar = None
        self.now = ""

    def _ensure_bar(self):
        if self.bar is None:
            from tqdm import tqdm

            stream = self.stream or sys.stderr
            sized = _columns(stream) > 0  # a terminal that reports no size (a bare pty) gets a fixed width
            self.bar = tqdm(total=self.total, initial=self.finished, file=stream, desc="trials", bar_format=self.BAR,
                            dynamic_ncols=sized, ncols=None if sized else FALLBACK_COLUMNS,
                            nrows=None if sized else FALLBACK_ROWS, leave=True,
                            mininterval=0.2)
        return self.bar

    def say(self, message: str) -> None:
        if self.bar is None:  # before trial 0: the preparation's lines, no bar yet
            super().say(message)
            return
        from tqdm import tqdm

        tqdm.write(message, file=self.stream or sys.stderr)

    def trial_started(self, number: int, params: "TrialParams") -> None:
        self._ensure_bar()
        super().trial_started(number, params)
        self.now = f"trial {number}: {params.backbone}"
        self._refresh()

    def epoch(self, number: int, stats: "EpochStats", epochs: int, best: float | None) -> None:
        super().epoch(number, stats, epochs, best)
        self.now = f"trial {number} epoch {stats.epoch}/{epochs}"
        self._refresh()

    def trial_finished(self, finished: int, best: tuple[float, int] | None) -> None:
        super().trial_finished(finished, best)
        bar = self._ensure_bar()
        bar.update(max(0, finished - bar.n))
        self.now = ""
        self._refresh()

    def _refresh(self) -> None:
        bar = self._ensure_bar()
        best = "best -" if self.best is None else f"best {self.best[0]:.4f} (trial {self.best[1]})"
        bar.set_postfix_str(best + (f", now {self.now}" if self.now else ""), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def make_display(quiet: bool, total: int | None, finished: int = 0, stream: TextIO | None = None,
                 live: bool | None = None) -> Display:
    """Quiet, live on a terminal, plain lines otherwise; `live` overrides the terminal check."""
    stream = stream or sys.stderr
    if quiet:
        return QuietDisplay(total, finished, stream)
    if live is None:
        live = bool(getattr(stream, "isatty", lambda: False)())
    return (LiveDisplay if live else Display)(total, finished, stream)
