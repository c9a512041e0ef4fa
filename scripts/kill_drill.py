"""Kill drill: distributed workers survive kill -9 and a frozen machine, and the budget stays exact.

What it proves (the acceptance point, literally): a repeated-kill run -- 3 workers on PostgreSQL,
12 trials, at least 3 kill -9 plus one SIGSTOP/SIGCONT -- ends with exactly 12 finished trials, no
duplicate configurations among the first 3, no traceback in any worker log, and every failed
trial with a reason. It also checks that no trial is left RUNNING and that the frozen worker
noticed its trial was taken over and went on.

How: a fresh study (`autotransfer search --create-only`, the tests' tiny setup on builtin:digits,
epochs slowed by tests/plugin_examples/slow_epochs_plugin.py so kills land mid-trial), 3
`autotransfer worker`s logging to their own files; a mid-trial worker (read from the study: a
RUNNING trial's user attr "worker" is "host:pid") is SIGKILLed 3 times, each replaced, and one is
SIGSTOPped until the others' heartbeat check fails its trial (> grace = 3 x --heartbeat), then
SIGCONTed. Then optuna (and `autotransfer leaderboard`, for the reasons a user sees) are checked.

Run (from the repository root; with-postgres.sh starts a throwaway server and sets the URL):
    bash scripts/with-postgres.sh .venv/bin/python scripts/kill_drill.py
or against your own server: .venv/bin/python scripts/kill_drill.py --storage postgresql+psycopg2://...
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parent.parent
SLOW_PLUGIN = ROOT / "tests" / "plugin_examples" / "slow_epochs_plugin.py"
TINY = ["--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained", "--image-size", "16",
        "--frozen-stages", "2-4", "--pruner", "none"]
WORKER_ATTR = "worker"  # autotransfer.worker.WORKER_ATTR (not imported: that would load torch here)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PLAN = ["SIGKILL", "SIGKILL", "SIGSTOP", "SIGKILL"]


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path
    killed: bool = False


@dataclass
class Drill:
    storage: str
    study_name: str
    out: Path
    epochs: int
    heartbeat: int
    started: float = field(default_factory=time.monotonic)
    workers: list[Worker] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    stopped_pid: int | None = None
    held_s: float = 0.0

    def note(self, signal_name: str, pid: int, trial: int | str, detail: str = "") -> None:
        line = f"t={time.monotonic() - self.started:6.1f}s  {signal_name:<8} pid {pid:<7} trial {trial:<4} {detail}"
        self.events.append(line.rstrip())

    def start_worker(self) -> Worker:
        index = len(self.workers)
        log = self.out / f"worker-{index}.log"
        env = {**os.environ, "SLOW_EPOCH_S": os.environ.get("SLOW_EPOCH_S", "1.5")}
        with open(log, "w") as handle:
            process = subprocess.Popen(cli("worker", "--storage", self.storage, "--study", self.study_name,
                                           "--out", str(self.out / "run"), "--heartbeat", str(self.heartbeat),
                                           "--threads", "1", "--plugin", str(SLOW_PLUGIN)),
                                       stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        worker = Worker(process, log)
        self.workers.append(worker)
        self.note("START", process.pid, "-", f"worker-{index}.log")
        return worker

    def victim(self, study: optuna.Study, exclude: int | None) -> tuple[FrozenTrial, Worker] | None:
        """A RUNNING trial past its first epoch and before its last, in one of our live workers; none
        before trials 0-2 exist (a retry numbered below 3 would repeat a configuration by design)."""
        alive = {w.process.pid: w for w in self.workers if w.process.poll() is None and w.process.pid != exclude}
        trials = study.get_trials(deepcopy=False)
        for trial in trials if len(trials) >= 3 else []:
            done = trial.user_attrs.get("epochs_done", 0)
            pid = int(str(trial.user_attrs.get(WORKER_ATTR, ":0")).rsplit(":", 1)[1])
            if trial.state == TrialState.RUNNING and 1 <= done <= self.epochs - 2 and pid in alive:
                return trial, alive[pid]
        return None

    def state_of(self, study: optuna.Study, number: int) -> FrozenTrial:
        return next(t for t in study.get_trials(deepcopy=False) if t.number == number)

    def freeze_mid_trial(self, study: optuna.Study, exclude: int | None) -> tuple[FrozenTrial, Worker] | None:
        """SIGSTOP first, then confirm the trial is still RUNNING: "mid-trial" is then certain."""
        found = self.victim(study, exclude)
        if found is None:
            return None
        trial, worker = found
        worker.process.send_signal(signal.SIGSTOP)
        if self.state_of(study, trial.number).state == TrialState.RUNNING:
            return found
        worker.process.send_signal(signal.SIGCONT)
        return None

    def run_plan(self, study: optuna.Study, deadline: float) -> None:
        grace = 3 * self.heartbeat
        last = 0.0
        for step in PLAN:
            while time.monotonic() < deadline:
                if all(w.process.poll() is not None for w in self.workers):
                    return
                time.sleep(0.5)
                if time.monotonic() - last < 3:
                    continue
                found = self.freeze_mid_trial(study, exclude=self.stopped_pid)
                if found is None:
                    continue
                trial, worker = found
                epoch = trial.user_attrs.get("epochs_done")
                if step == "SIGKILL":
                    worker.process.send_signal(signal.SIGKILL)
                    worker.process.wait()
                    worker.killed = True
                    self.note("SIGKILL", worker.process.pid, trial.number, f"at epoch {epoch}/{self.epochs}")
                    self.start_worker()
                else:
                    self.stopped_pid = worker.process.pid
                    self.note("SIGSTOP", worker.process.pid, trial.number, f"at epoch {epoch}/{self.epochs}")
                    held = time.monotonic()
                    while time.monotonic() - held < 120:
                        time.sleep(0.5)
                        taken = self.state_of(study, trial.number).state != TrialState.RUNNING
                        if taken and time.monotonic() - held > grace + 2:
                            break
                    self.held_s = time.monotonic() - held
                    state = self.state_of(study, trial.number).state.name
                    worker.process.send_signal(signal.SIGCONT)
                    self.note("SIGCONT", worker.process.pid, trial.number,
                              f"after {self.held_s:.1f}s stopped (grace {grace}s); trial now {state}")
                last = time.monotonic()
                break


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "autotransfer.cli", *args]


def digest(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def first_traceback(log: Path) -> str | None:
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "Traceback" in line:
            return "\n".join(f"    | {text}" for text in lines[max(0, i - 2):i + 18])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("AUTOTRANSFER_TEST_POSTGRES_URL"),
                        help="PostgreSQL URL (default $AUTOTRANSFER_TEST_POSTGRES_URL)")
    parser.add_argument("--out", type=Path, help="folder for logs and the run (default: a new temporary folder)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--heartbeat", type=int, default=2)
    parser.add_argument("--limit", type=float, default=600, help="seconds before the drill gives up on the workers")
    args = parser.parse_args()
    if not args.storage:
        parser.error("give --storage URL or run through scripts/with-postgres.sh")
    out = args.out or Path(tempfile.mkdtemp(prefix="kill-drill-"))
    out.mkdir(parents=True, exist_ok=True)
    drill = Drill(args.storage, f"kill-drill-{uuid.uuid4().hex[:8]}", out, args.epochs, args.heartbeat)
    print(f"kill drill: study {drill.study_name}, {args.trials} trials x {args.epochs} epochs, 3 workers, "
          f"--heartbeat {args.heartbeat} (grace {3 * args.heartbeat}s); logs in {out}", flush=True)
    created = subprocess.run(cli("search", *TINY, "--epochs", str(args.epochs), "--trials", str(args.trials),
                                 "--storage", args.storage, "--study", drill.study_name, "--out", str(out / "run"),
                                 "--heartbeat", str(args.heartbeat), "--create-only", "--quiet"),
                             capture_output=True, text=True, cwd=ROOT)
    if created.returncode != 0:
        print(f"could not create the study:\n{created.stderr}")
        return 1
    study = optuna.load_study(study_name=drill.study_name, storage=args.storage)
    deadline = time.monotonic() + args.limit
    for _ in range(3):
        drill.start_worker()
    try:
        drill.run_plan(study, deadline)
        for worker in drill.workers:
            if not worker.killed:
                worker.process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print("  workers still running at --limit: killing them (checks below will fail)")
    finally:
        for worker in drill.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGCONT)
                worker.process.kill()
                worker.process.wait()
    wall = time.monotonic() - drill.started

    trials = sorted(optuna.load_study(study_name=drill.study_name, storage=args.storage).get_trials(),
                    key=lambda t: t.number)
    board = subprocess.run(cli("leaderboard", "--storage", args.storage, "--study", drill.study_name, "--format",
                               "csv"), capture_output=True, text=True, cwd=ROOT)
    shown = pd.read_csv(io.StringIO(board.stdout)) if board.returncode == 0 else pd.DataFrame(columns=["trial"])
    board_reason = {int(r.trial): ("" if pd.isna(r.reason) else str(r.reason)) for r in shown.itertuples()}

    print("\nevents:")
    for line in drill.events:
        print("  " + line)
    print("\ntrials:")
    print(f"  {'#':>3} {'state':<8} {'pid':<7} {'params':<8} {'retry of':<8} reason (leaderboard; * = raw attr empty)")
    for t in trials:
        pid = str(t.user_attrs.get(WORKER_ATTR, ":-")).rsplit(":", 1)[1]
        raw = t.user_attrs.get("reason", "")
        reason = board_reason.get(t.number, "<not on leaderboard>")
        mark = "*" if t.state == TrialState.FAIL and not raw else " "
        retry = str((t.system_attrs.get("retry_history") or [""])[-1])  # the trial this one directly retries
        print(f"  {t.number:>3} {t.state.name:<8} {pid:<7} {digest(t.params):<8} {retry:<8} {mark}{reason[:90]}")

    finished = [t for t in trials if t.state in FINISHED]
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    first = [digest(t.params) for t in trials[:3]]
    kills = sum(" SIGKILL " in e for e in drill.events)
    stopped = next((w for w in drill.workers if w.process.pid == drill.stopped_pid), None)
    tracebacks = {w.log.name: tb for w in drill.workers if (tb := first_traceback(w.log)) is not None}
    failed = [t for t in trials if t.state == TrialState.FAIL]
    no_reason = [t.number for t in failed if not board_reason.get(t.number)]
    raw_empty = [t.number for t in failed if not t.user_attrs.get("reason")]
    unkilled_bad = [f"{w.log.name}: rc {w.process.returncode}" for w in drill.workers
                    if not w.killed and w.process.returncode != 0]
    went_on = stopped is not None and stopped.process.returncode == 0 and "taken over" in stopped.log.read_text()
    checks = [
        (f"faults caused: {kills} x SIGKILL mid-trial (need >= 3), SIGSTOP held {drill.held_s:.1f}s "
         f"> grace {3 * args.heartbeat}s then SIGCONT", kills >= 3 and drill.held_s > 3 * args.heartbeat),
        (f"exactly {args.trials} finished trials (COMPLETE or PRUNED): {len(finished)}", len(finished) == args.trials),
        (f"no trial left RUNNING: {running or 'none'}", not running),
        (f"first 3 trials' configurations pairwise distinct: {first}", len(set(first)) == 3 == len(first)),
        (f"no 'Traceback' in any of {len(drill.workers)} worker logs: {sorted(tracebacks) or 'none'}",
         not tracebacks),
        (f"every FAIL trial has a reason on the leaderboard: {len(failed)} failed, without: {no_reason or 'none'} "
         f"(raw user_attr 'reason' empty for {raw_empty or 'none'}; filled by leaderboard._reason)",
         board.returncode == 0 and not no_reason),
        (f"SIGSTOPped worker noticed the takeover and went on (log says 'taken over', exit 0): "
         f"{'yes' if went_on else 'no'}", went_on),
        (f"every worker not killed exited 0: {unkilled_bad or 'yes'}", not unkilled_bad),
    ]
    print("\nchecks:")
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    for name, tb in tracebacks.items():
        print(f"\nfirst traceback in {name}:\n{tb}")
    if board.returncode != 0:
        print(f"\nautotransfer leaderboard failed ({board.returncode}):\n{board.stderr}")
    passed = all(ok for _, ok in checks)
    print(f"\n{'PASS' if passed else 'FAIL'}: kill drill in {wall:.0f}s; logs and run folder: {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
