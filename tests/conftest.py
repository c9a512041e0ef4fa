"""Helpers the test modules share: the CLI as a subprocess, its one-line errors, the ../shared data.

Import them by name (`from conftest import run_cli`): pytest puts this folder on sys.path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# Every command a test starts runs in its own process: warm servers (warm.py) would outlive the test and
# serve later tests from a fork made before their monkeypatching. tests/test_warm.py turns them on.
os.environ["AUTOTRANSFER_WARM"] = "0"
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # real datasets and weights; tests that need them skip without it
CLI_TIMEOUT_S = 300
# The preparation's progress lines (display.py; prepared.py, rank.py), which may precede an error found
# after them: they are not part of the error, and nothing else may stand beside it.
PROGRESS = re.compile(r"(loading \S+ \((random init|pretrained|file)\)|(decoding|reading) \d+ images of .+ at \d+ px( (into|from) the data cache .+)?|"
                      r"images ready in [\d.]+s|scoring \S+: features of \d+ train images at \d+ px|  \S+: features .+)$")


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without the progress lines; every other line is kept."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS.fullmatch(line)]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`autotransfer ARGS` in a new interpreter, as a user runs it (output captured, text)."""
    return subprocess.run([sys.executable, "-m", "autotransfer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=CLI_TIMEOUT_S)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error of a run that must fail as bad input: exit status 2, one line, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
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
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def pytest_collection_finish(session) -> None:
    """Once every test module (and torch, timm, optuna with them) is imported, move those objects out of
    the garbage collector's full passes, which would otherwise walk the whole import heap each time; the
    tests' own objects stay collectable (gc.freeze)."""
    import gc

    gc.freeze()
