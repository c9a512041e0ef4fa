"""Workers: processes that take trials from one shared study until its budget is spent.

There is no scheduler: every worker runs the same loop against the Optuna storage. The budget
(`--trials N` finished trials) is kept exact without a lock because the storage numbers trials
one at a time (Optuna locks the study row), so all workers agree on their order: a trial runs
only if fewer than N live trials (finished, running or queued) precede it, and otherwise it is
recorded as failed with reason `surplus` before any work. Finished trials of other workers are
never lost: a worker that dies stops sending heartbeats, its trial is failed after the grace
period and re-queued (Optuna's heartbeat and retry callback), and its retry resumes from the
trial's last per-epoch checkpoint (`resilience.fit`).
"""

from __future__ import annotations

import logging
import re
import os
import signal
import socket
import time
import warnings
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .record import ELAPSED_KEY, INTERRUPTED, TrialRecord, key, write
from .resilience import TrialStateStore, TrialTakenOver, checkpoint_key
from .storage import grace_period

ELAPSED_ATTR = ELAPSED_KEY  # on the study: search seconds spent over all runs, for --timeout

log = logging.getLogger(__name__)
WORKER_ATTR = key("worker")  # host:pid of the process running the trial; marks trials that send heartbeats
POLL_S = 2.0
SURPLUS = "surplus: other workers filled the --trials budget first; not run"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STOPS = ("trials", "timeout", "exhausted", "failures")  # why a worker loop ends: the budget, --timeout, the space, errors


class SurplusTrial(Exception):
    """This trial would exceed the budget; it is failed before any work."""


class DuplicateTrial(Exception):
    """This trial drew a configuration another trial already ran or is running; it is failed before any work."""


DUPLICATE = "duplicate:"
MAX_DUPLICATES = 20  # draws in a row that repeat a tried configuration: the space is exhausted


def duplicate_of(trials: list[FrozenTrial], number: int, params: dict[str, Any]) -> int | None:
    """The number of a trial with exactly these `params` that is finished, or running with a lower number
    (of two workers that drew alike at once, the later trial gives way); None when there is none."""
    for other in trials:
        if other.number == number or other.params != params:
            continue
        if other.state in FINISHED or (other.number < number and other.state == TrialState.RUNNING):
            return other.number
    return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_salt() -> int:
    """A sampler-seed offset of this worker process. Workers that open a study at the same moment see
    the same number of trials, so `seed + trials` alone gave them one seed and identical draws."""
    return zlib.crc32(worker_id().encode()) % 1_000_003


# --------------------------------------------------------------------------- the budget

@dataclass(frozen=True)
class Tally:
    finished: int
    running: int
    waiting: int


def live(trial: FrozenTrial, now: datetime, grace_s: float) -> bool:
    """Counts against the budget: finished, queued, or running in a live worker. A RUNNING trial
    without a worker mark is a just-created one (count it) or an orphan from a run without
    heartbeats that nothing will ever finish (ignore it once it is older than the grace period)."""
    if trial.state in FINISHED or trial.state == TrialState.WAITING:
        return True
    if trial.state != TrialState.RUNNING:
        return False
    if WORKER_ATTR in trial.user_attrs or trial.datetime_start is None:
        return True
    return (now - trial.datetime_start).total_seconds() < grace_s


def tally(trials: list[FrozenTrial], grace_s: float) -> Tally:
    now = datetime.now()
    return Tally(finished=sum(t.state in FINISHED for t in trials),
                 running=sum(t.state == TrialState.RUNNING and live(t, now, grace_s) for t in trials),
                 waiting=sum(t.state == TrialState.WAITING for t in trials))


def admitted(trials: list[FrozenTrial], number: int, budget: int | None, grace_s: float) -> bool:
    """Whether trial `number` fits: fewer than `budget` live trials have a lower number."""
    if budget is None:
        return True
    now = datetime.now()
    return sum(t.number < number and live(t, now, grace_s) for t in trials) < budget


# --------------------------------------------------------------------------- the loop

@dataclass(frozen=True)
class Budget:
    """What this run may spend: finished trials in the study, and seconds of this run (None: no limit);
    `elapsed_before` is what earlier runs of the study spent, stored back in the study after each trial."""

    trials: int | None
    timeout: float | None = None
    elapsed_before: float = 0.0


@dataclass
class WorkerLoop:
    """Runs `objective` on trials of `study` until the budget or the timeout is spent. It knows nothing
    of the driver: the objective is any callable of an Optuna trial, `out` the folder the trials'
    checkpoints live under (resilience.TrialStateStore), `say` where progress lines go."""

    objective: Callable[[optuna.Trial], float]
    study: optuna.Study
    budget: Budget
    out: Path
    say: Callable[[str], None]
    heartbeat_s: int
    before_trial: Callable[[optuna.Study], None] = lambda study: None  # e.g. queue the opening's next stage
    after_trial: Callable[[optuna.Study], None] = lambda study: None  # e.g. update a progress display

    def __post_init__(self) -> None:
        self.trials: int | None = self.budget.trials
        self.grace_s = float(grace_period(self.heartbeat_s or 1))
        self.started = time.monotonic()
        self.failures = 0
        self.max_failures = max(3, self.trials or 10)
        self.stopped = ""  # why the loop stopped early (STOPS), "" while it runs
        self.duplicates = 0  # in a row
        self.current: int | None = None  # the trial this worker runs, for Ctrl-C
        self.stopping: KeyboardInterrupt | None = None  # a Ctrl-C or SIGTERM seen inside a trial

    def run(self) -> str:
        """Run trials until the loop stops; returns why (one of STOPS)."""
        waiting_said = False
        while not self.stopped:
            fail_stale(self.study)
            self.before_trial(self.study)
            counts = tally(self.study.get_trials(deepcopy=False), self.grace_s)
            if self.trials is not None and counts.finished >= self.trials:
                return "trials"
            if self.budget.timeout is not None and time.monotonic() - self.started >= self.budget.timeout:
                return "timeout"
            if self.trials is not None and not counts.waiting and counts.finished + counts.running >= self.trials:
                if not waiting_said:  # the budget is in other workers' hands unless one of them dies
                    self.say(f"waiting for {counts.running} trial(s) running in other workers")
                    waiting_said = True
                time.sleep(POLL_S)
                continue
            waiting_said = False
            self._one_trial()
        return self.stopped

    def _one_trial(self) -> None:
        try:
            STOP_GATE.hold()  # until the objective runs (see _StopGate)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.optimize(self._objective, n_trials=1, callbacks=[self._after_trial],
                                        catch=(Exception,), gc_after_trial=False)
            finally:
                STOP_GATE.release()  # a stop held while Optuna told the trial's end: taken now, between trials
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
            # Our heartbeats stalled past the grace period (a frozen or overloaded machine): another worker
            # failed the trial and re-queued it, so Optuna cannot record its end here. Drop the work, go on.
            if not self._current_finished_elsewhere():
                raise
            self.say(f"trial {self.current} was taken over by another worker (this worker's heartbeats "
                              f"were late); dropping its work: {type(exc).__name__}")
            if self.stopping is not None:  # stopped as well: whoever took the trial over re-queued it
                raise self.stopping from None
        except KeyboardInterrupt:
            self._requeue_interrupted()
            raise

    def _objective(self, trial: optuna.Trial) -> float:
        write(trial, worker=worker_id())
        self.current = trial.number
        if not admitted(self.study.get_trials(deepcopy=False), trial.number, self.trials, self.grace_s):
            write(trial, reason=SURPLUS)
            raise SurplusTrial(SURPLUS)
        if TrialRecord.of(trial).checkpoint_key is None:
            write(trial, checkpoint_key=trial.number)
        if TrialRecord.of(trial).reason:  # inherited from the failed run this one retries
            write(trial, reason="")
        try:
            STOP_GATE.release()  # a stop that came while Optuna created this trial is taken here, and recorded
            try:
                return self.objective(trial)
            finally:
                STOP_GATE.hold()  # and one that comes while Optuna tells its end waits for that
        except KeyboardInterrupt as stop:
            self.stopping = stop  # kept: if the trial was taken over meanwhile, recording fails, the stop must not
            write(trial, reason=f"{INTERRUPTED}: stopped by the user; its checkpoint is kept for the re-run")
            raise

    def _after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            self._tell(study, trial)
        finally:
            self.after_trial(study)

    def _tell(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study.set_user_attr(ELAPSED_ATTR, self.budget.elapsed_before + time.monotonic() - self.started)
        reason = TrialRecord.of(trial).reason
        if reason != SURPLUS and not reason.startswith(DUPLICATE):
            TrialStateStore.for_key(self.out, checkpoint_key(trial.user_attrs, trial.number)).clear()
        if reason.startswith(DUPLICATE):
            self.duplicates += 1
            self.say(f"trial {trial.number} not run: {reason[len(DUPLICATE):].strip()}")
            if self.duplicates >= MAX_DUPLICATES:
                self.say(f"stopping: {self.duplicates} draws in a row repeated configurations already "
                                  "tried; the search space looks exhausted (widen it, or lower --trials)")
                self.stopped = "exhausted"
            return
        self.duplicates = 0
        if trial.state == TrialState.FAIL:
            if reason == SURPLUS:
                self.say(f"trial {trial.number} not run: the budget is full")
                return
            self.failures += 1
            self.say(f"trial {trial.number} failed: {reason or 'unknown error'}")
            if self.failures >= self.max_failures:
                self.say(f"stopping: {self.failures} trials failed in this run")
                self.stopped = "failures"
        elif trial.state == TrialState.PRUNED:
            self.say(f"trial {trial.number} pruned: {reason}")
        else:
            self.say(f"trial {trial.number} done: val_acc {trial.value:.4f}")

    def _current_finished_elsewhere(self) -> bool:
        if self.current is None:
            return False
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.current), None)
        return frozen is not None and frozen.state == TrialState.FAIL and not TrialRecord.of(frozen).reason

    def _requeue_interrupted(self) -> None:
        """Queue a copy of the interrupted trial, as the heartbeat retry would, so a re-run resumes it."""
        if self.current is None:
            return
        frozen = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.current), None)
        if frozen is None or frozen.state != TrialState.FAIL or not TrialRecord.of(frozen).reason.startswith(INTERRUPTED):
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback()(self.study, frozen)


def fail_stale(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


_FAILED_WITH_VALUE = re.compile(r"Trial \d+ failed with value ")


class _QuietExpectedFailures(logging.Filter):
    """Optuna logs every failed trial with its traceback; a surplus, duplicate, interrupted or taken-over
    trial is no error (the worker says what happened in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (SurplusTrial, DuplicateTrial, KeyboardInterrupt, TrialTakenOver)):
            return False
        # Optuna's second line about a failure ("Trial 3 failed with value None."): the worker's own line
        # says what happened (failed with its reason, interrupted, not run), so this one only misleads.
        return not _FAILED_WITH_VALUE.match(record.getMessage())


def quiet_expected_failures() -> None:
    """On Optuna's handlers: a logger's own filters do not see its children's records."""
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _QuietExpectedFailures) for f in handler.filters):
            handler.addFilter(_QuietExpectedFailures())


class Stopped(KeyboardInterrupt):
    """SIGTERM (Slurm preemption, Kubernetes eviction, a parent that is stopping) taken like Ctrl-C: the
    running trial is recorded as interrupted and re-queued. `signum` gives the exit status, 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(stop: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM: what a shell reports for a process those signals ended."""
    return 128 + int(getattr(stop, "signum", signal.SIGINT))


class _StopGate:
    """Where a SIGTERM may raise. Around a trial, Optuna creates it (RUNNING, nothing recorded yet) and
    later tells its end; a stop raised in there leaves a RUNNING trial that nobody records or re-queues.
    So while a trial is in Optuna's hands the stop is held, and raised as the objective starts (where
    it is recorded as interrupted) or once the trial is told."""

    def __init__(self) -> None:
        self.holding = False
        self.pending: int | None = None

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        """Stop holding; raise the stop that came meanwhile, if any."""
        self.holding = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stopped(signum)


STOP_GATE = _StopGate()


def stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM stops like Ctrl-C (raises `Stopped`; held while Optuna books a trial, `_StopGate`), once:
    later ones are ignored, so a repeated signal cannot cut short the recording of the interrupted trial
    (a parent-death signal can arrive once per thread). Returns a function restoring the previous handler."""
    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if STOP_GATE.holding:
            STOP_GATE.pending = signum
            return
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (e.g. inside a test runner's thread): leave it
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
