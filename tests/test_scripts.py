"""The set-up script: a second run with nothing changed installs nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = REPO / ".venv" / ".setup-stamp"


@pytest.mark.slow
@pytest.mark.skipif(not STAMP.is_file(), reason="this checkout's .venv was not made by scripts/setup.sh")
def test_setup_skips_the_installs_when_nothing_changed():
    editable = sorted((REPO / ".venv").glob("lib/python*/site-packages/__editable__*autotransfer*"))
    before = [(path, path.stat().st_mtime_ns) for path in [STAMP, *editable]]
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("autotransfer ") and ", torch 2.14.1" in result.stdout
    assert [(path, path.stat().st_mtime_ns) for path, _ in before] == before  # nothing reinstalled, stamp kept
