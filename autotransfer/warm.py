"""Warm start: the `autotransfer` program runs each command in a fork of a server process that has
already imported torch, timm, optuna and this package, so a command starts without their imports.

Invariant: a command run through the warm server behaves as the same command in a fresh process.
It gets the caller's arguments, folder, sys.path, environment, standard streams (the very file
descriptors, so a terminal stays a terminal and a pipe a pipe), umask, rlimits and signal
dispositions; the caller passes its signals on (`TO_GROUP`, `TO_PROCESS`) and ends as the command
ended. A server serves only callers that match it in everything read before a command runs: the
environment but `LATE_ENV` (CUDA is never initialised in the server; OMP_NUM_THREADS is applied in
the fork), the Python and its options, CPU affinity and niceness (thread pools are sized from them
as libraries load), and the size and mtime of this package's files and of the preloaded packages,
so an edit or an upgrade gets a new server. The server runs no command code and makes no CUDA call;
it forks one child per command and reports how it ended. A caller that dies without a word
(SIGKILL) takes its command with it (SIGKILL to the command's process group).

No server yet: the command runs in its own process as before, and when it has imported torch it
starts a server in the background at its exit, for the commands after it. A server exits after
`AUTOTRANSFER_WARM_IDLE_S` seconds (default 600) with no command. `autotransfer server start` starts
one for the current environment and waits until it is ready, `server stop` stops them (running
commands finish first), `server status` lists them; `AUTOTRANSFER_WARM=0` turns all of this off.
Linux only (fork, pidfd_open, descriptor passing); elsewhere commands run as before.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

ENV_SWITCH = "AUTOTRANSFER_WARM"  # "0": no server, every command in its own process
ENV_DIR = "AUTOTRANSFER_WARM_DIR"  # where sockets, locks and pid files live (default: a private /tmp folder)
ENV_IDLE = "AUTOTRANSFER_WARM_IDLE_S"
IDLE_S = 600.0
# Read only once a command runs, so callers may differ in them: the shell's bookkeeping, the terminal's
# size, what `search --workers` sets per worker (launch.py), and the GPUs a process may see (CUDA is
# initialised in the command, never in the server).
LATE_ENV = frozenset({"PWD", "OLDPWD", "_", "SHLVL", "COLUMNS", "LINES", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
                      "AUTOTRANSFER_PARENT_PID"})
# What the server imports before it serves: what a search, worker, rank, predict or pretrain imports before
# its first trial. Missing optional packages are skipped.
PRELOAD = ("numpy", "torch", "torch._dynamo", "torchvision", "timm", "optuna", "optuna.storages", "sqlalchemy",
           "alembic.migration", "alembic.script", "sklearn.linear_model", "sklearn.model_selection",
           "tensorboard", "torch.utils.tensorboard", "PIL.Image", "pluggy")
KEYED_PACKAGES = tuple(sorted({name.split(".")[0] for name in PRELOAD}))  # an upgrade of one: a new server
# What the caller passes on. A terminal sends INT, QUIT and WINCH to its whole foreground group, so they go to
# the command's group; TERM, HUP, USR1 and USR2 are sent to a process (kill, timeout, launch.py's SIGTERM to
# a worker), so they go to the command's process alone. Ctrl-Z (TSTP) stops the command, then the caller.
TO_GROUP = (signal.SIGINT, signal.SIGQUIT, signal.SIGWINCH)
TO_PROCESS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
FORWARDED = TO_GROUP + TO_PROCESS
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_CPU", "RLIMIT_FSIZE")
# What every command sets in its environment before it runs (cli.main), so its children (workers) inherit
# it; set here before the key is taken, so a command and the workers it starts share one server.
ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "3"}  # tensorboard's TensorFlow, when installed, logs nothing
HEADER = struct.Struct("!I")
PID_TIMEOUT_S = 180.0
MAX_REQUEST = 1 << 24
PR_SET_NAME = 15  # linux/prctl.h
SERVER_NAME = "at:server"  # the server's process name (/proc/PID/comm); a command's: process_name()
_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux; longer paths go through the folder (_connect)


def set_environ_defaults() -> None:
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def name_process(name: str) -> None:
    """The process's name in ps, top and /proc/PID/comm (15 bytes kept): forked commands show what they run
    (`at:search`, `at:worker`) instead of the server's command line, which they share."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def process_name(argv: list[str]) -> str:
    """What a served command's process is named (ps, /proc/PID/comm): `at:search`, `at:worker`, ..."""
    return f"at:{argv[0] if argv else 'help'}"[:15]


def supported() -> bool:
    return (sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "pidfd_open")
            and hasattr(os, "fork"))


def enabled(env: dict[str, str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(ENV_SWITCH, "1") != "0" and supported()


# --------------------------------------------------------------------------- where and which server

def folder(env: dict[str, str] | None = None) -> Path:
    """The private folder of this user's servers: $AUTOTRANSFER_WARM_DIR, else under $XDG_RUNTIME_DIR or
    /tmp. Created 0700; one that someone else owns or others may write is refused."""
    env = os.environ if env is None else env
    given = env.get(ENV_DIR)
    if given:
        path = Path(given)
    elif env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "autotransfer-warm"
    else:
        path = Path("/tmp") / f"autotransfer-warm-{os.getuid()}"
    path = path.absolute()  # the server runs elsewhere (cwd /)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not private to this user (owner {info.st_uid}, mode {info.st_mode & 0o777:o})")
    return path


def key(env: dict[str, str]) -> str:
    """Which server may run a command started with `env`: the Python, the environment (but LATE_ENV), and
    the size and mtime of this package's files and of the preloaded packages' entry files."""
    import importlib.util

    digest = hashlib.sha256()
    digest.update(f"{sys.executable}\0{sys.version}\0{_interpreter_options()}\0".encode())
    # OpenMP and BLAS size their thread pools from the CPUs allowed when they load, in the server; a niced
    # server could not run a caller's command at a higher priority.
    digest.update(f"{sorted(os.sched_getaffinity(0))}\0{os.getpriority(os.PRIO_PROCESS, 0)}\0".encode())
    for name in sorted(env):
        if name not in LATE_ENV:
            digest.update(f"{name}={env[name]}\0".encode("utf-8", "surrogateescape"))
    package = Path(__file__).resolve().parent
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                info = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}:{info.st_size}:{info.st_mtime_ns}\0".encode())
    for name in KEYED_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = getattr(spec, "origin", None)
        if origin and os.path.exists(origin):
            info = os.stat(origin)
            digest.update(f"{name}:{origin}:{info.st_size}:{info.st_mtime_ns}\0".encode())
        else:
            digest.update(f"{name}:-\0".encode())
    return digest.hexdigest()[:24]


def _interpreter_options() -> list[str]:
    """The command-line options of this interpreter that change how code runs (-O, -X ..., -W ..., -B, -I,
    ...), as the standard library spawns a like interpreter (multiprocessing); the server starts with them."""
    import subprocess

    return subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Place:
    """The files of one server, named by its socket: the lock (held while it lives), the pid file (pid, then
    its phase: ready, stopping) and its log."""

    socket: Path

    @property
    def lock(self) -> Path:
        return self.socket.with_suffix(".lock")

    @property
    def pid(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def log(self) -> Path:  # the server's stderr
        return self.socket.with_suffix(".log")

    @classmethod
    def of(cls, env: dict[str, str]) -> "Place | None":
        try:
            return cls((folder(env) / key(env)).with_suffix(".sock"))
        except OSError:
            return None


# --------------------------------------------------------------------------- the caller's side

@dataclass(frozen=True)
class Caller:
    """One command's caller: its arguments, its environment as the command starts (ENV_DEFAULTS set), and
    the server that may run it (None: no server for it; `server` commands never go through one)."""

    argv: list[str]
    env: dict[str, str]
    place: Place | None

    @classmethod
    def here(cls, argv: list[str]) -> "Caller":
        set_environ_defaults()
        env = dict(os.environ)
        return cls(argv, env, Place.of(env) if enabled(env) and argv[:1] != ["server"] else None)

    def through_server(self) -> tuple[str, int] | None:
        """How the command ended in the server ("exit", status) or ("signal", number); None when no server
        answered, and the command is to run here."""
        return None if self.place is None else _through_server(self.place, self.argv, self.env)

    def after_command(self) -> None:
        """After the command ran here: start a server for the next ones, if it needed torch. A worker of
        `search --workers` leaves that to its parent, whose own entry decides."""
        if self.place is not None and "torch" in sys.modules and not _supervised():
            start_server(self.place, self.env)


def _supervised() -> bool:
    """Whether this process is a worker of `search --workers` (launch.py, imported by a worker's entry)."""
    from .launch import is_supervised

    return is_supervised()


def exit_like(status: tuple[str, int]) -> NoReturn:
    """End this process as the served command ended: its exit status, or the signal that killed it."""
    kind, value = status
    sys.stdout.flush()
    sys.stderr.flush()
    if kind == "signal":
        _die_of(value)
    os._exit(value)


def _die_of(number: int) -> NoReturn:
    """End this process by the signal `number`, as the process it stands for ended."""
    if number not in (signal.SIGKILL, signal.SIGSTOP):  # these two take no handler
        signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
    os._exit(128 + number)  # a signal this process cannot die of


def _request(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    import resource

    ignored = [int(s) for s in FORWARDED + (signal.SIGPIPE, signal.SIGTSTP) if signal.getsignal(s) == signal.SIG_IGN]
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in RLIMITS if hasattr(resource, name)}
    mask = os.umask(0)
    os.umask(mask)
    return {"argv": argv, "argv0": sys.argv[0] if sys.argv else "autotransfer", "cwd": os.getcwd(), "env": env,
            "path": list(sys.path), "ignored": ignored, "umask": mask, "limits": limits,
            "supervised": _supervised()}


def _through_server(place: Place, argv: list[str], env: dict[str, str]) -> tuple[str, int] | None:
    """Run the command in the server at `place`; its end ("exit", status) or ("signal", number). None when
    no server answers (nothing was started then)."""
    try:
        for fd in (0, 1, 2):  # a closed one would be taken by the socket and passed as the command's stream
            os.fstat(fd)
        payload = json.dumps(_request(argv, env)).encode("utf-8", "surrogateescape")  # the folder may be gone
        connection = _connect(place.socket)
    except OSError:
        return None
    command: list[int] = []  # the command's pid, once the server has forked it
    pending: list[int] = []  # signals that came before

    def forward(number: int, _frame: Any) -> None:
        if not command:
            pending.append(number)
            return
        _signal_command(command[0], number)

    handlers = {number: signal.signal(number, forward) for number in FORWARDED + (signal.SIGTSTP,)
                if signal.getsignal(number) != signal.SIG_IGN}
    try:
        socket.send_fds(connection, [HEADER.pack(len(payload))], [0, 1, 2])
        connection.sendall(payload)
        connection.settimeout(PID_TIMEOUT_S)  # a server importing on a loaded machine, not one that hangs
        reader = connection.makefile("rb")
        first = reader.readline()
        connection.settimeout(None)
    except OSError:  # the server went away, or is stuck; closing tells it not to fork for this caller
        first = b""
    if not first.startswith(b"pid "):  # the server went away before it forked: run it here
        connection.close()
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for number in pending:  # as if they came now, to this process
            signal.raise_signal(number)
        return None
    command.append(int(first.split()[1]))
    for number in pending:
        forward(number, None)
    pid = command[0]
    try:
        line = reader.readline()
    except OSError:
        line = b""
    words = line.split()
    if len(words) == 2 and words[0] in (b"exit", b"signal"):
        return words[0].decode(), int(words[1])
    # The server died before the command did: wait for the command, whose status is lost with the server.
    while _alive(pid):
        time.sleep(0.2)
    print("autotransfer: error: the warm server stopped before the command ended, so its exit status is "
          "unknown; run it again (AUTOTRANSFER_WARM=0 runs commands without the server)", file=sys.stderr)
    return "exit", 1


def _signal_command(pid: int, number: int) -> None:
    """Pass a caller's signal on to its command (see TO_GROUP); Ctrl-Z stops the command, then the caller, and
    the caller's SIGCONT (fg, bg) continues the command."""
    try:
        if number == signal.SIGTSTP:
            # STOP, not TSTP, for both: the kernel discards TSTP in a process group without a terminal's job
            # control (the command's always; the caller's under nohup or a CI runner), which would leave
            # one stopped and the other running.
            signal.signal(signal.SIGCONT, lambda *_: _signal_command(pid, signal.SIGCONT))
            os.killpg(pid, signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGSTOP)
        elif number in TO_GROUP or number == signal.SIGCONT:
            os.killpg(pid, number)
        else:
            os.kill(pid, number)
    except ProcessLookupError:
        pass


def _connect(path: Path) -> socket.socket:
    """A connection to the socket at `path`; a path too long for a socket address is reached through an open
    descriptor of its folder (/proc/self/fd/N/name)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    folder_fd = None
    try:
        address = str(path)
        if len(address) > _SOCKET_PATH_MAX:
            folder_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            address = f"/proc/self/fd/{folder_fd}/{path.name}"
        connection.connect(address)
    except OSError:
        connection.close()
        raise
    finally:
        if folder_fd is not None:
            os.close(folder_fd)
    return connection


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_server(place: Place, env: dict[str, str], quiet: bool = False) -> None:
    """Start a server for `env` in the background (its own session, no terminal, no inherited descriptors);
    one already starting or running for the same key makes it exit at once. Says so in one line, unless
    `quiet`."""
    import subprocess

    server_env = {name: value for name, value in env.items() if name not in LATE_ENV}
    from .launch import CLEAN_PATH

    code = CLEAN_PATH + "from autotransfer.entry import serve; serve(sys.argv[1])"
    try:
        with open(place.log, "ab") as log:
            subprocess.Popen([sys.executable, *_interpreter_options(), "-c", code, str(place.socket)], env=server_env, cwd="/",
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                             start_new_session=True)
    except OSError as exc:
        quiet = True
        print(f"autotransfer: warning: could not start the warm server ({exc}); commands run without it",
              file=sys.stderr)
    if not quiet and not place.pid.exists():
        idle = float(env.get(ENV_IDLE, IDLE_S))
        print(f"autotransfer: starting a warm server, so the next commands skip the imports (it exits after "
              f"{idle:g} s idle; `autotransfer server stop` stops it, AUTOTRANSFER_WARM=0 turns this off)",
              file=sys.stderr)


# --------------------------------------------------------------------------- the server's side

@dataclass
class _Command:
    pid: int
    pidfd: int
    connection: socket.socket


def serve(socket_path: str) -> list[str] | None:
    """The server: hold the lock (or return None at once: another serves this key), import PRELOAD, then
    fork a child per request until idle, and return None. Returns in each child too, set up as its caller
    (`_become_caller`), with the command's arguments, for the entry to run (entry.serve)."""
    import fcntl

    place = Place(Path(socket_path))
    lock = os.open(place.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    place.socket.unlink(missing_ok=True)
    os.chdir(place.socket.parent)  # bound by its name: the folder's path may be too long for an address
    listener.bind(place.socket.name)  # callers queue here while the imports below run
    listener.listen(64)
    name_process(SERVER_NAME)  # before the pid file: `_state` tells a server from a reused pid by it
    place.pid.write_text(f"{os.getpid()}\n")
    _preload()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a fork could not use it ("re-initialize CUDA")
        print("autotransfer warm server: CUDA was initialised by an import; not serving", file=sys.stderr)
        listener.close()
        place.socket.unlink(missing_ok=True)
        place.pid.unlink(missing_ok=True)
        return None
    _mark(place.pid, "ready")  # `autotransfer server start` waits for this line
    idle_s = float(os.environ.get(ENV_IDLE, IDLE_S))
    request = _serve_loop(listener, place, idle_s, [lock])
    if request is None:  # the server, done serving
        state = _state(place.pid)
        if state is not None and state[0] == os.getpid():
            place.pid.unlink(missing_ok=True)
        os.close(lock)
        return None
    return _become_caller(*request)


def _preload() -> None:
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional package that is not installed or does not import
                pass
        import pkgutil

        import autotransfer

        for module in pkgutil.walk_packages(autotransfer.__path__, "autotransfer."):
            if module.name not in (__name__, "autotransfer.__main__"):
                try:
                    importlib.import_module(module.name)
                except Exception:  # noqa: BLE001 - a module whose optional dependency is missing
                    pass
    gc.collect()
    gc.freeze()  # children neither walk nor dirty the import heap in their collections


def _serve_loop(listener: socket.socket, place: Place, idle_s: float, keep: list[int]) -> tuple | None:
    """Accept requests and fork; report each child's end to its caller. Returns None in the server when it
    stops (idle, or SIGTERM: it stops taking requests and waits for running commands), and the request in
    each child."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    commands: dict[int, _Command] = {}
    stopping = False
    last = time.monotonic()

    def stop(_number: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while True:
        if stopping and listener.fileno() != -1:  # take no more requests; new callers run on their own
            selector.unregister(listener)
            place.socket.unlink(missing_ok=True)
            listener.close()
            _mark(place.pid, "stopping")
        if stopping and not commands:
            return None
        if not commands and not stopping and time.monotonic() - last > idle_s:
            stopping = True
            continue
        for handle, _ in selector.select(timeout=1.0):
            what = handle.data
            if what == "accept":
                try:
                    connection, _ = listener.accept()
                except OSError:
                    continue
                request = _receive(connection)
                if request is None:
                    connection.close()
                    continue
                payload, fds = request
                try:
                    child = _fork(commands, selector, listener, keep, connection, fds)
                except OSError as exc:  # no memory or descriptors for another command: the caller runs it
                    print(f"autotransfer warm server: could not start a command: {exc}", file=sys.stderr)
                    connection.close()
                    continue
                finally:
                    for fd in fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                if child is None:  # in the child, fds now on 0-2
                    return payload, connection
                commands[child.pid] = child
                selector.register(child.pidfd, selectors.EVENT_READ, ("ended", child.pid))
                selector.register(connection, selectors.EVENT_READ, ("caller", child.pid))
            elif what[0] == "ended":
                command = commands.pop(what[1])
                _, status = os.waitpid(command.pid, 0)
                selector.unregister(command.pidfd)
                os.close(command.pidfd)
                if _registered(selector, command.connection):
                    selector.unregister(command.connection)
                    end = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                           else f"exit {os.waitstatus_to_exitcode(status)}")
                    try:
                        command.connection.sendall(f"{end}\n".encode())
                    except OSError:
                        pass
                command.connection.close()
                last = time.monotonic()
            elif what[0] == "caller":  # the caller sends nothing more: readable means it is gone
                command = commands.get(what[1])
                if command is None or not _registered(selector, command.connection):
                    continue  # ended in the same round
                selector.unregister(command.connection)
                try:
                    os.killpg(command.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _fork(commands: dict[int, _Command], selector: Any, listener: socket.socket, keep: list[int],
          connection: socket.socket, fds: list[int]) -> _Command | None:
    """Fork the command's process. In the child: the server's descriptors closed, its own session (so the
    caller can signal its group from the start), the caller's streams on 0-2; returns None. In the server:
    once the child has its session, tells the caller its pid; returns the command."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.setsid()
        os.close(ready_w)  # the server's read returns: the group exists
        for command in commands.values():
            os.close(command.pidfd)
            command.connection.close()
        selector.close()
        listener.close()
        for fd in keep:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        return None
    os.close(ready_w)
    try:
        os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    try:
        connection.sendall(f"pid {pid}\n".encode())
    except OSError:  # the caller is gone already; the "caller" event kills the command
        pass
    return _Command(pid, pidfd, connection)


def _registered(selector: Any, handle: Any) -> bool:
    try:
        selector.get_key(handle)
    except KeyError:
        return False
    return True


def _receive(connection: socket.socket) -> tuple[dict, list[int]] | None:
    """A caller's request and its three streams, or None (another user, a malformed request, or a caller
    already gone: it runs the command itself). Every received descriptor is closed on the way out."""
    fds: list[int] = []
    connection.settimeout(5.0)  # callers send at once; one that stalls delays the others only this long
    try:
        _pid, uid, _gid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
        if uid != os.getuid():
            return None
        head, fds, _, _ = socket.recv_fds(connection, HEADER.size, 3)
        if len(head) != HEADER.size or len(fds) != 3:
            raise OSError("malformed request")
        (size,) = HEADER.unpack(head)
        if size > MAX_REQUEST:
            raise OSError("request too large")
        data = bytearray()
        while len(data) < size:
            chunk = connection.recv(size - len(data))
            if not chunk:
                raise OSError("caller went away")
            data += chunk
        connection.settimeout(0.0)
        try:  # a caller that gave up waiting (PID_TIMEOUT_S) has closed its end: do not run it twice
            if connection.recv(1, socket.MSG_PEEK) == b"":
                raise OSError("caller went away")
        except BlockingIOError:
            pass
        connection.settimeout(None)
        return json.loads(data.decode("utf-8", "surrogateescape")), fds
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        return None


def _become_caller(payload: dict, connection: socket.socket) -> list[str]:
    """In the forked child: become the caller's process (see the module's invariant); the command's arguments."""
    import io
    import resource

    connection.close()
    os.chdir(payload["cwd"])
    os.environ.clear()
    os.environ.update(payload["env"])
    os.umask(payload["umask"])
    for name, limits in payload.get("limits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), tuple(limits))
        except (OSError, ValueError, AttributeError):
            pass  # a hard limit the caller raised above the server's cannot be raised back
    ignored = set(payload["ignored"])
    for number in FORWARDED + (signal.SIGTSTP,):  # the caller's dispositions, not the server's starter's
        default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
        signal.signal(number, signal.SIG_IGN if number in ignored else default)
    sys.path[:] = payload["path"]
    sys.argv = [payload["argv0"], *payload["argv"]]
    name_process(process_name(payload["argv"]))
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # python -u's streams: no binary buffer under them
    streams = []
    for fd, old in ((0, sys.stdin), (1, sys.stdout), (2, sys.stderr)):
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        tty = raw.isatty()
        binary = raw if unbuffered and fd else (io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw))
        streams.append(io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors, write_through=unbuffered,
                                        line_buffering=fd == 2 or (fd == 1 and tty)))
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
    _apply_threads(os.environ.get("OMP_NUM_THREADS", ""))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process's legacy global generator starts from entropy
    if payload.get("supervised"):
        from .launch import adopt_supervision

        adopt_supervision()
    return payload["argv"]


def _apply_threads(value: str) -> None:
    """OMP_NUM_THREADS as a fresh process would take it: the server loaded torch's OpenMP and the BLAS
    libraries without it, so their pools are set now (threadpoolctl, scikit-learn's, for the BLAS ones)."""
    if not (value.isdigit() and int(value) > 0):
        return
    import torch

    torch.set_num_threads(int(value))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(int(value))


def run_and_exit(command: Callable[[list[str]], int], argv: list[str]) -> NoReturn:
    """In a forked child: run the command and end as a fresh process would (non-daemon threads joined,
    atexit handlers run, streams flushed; an uncaught exception printed, status 1; an uncaught Ctrl-C
    printed, then death by SIGINT), but without tearing down the interpreter, which in a fork would
    copy and free every page of the server's import heap for nothing (multiprocessing's forked
    children end the same way)."""
    import atexit
    import threading

    died_of = 0
    try:
        code = command(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code, died_of = 130, signal.SIGINT
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter's own exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if died_of:
        _die_of(died_of)
    os._exit(code & 0xFF)  # as the interpreter: sys.exit(-1) is status 255


# --------------------------------------------------------------------------- `autotransfer server`

def servers(env: dict[str, str] | None = None) -> list[tuple[int, Path, str]]:
    """This user's running servers: (pid, socket, phase: importing, ready or stopping)."""
    try:
        base = folder(env)
    except OSError:
        return []
    found = []
    for pid_file in sorted(base.glob("*.pid")):
        state = _state(pid_file)
        if state is not None:
            found.append((state[0], pid_file.with_suffix(".sock"), state[1]))
    return found


def _mark(pid_file: Path, phase: str) -> None:
    with open(pid_file, "a") as handle:
        handle.write(f"{phase}\n")


def _state(pid_file: Path) -> tuple[int, str] | None:
    """(pid, phase) of the server whose pid file this is, None when none runs."""
    try:
        words = pid_file.read_text().split()
        pid = int(words[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/comm", "rb") as handle:
            named = handle.read().strip() == SERVER_NAME.encode()
    except OSError:
        named = False
    if not named:  # a dead server's pid may be another process's now
        return None
    return pid, words[-1] if len(words) > 1 else "importing"


def ensure_server(env: dict[str, str], timeout_s: float = 300.0) -> tuple[int, bool]:
    """A ready server for `env`: the running one, or one started now (after a stopping one has gone) and
    waited for. (pid, started now)."""
    place = Place.of(env)
    if place is None:
        raise OSError(f"no private folder for warm servers (set {ENV_DIR} to a folder only you can write)")
    log = place.log
    deadline = time.monotonic() + timeout_s
    started = seen = False
    while True:
        state = _state(place.pid)
        if state is not None and state[1] == "ready":
            return state[0], started
        if state is None:
            if seen:
                raise OSError(f"the warm server exited before it was ready; see {log}")
            if not started:
                start_server(place, env, quiet=True)
                started = True
        elif state[1] == "importing" and started:
            seen = True
        if time.monotonic() > deadline:
            raise OSError(f"the warm server did not get ready in {timeout_s:g} s; see {log}")
        time.sleep(0.05)


def stop_servers(env: dict[str, str] | None = None, wait_s: float = 10.0) -> list[int]:
    """SIGTERM every server of this user (each stops taking commands and exits once its running ones end)."""
    stopped = []
    for pid, _, _ in servers(env):
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in stopped):
        time.sleep(0.05)
    return stopped
