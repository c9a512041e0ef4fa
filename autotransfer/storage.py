"""Opening the study's Optuna storage with heartbeats on, so a dead worker's trial is failed and retried.

Every storage is an Optuna RDB storage (SQLite for one machine, PostgreSQL or MySQL for many):
in Optuna 5 only RDB storages implement heartbeats, and without them a trial whose worker was
killed would stay RUNNING forever. SQLite runs in WAL mode with a long busy timeout, which keeps a
handful of local workers from tripping over its single writer lock.

Optuna's check-and-set steps (a worker taking a queued trial: "WAITING? then RUNNING") rely on
`SELECT ... FOR UPDATE`, which SQLite ignores, and Python's sqlite3 driver starts a transaction only
at the first write, so two workers could both read WAITING and both take the trial. On SQLite every
transaction after Optuna's set-up therefore begins with `BEGIN IMMEDIATE` (it takes the write lock up
front), which makes those steps atomic between processes. The set-up itself (creating the tables of
a fresh file) runs one process at a time under a file lock.
"""

from __future__ import annotations

import fcntl
import sqlite3
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import optuna
from sqlalchemy import event

from .config import DEFAULT_HEARTBEAT_S  # noqa: F401 - where its users import it from
from .errors import UserError

MAX_RETRIES = 3  # a trial whose worker died is retried this many times before it stays failed
SQLITE_PREFIX = "sqlite:///"


def grace_period(heartbeat_s: int) -> int:
    """How long a trial may miss heartbeats before it counts as dead: a few beats, not one slow one."""
    return 3 * heartbeat_s


@lru_cache(maxsize=None)
def open_storage(url: str, heartbeat_s: int | None = DEFAULT_HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """One storage object per URL and process; failures become one line naming the fix."""
    if "://" not in url:
        raise UserError(f"--storage {url!r} is not a database URL; use sqlite:///path/study.db or "
                        "postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE")
    try:
        with warnings.catch_warnings(), _sqlite_setup(url):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat = {}
            if heartbeat_s is not None:
                heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": grace_period(heartbeat_s),
                             "heartbeat_stale_trial_callback":
                                 optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)}
            storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **heartbeat)
        if url.startswith("sqlite"):
            # after Optuna's set-up, which reads on one connection while it writes on another
            event.listen(storage.engine, "begin", _begin_immediate)
        return storage
    except ModuleNotFoundError as exc:
        raise UserError(f"storage {shown(url)} needs the {exc.name} driver; install it with "
                        "pip install 'autotransfer[postgres]' (psycopg2) or use postgresql+psycopg://") from None
    except UserError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open storage {shown(url)}: {detail}; check the URL (host, port, user, "
                        "database) and that the server is running") from None


def sqlite_missing(url: str) -> bool:
    """A SQLite URL whose file does not exist yet (opening it would create an empty database)."""
    if not url.startswith(SQLITE_PREFIX):
        return False
    path = url[len(SQLITE_PREFIX):]
    return path not in ("", ":memory:") and not Path(path).exists()


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # isolation_level None: the driver issues no BEGIN of its own; `_begin_immediate` issues ours
        return {"connect_args": {"timeout": 120, "isolation_level": None}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def _sqlite_setup(url: str) -> Iterator[None]:
    """WAL mode, and Optuna's schema set-up one process at a time: processes opening a fresh file together
    would otherwise each create the tables ("table studies already exists"). WAL lets readers (leaderboards,
    other workers' polls) run beside the one writer; it persists in the file."""
    path = url[len(SQLITE_PREFIX):] if url.startswith(SQLITE_PREFIX) else ""
    if path in ("", ":memory:"):
        yield
        return
    database = Path(path)
    database.parent.mkdir(parents=True, exist_ok=True)
    # A lock file beside it, never the database file: closing any descriptor of that file drops every POSIX
    # lock SQLite holds on it in this process, and SQLite then deletes a WAL other processes still write to.
    with open(database.with_name(f".{database.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        connection = sqlite3.connect(path, timeout=120)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
        yield
