"""Helpers the test modules share: the CLI as a subprocess, its one-line errors, the ../shared data.

Import them by name (`from conftest import run_cli`): pytest puts this folder on sys.path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real datasets and weights; tests that need them skip without it
CLI_TIMEOUT_S = 300


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`autotransfer ARGS` in a new interpreter, as a user runs it (output captured, text)."""
    return subprocess.run([sys.executable, "-m", "autotransfer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=CLI_TIMEOUT_S)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a run that must fail as bad input: exit status 2, one line, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def main_error(capsys, *args: str) -> str:
    """`autotransfer ARGS` in this process, where it must fail as bad input: exit status 2 (argparse's
    SystemExit or `main`'s return), one line on stderr, no traceback. Returns the line."""
    from autotransfer.cli import main

    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]
