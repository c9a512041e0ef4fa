"""The scorers through autotransfer's plugin machinery: registries, score(), input checks, the CLI listing."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

from autotransfer import plugins
from autotransfer.cli import main
from autotransfer.errors import UserError
from autotransfer.scorers import Scorer, score
from autotransfer.testing import is_installed, reset_registries
from autotransfer_knn import knn_loo_accuracy
from autotransfer_knn.hooks import SCORERS

HOOKS_MODULE = "autotransfer_knn.hooks"
DIST = "autotransfer-knn"
NAMES = ("knn_loo", "knn1_loo")



@pytest.fixture(autouse=True)
def fresh_registries(monkeypatch):
    """plugin_manager/registries are cached by their argument tuple, not by AUTOTRANSFER_PLUGINS:
    start and end each test from a clean cache and no environment plugins."""
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    reset_registries()
    yield
    reset_registries()


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    return rng.normal(size=(3, 10))[y] + rng.normal(size=(60, 10)), y


def test_registry_finds_both_scorers():
    regs = plugins.registries((HOOKS_MODULE,))
    for name in NAMES:
        scorer = regs.scorer(name)
        assert isinstance(scorer, Scorer) and scorer.name == name
        assert scorer.requires == frozenset() and scorer.applicable(has_source_probs=False)
        assert "leave-one-out" in scorer.description
    names = [s.name for s in regs.scorers]
    assert {"hscore", "leep", "nce", *NAMES} <= set(names) and all(names.count(n) == 1 for n in NAMES)
    assert names.index("knn_loo") < names.index("hscore")  # plugins are listed before the built-ins


def test_score_by_name_equals_the_function(data):
    x, y = data
    for name, k in (("knn_loo", 5), ("knn1_loo", 1)):
        value = score(name, x, y, plugins=(HOOKS_MODULE,))
        assert isinstance(value, float) and 0.5 < value <= 1.0
        assert value == knn_loo_accuracy(x, y, k)
        assert score(name, x, y, np.full((60, 4), 0.25), plugins=(HOOKS_MODULE,)) == value  # source_probs unused


def test_scorers_are_usable_without_the_registry(data):
    x, y = data
    assert [s.name for s in SCORERS] == list(NAMES)
    assert SCORERS[0](x, y) == knn_loo_accuracy(x, y, 5) and SCORERS[1](x, y) == knn_loo_accuracy(x, y, 1)


@pytest.mark.parametrize("features, labels, message", [
    (np.zeros(6), np.array([0, 1, 0, 1, 0, 1]), "features must be 2-D"),
    (np.zeros((6, 2)), np.array([0, 1, 0, 1]), "one entry per feature row"),
    (np.random.default_rng(0).normal(size=(6, 2)), np.zeros(6, dtype=int), "at least 2 classes"),
])
def test_bad_inputs_are_refused_by_check_inputs(features, labels, message):
    for name in NAMES:
        with pytest.raises(ValueError, match=message):
            score(name, features, labels, plugins=(HOOKS_MODULE,))


def test_unknown_name_suggests_the_plugin_scorer():
    with pytest.raises(UserError, match="did you mean knn_loo"):
        plugins.registries((HOOKS_MODULE,)).scorer("knn_lo")


def test_cli_lists_the_scorers(capsys):
    assert main(["plugins", "--plugin", HOOKS_MODULE]) == 0
    out = capsys.readouterr().out
    assert "  scorers: knn_loo, knn1_loo" in out
    assert out.count("knn_loo,") == 1  # registered once, also when installed as an entry point


@pytest.mark.skipif(not is_installed(DIST), reason=f"{DIST} is not pip-installed (pip install -e plugins/autotransfer-knn)")
def test_installed_entry_point_registers_without_plugin_option(capsys):
    assert any(ep.value == HOOKS_MODULE for ep in metadata.entry_points(group="autotransfer"))
    assert plugins.registries().scorer("knn_loo").name == "knn_loo"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert f"{HOOKS_MODULE} ({DIST} {metadata.version(DIST)})" in out and "  scorers: knn_loo, knn1_loo" in out
