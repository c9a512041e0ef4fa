"""benchmarks/throughput.py end to end at toy size: every section writes its rows, and the cached
search at equal trials really trains the uncached search's configurations. Speeds are not asserted
here (they live in the benchmark's results), only that each number was measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_throughput_benchmark_measures_every_section(tmp_path):
    out = tmp_path / "throughput.csv"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--dataset", "builtin:digits:0-1",
                    "--cases", "test_resnet:0", "--cache-cases", "test_resnet:all,test_resnet:2", "--image-size", "32",
                    "--repeats", "1", "--trials", "2", "--search-seeds", "0", "--search-backbones", "test_resnet",
                    "--search-epochs", "2", "--search-image-size", "32", "--work", str(tmp_path / "work"),
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
    rows = pd.read_csv(out)

    step = rows[rows["section"] == "step"].iloc[0]
    assert step["trial_img_s"] > 0 and step["reference_img_s"] > 0 and step["ratio"] > 0

    cache = rows[rows["section"] == "cache"].set_index("frozen_stages")
    assert cache.loc["5", "path"] == "features" and cache.loc["2", "path"] == "boundary"
    assert (cache["cached_epoch_s"] > 0).all() and (cache["uncached_epoch_s"] > 0).all()
    assert cache.loc["2", "note"].startswith("2 view(s) at ")

    search = rows[rows["section"] == "search"].set_index("mode")
    assert set(search.index) == {"uncached", "cached-same-trials", "cached-own-search",
                                 "cached-same-trials (mean of 1 seeds)", "cached-own-search (mean of 1 seeds)"}
    assert search.loc["uncached", "paths"] == "plain=2"
    assert search.loc["uncached", "frozen_free_speedup"] >= 1
    assert search.loc["cached-same-trials", "speedup"] > 0

    def trials(mode: str) -> list[optuna.trial.FrozenTrial]:
        study = optuna.load_study(study_name="throughput",
                                  storage=f"sqlite:///{tmp_path / 'work' / 'search-0' / mode / 'study.db'}")
        return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.params for t in trials("same")] == [t.params for t in trials("uncached")]
    paths = dict(item.split("=") for item in search.loc["cached-same-trials", "paths"].split("; "))
    unfrozen = sum(t.user_attrs["frozen_stages"] == 0 for t in trials("uncached"))
    assert int(paths.get("plain", 0)) == unfrozen  # every trial with something frozen used a cache
