"""The program's entry: the `autotransfer` script, `python -m autotransfer`, and local workers.

A command runs in a fork of a warm server when one serves this environment (warm.py), else in this
process, which then starts a server for the next commands. `python -m autotransfer.cli` and cli.main()
run in the process, always.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from . import warm
from .cli import main
from .cli import run as run_here


def run(argv: list[str] | None = None) -> NoReturn:
    caller = warm.Caller.here(list(sys.argv[1:] if argv is None else argv))
    status = caller.through_server()
    if status is not None:
        warm.exit_like(status)
    run_here(caller.argv, before_exit=caller.after_command)


def serve(socket_path: str) -> None:
    """A warm server's process (warm.start_server): serve; in each forked child, run its command here."""
    argv = warm.serve(socket_path)
    if argv is not None:
        warm.run_and_exit(main, argv)
