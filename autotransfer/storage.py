"""Opening the study's Optuna storage with heartbeats on, so a dead worker's trial is failed and retried.

Every storage is an Optuna RDB storage (SQLite for one machine, PostgreSQL or MySQL for many):
in Optuna 5 only RDB storages implement heartbeats, and without them a trial whose worker was
killed would stay RUNNING forever. SQLite runs in WAL mode with a long busy timeout, which keeps a
handful of local workers from tripping over its single writer lock.
"""

from __future__ import annotations

import sqlite3
import warnings
from functools import lru_cache
from pathlib import Path

import optuna

from .errors import UserError

DEFAULT_HEARTBEAT_S = 30
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
        _sqlite_wal(url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat = {}
            if heartbeat_s is not None:
                heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": grace_period(heartbeat_s),
                             "heartbeat_stale_trial_callback":
                                 optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)}
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url), **heartbeat)
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
        return {"connect_args": {"timeout": 120}}
    if url.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {}


def _sqlite_wal(url: str) -> None:
    """WAL lets readers (leaderboards, other workers' polls) run beside the one writer; it persists in the file."""
    if not url.startswith(SQLITE_PREFIX):
        return
    path = url[len(SQLITE_PREFIX):]
    if path in ("", ":memory:"):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=120)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()
