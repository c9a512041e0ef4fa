"""Through the real plugin machinery: discovery by module name and entry point, and a CLI search."""

from __future__ import annotations

import csv
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from autotransfer.cli import main
from autotransfer.plugins import registries
from autotransfer.testing import is_installed
from autotransfer_webdataset import write_shards

HOOKS_MODULE = "autotransfer_webdataset.hooks"
DIST = "autotransfer-webdataset"
PLUGIN_ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """A folder holding classes.txt and one shard of 100 shuffled training digits (all 10 classes), so a
    search is quick."""
    out = tmp_path_factory.mktemp("digits")
    write_shards("builtin:digits", out, samples_per_shard=100, upscale=4)
    keep = sorted(out.glob("train-*.tar"))[0]
    for extra in out.glob("*.tar"):
        if extra != keep:
            extra.unlink()
    return out


def test_registries_find_the_source_for_a_shard_folder(digits_shards):
    regs = registries((HOOKS_MODULE,))
    assert [s.name for s in regs.datasets].count("webdataset") == 1
    source = regs.dataset_source(str(digits_shards))
    assert source.name == "webdataset"
    refs = source.load(str(digits_shards))
    assert len(refs.refs) == 100 and refs.class_names == [str(d) for d in range(10)]
    assert np.bincount(refs.labels, minlength=10).min() >= 2  # enough for the core's stratified split


@pytest.mark.skipif(not is_installed(DIST), reason=f"{DIST} is not pip-installed (pip install -e {PLUGIN_ROOT})")
def test_installed_entry_point_is_listed(capsys):
    assert any(ep.value == HOOKS_MODULE for ep in metadata.entry_points(group="autotransfer"))
    for extra in ([], ["--plugin", HOOKS_MODULE]):  # naming it again must not register it twice
        assert main(["plugins", *extra]) == 0
        out = capsys.readouterr().out
        assert f"{HOOKS_MODULE} ({DIST} {metadata.version(DIST)})" in out
        assert out.count("datasets: webdataset") == 1


def test_search_on_a_shard_folder(digits_shards, tmp_path):
    run = tmp_path / "run"
    code = main(["search", "--dataset", str(digits_shards), "--backbones", "resnet18", "--no-pretrained",
                 "--trials", "2", "--epochs", "1", "--image-size", "32", "--out", str(run), "--quiet",
                 "--plugin", HOOKS_MODULE])
    assert code == 0
    with (run / "leaderboard.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert all(row["backbone"] == "resnet18" for row in rows)
