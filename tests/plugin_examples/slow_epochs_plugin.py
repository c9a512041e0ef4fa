"""A plugin that makes every epoch last at least SLOW_EPOCH_S seconds (default 0.5; the tests set more).

The crash-safety tests stop a worker in the middle of a trial. On the tiny test models an epoch
of a cached trial takes milliseconds, so without a floor a trial can finish between two polls of
the storage; with it, "running, past its first epoch" is a state that lasts long enough to hit.
"""

from __future__ import annotations

import os
import time

from autotransfer.hookspecs import hookimpl


@hookimpl
def autotransfer_epoch_ended(trial, epoch) -> None:
    time.sleep(max(0.0, float(os.environ.get("SLOW_EPOCH_S", "0.5")) - epoch.seconds))
