"""`search --workers N`: N local `autotransfer worker` processes on one study, pinned one GPU each.

The processes are the same `autotransfer worker` a cluster runs, so one machine and many behave
alike; this module only plans their devices and threads, starts them, relays their output with a
`[worker i]` prefix and waits for them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from .errors import UserError


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    gpu: str | None  # CUDA_VISIBLE_DEVICES for the process; None: CPU, or whatever --device says
    threads: int  # CPU threads, so N workers do not oversubscribe the cores


def parse_gpus(text: str | None, visible: int) -> list[str]:
    """`--gpus 0,2`; default every visible GPU (none on a CPU-only machine)."""
    from .config import parse_list  # not at the top: a worker's entry (entry.run) imports this module

    if text is None:
        return [str(i) for i in range(visible)]
    tokens = parse_list(text)
    if not tokens or not all(t.isdigit() for t in tokens) or len(set(tokens)) != len(tokens):
        raise UserError(f"--gpus {text!r}: give distinct GPU indices, e.g. --gpus 0,1")
    if visible == 0:
        raise UserError(f"--gpus {text} given but CUDA sees no GPU; leave out --gpus to run the workers on CPU")
    bad = [t for t in tokens if int(t) >= visible]
    if bad:
        raise UserError(f"--gpus {text}: GPU {bad[0]} does not exist ({visible} visible: 0-{visible - 1})")
    return tokens


def plan_workers(workers: int | None, gpus: list[str], per_gpu: int | None, cores: int) -> list[WorkerPlan]:
    """Round robin over the GPUs, at most `per_gpu` workers on each; without GPUs, share the cores."""
    if per_gpu is not None and per_gpu < 1:
        raise UserError(f"--trials-per-gpu must be at least 1, got {per_gpu}")
    if workers is None:
        if not gpus:
            raise UserError("--trials-per-gpu needs GPUs; give --workers N to run N workers on CPU")
        workers = len(gpus) * (per_gpu or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    threads = max(1, cores // workers)
    if not gpus:
        return [WorkerPlan(i, None, threads) for i in range(workers)]
    needed = math.ceil(workers / len(gpus))
    if needed > (per_gpu or 1):
        raise UserError(f"--workers {workers} on {len(gpus)} GPU(s) puts {needed} workers on a GPU; "
                        f"add --trials-per-gpu {needed} (small models) or lower --workers")
    return [WorkerPlan(i, gpus[i % len(gpus)], threads) for i in range(workers)]


@dataclass
class LocalWorkers:
    """The planned local workers of one `search --workers N`, and how they ended."""

    plans: list[WorkerPlan]
    codes: list[int] = field(default_factory=list)

    @classmethod
    def plan(cls, workers: int | None, gpus: str | None, per_gpu: int | None, device: str) -> "LocalWorkers":
        if device == "cpu":
            if gpus is not None:
                raise UserError("--gpus with --device cpu: leave out one of them")
            return cls(plan_workers(workers, [], per_gpu, os.cpu_count() or 1))
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(plan_workers(workers, parse_gpus(gpus, visible), per_gpu, os.cpu_count() or 1))

    def bind(self, options: Any) -> Callable[[Any], None]:
        """What `Search.run` calls once the study exists: start the workers on it (with the run `options`:
        storage, study, output folder, plugins) and wait."""
        def run(study: Any) -> None:
            pinned = any(plan.gpu is not None for plan in self.plans)
            args = ["--storage", options.storage, "--study", options.study_name, "--out", str(options.out),
                    "--heartbeat", str(options.heartbeat_s), "--device", "cuda" if pinned else options.device]
            for plugin in options.plugins:
                args += ["--plugin", plugin]
            if options.quiet:
                args.append("--quiet")
            cache = getattr(options, "data_cache", None)
            args += ["--data-cache", str(cache)] if cache is not None else ["--no-data-cache"]
            self.codes = launch(self.plans, args)
        return run

    def status(self) -> int:
        """0 when every worker succeeded; else one line per failed worker and the first failure's status."""
        failed = [(i, code) for i, code in enumerate(self.codes) if code != 0]
        for index, code in failed:
            print(f"autotransfer: worker {index} exited with status {code}", file=sys.stderr)
        return 0 if not failed else (failed[0][1] if failed[0][1] > 0 else 1)


# `python -m` (and `-c`) put the current folder first on sys.path, so a `tabulate.py` lying there would be
# imported by the worker (or the warm server, warm.py); drop it, so they load installed code and explicit
# --plugin files only.
CLEAN_PATH = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
WORKER_ENTRY = (CLEAN_PATH + "from autotransfer.launch import supervised; supervised(); "
                "from autotransfer.entry import run; run(sys.argv[1:])")
PARENT_ENV = "AUTOTRANSFER_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_supervised = False


def supervised() -> None:
    """In a worker started by `launch`: stop (SIGTERM, taken like Ctrl-C) when the parent dies, however it
    dies, instead of running on unsupervised; and once the parent is gone, drop output instead of failing
    the trial on a broken pipe."""
    global _supervised
    parent = int(os.environ.pop(PARENT_ENV, "0") or 0)
    if not parent:
        return
    _supervised = True
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        sys.exit(128 + signal.SIGTERM)
    sys.stderr = _ToParent(sys.stderr)


def adopt_supervision() -> None:
    """In a worker's command forked by the warm server (warm.py) for a supervised caller: speak and write as a
    supervised worker. The caller keeps the parent-death signal, which it forwards."""
    global _supervised
    _supervised = True
    sys.stderr = _ToParent(sys.stderr)


def is_supervised() -> bool:
    """Whether this process is a worker of `search --workers`, whose parent speaks for it on exit."""
    return _supervised


class _ToParent:
    """stderr of a supervised worker: a pipe to the parent; writes after the parent is gone are dropped."""

    def __init__(self, stream: IO[str]):
        self._stream, self._gone = stream, False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, OSError):
                self._gone = True
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, OSError):
                self._gone = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def launch(plans: list[WorkerPlan], worker_args: list[str]) -> list[int]:
    """Start `autotransfer worker` per plan and wait. Ctrl-C or SIGTERM is passed on, once, to each worker
    (as SIGTERM), which records its running trial as interrupted, re-queues it and exits; then the stop is
    re-raised.
    A worker whose parent dies (even by SIGKILL) gets SIGTERM (`supervised`). Returns the exit statuses."""
    from .worker import stop_on_sigterm

    processes: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    restore = stop_on_sigterm()
    try:
        for plan in plans:
            env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), PARENT_ENV: str(os.getpid())}
            if plan.gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = plan.gpu
            command = [sys.executable, "-c", WORKER_ENTRY, "worker", *worker_args, "--threads", str(plan.threads)]
            # Own session: a terminal's Ctrl-C reaches only this process, which forwards exactly one signal.
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True)
            relay = threading.Thread(target=_relay, args=(process.stderr, f"[worker {plan.index}] "), daemon=True)
            relay.start()
            processes.append(process)
            relays.append(relay)
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        # SIGTERM whatever stopped this process: workers take it like Ctrl-C, and unlike SIGINT no shell
        # starts a background job with it ignored (workers inherit what their parent ignores).
        forward = signal.SIGTERM
        ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:  # let the workers finish recording; a second Ctrl-C does not cut that short
            for process in processes:
                if process.poll() is None:
                    process.send_signal(forward)
            for process in processes:
                process.wait()
            for relay in relays:
                relay.join(timeout=5)
        finally:
            for sig, handler in ignored.items():
                signal.signal(sig, handler)
        raise
    finally:
        restore()
    for relay in relays:
        relay.join()
    return codes


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stderr.write(prefix + line)
        sys.stderr.flush()
