"""benchmarks/scale.py end to end at toy size: every section writes its rows from real CLI runs, the
cold run decodes once and the warm one reads the cache, four workers decode once between them, through
a warm server and without one. Times
and memory are not asserted (they live in the benchmark's results), only that each was measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_scale_benchmark_measures_every_section(tmp_path):
    out = tmp_path / "scale.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--sections", "size,workers,overhead",
                           "--sizes", "120", "--workers-size", "120", "--image-size", "32", "--train-s", "1",
                           "--trials", "4", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = pd.read_csv(out)

    size = rows[rows["section"] == "size"].set_index("case")
    assert size.loc["cold", "decoded"] == 1 and size.loc["warm", "decoded"] == 0
    assert size.loc["warm", "epoch_s"] > 0 and size.loc["warm", "to_first_trial_s"] > 0
    assert size.loc["cold", "cache_mb"] > 0 and (size["peak_pss_mb"] > 0).all()

    workers = rows[rows["section"] == "workers"].set_index(["warm_server", "workers"])
    assert workers.loc[(True, 4), "decoded"] == 1  # the first run, on the empty cache: one decode
    for warm in (True, False):  # through a warm server (its forks), then each worker in its own process
        assert workers.loc[(warm, 4), "read_from_cache"] >= 4 and workers.loc[(warm, 1), "decoded"] == 0
        assert workers.loc[(warm, 1), "pss_vs_one_worker"] == 1.0
    assert (workers["workers_peak_pss_mb"] > 0).all()
    server = workers["server_pss_mb"]
    assert (server.xs(True, level="warm_server") > 0).all() and (server.xs(False, level="warm_server") == 0).all()

    overhead = rows[rows["section"] == "overhead"]
    total = overhead[overhead["case"].str.startswith("all ")].iloc[0]
    assert total["trials"] == 4 and total["overhead_per_trial_s"] > 0 and total["objective_per_trial_s"] > 0
