"""Start-up: the commands that only talk (`--help`, `plugins`) import nothing heavy, and the search's
path to its first trial leaves out what only its end needs. Checked on what a fresh interpreter has
imported (sys.modules), not on time: timings belong in benchmarks/scale.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "optuna", "sklearn", "pandas", "tensorboard", "matplotlib", "plotly", "scipy")

_LOADED = """
import json, sys
from autotransfer.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})), file=sys.stderr)
"""


def _heavy_imported(*args: str) -> list[str]:
    script = _LOADED.format(heavy=set(HEAVY))
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    return sorted({name.split(".")[0] for name in json.loads(done.stderr.strip().splitlines()[-1])})


def test_help_imports_nothing_heavy():
    assert _heavy_imported("--help") == []
    assert _heavy_imported("search", "--help") == []


def test_plugins_lists_every_plugin_without_torch():
    """Registering the built-ins and the installed plugins builds no model and imports no torch."""
    assert _heavy_imported("plugins") == []
    listed = subprocess.run([sys.executable, "-m", "autotransfer.cli", "plugins"], capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and "timm" in listed.stdout, listed.stderr


def test_the_program_exits_with_main_s_status_and_its_heap_frozen():
    """cli.run (the script, python -m, local workers) returns main's exit status and freezes the heap
    before the interpreter's last collections; main() in-process leaves the collector alone."""
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0, file=sys.stderr))\n"
             "from autotransfer.cli import main, run\n"
             "main(['plugins'])\n"
             "print('after main', gc.get_freeze_count() > 0, file=sys.stderr)\n"
             "run(sys.argv[1:])\n")
    ok = subprocess.run([sys.executable, "-c", probe, "plugins"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "after main False" in ok.stderr and "frozen True" in ok.stderr, ok.stderr
    bad = subprocess.run([sys.executable, "-c", probe, "plugins", "--plugin", "no_such_plugin_module"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "frozen True" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_a_search_reaches_its_first_trial_without_pandas_or_plotting():
    """Up to the first trial a search needs torch, timm and optuna, not tensorboard or plotting (the
    report, at its end). A folder of images with train/ and val/ needs no scikit-learn (the built-in
    digits and carved splits do, and scikit-learn brings pandas), so neither is imported."""
    script = (
        "import os, sys\n"
        "import autotransfer.display as d\n"
        "def first(self, number, params):\n"
        "    print(sorted({m.split('.')[0] for m in sys.modules}), file=sys.stderr, flush=True)\n"
        "    os._exit(0)  # here, at the first trial's start: nothing after it runs\n"
        "d.Display.trial_started = first\n"
        "from autotransfer.cli import main\n"
        "main(sys.argv[1:])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        from PIL import Image

        for split, name, seed in [(s, n, 10 * i + j) for i, (s, n) in enumerate(
                [("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")]) for j in range(3)]:
            folder = Path(out) / "data" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (seed * 9 % 256, seed * 5 % 256, 7)).save(folder / f"{seed}.png")
        done = subprocess.run([sys.executable, "-c", script, "search", "--dataset", str(Path(out) / "data"),
                               "--backbones", "test_resnet", "--no-pretrained", "--image-size", "16", "--epochs", "1",
                               "--no-portfolio", "--trials", "1", "--out", str(Path(out) / "run")], capture_output=True, text=True,
                              timeout=300)
    loaded = eval(done.stderr.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert {"torch", "timm", "optuna"} <= set(loaded), done.stderr
    assert not {"pandas", "sklearn", "tensorboard", "matplotlib", "plotly"} & set(loaded), done.stderr
