"""Every hook through a real plugin, loaded the three ways (--plugin, AUTOTRANSFER_PLUGINS, an
installed entry point), and the one-line errors of broken or clashing plugins."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from autotransfer.backbones import WeightsRequest, provider_for
from autotransfer.cli import main
from autotransfer.heads import HeadConfig
from autotransfer.model import assemble
from autotransfer.plugins import registries
from autotransfer.scorers import score
from autotransfer.testing import reset_registries
from conftest import one_line_error, run_cli

EXAMPLE = Path(__file__).parent / "plugin_examples" / "stripes_plugin.py"
SEARCH = ["search", "--dataset", "stripes:80", "--backbones", "stripenet", "--trials", "2", "--epochs", "2",
          "--pruner", "none", "--quiet"]


@pytest.fixture(autouse=True)
def fresh_plugin_cache():
    reset_registries()
    yield
    reset_registries()


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_lifecycle(events: list[dict], trials: int, epochs: int) -> None:
    """Per trial: started, one event per epoch in order, then finished with the final accuracy. A probe
    trial (whole backbone frozen, linear head: solved to convergence) has one step, not `epochs`."""
    numbers = sorted({e["number"] for e in events})
    assert numbers == list(range(trials))
    for number in numbers:
        mine = [e for e in events if e["number"] == number]
        probe = mine[0]["params"]["head_init"] == "probe" and mine[0]["params"]["lr"] == 0.0
        steps = 1 if probe else epochs
        assert [e["event"] for e in mine] == ["started", *["epoch"] * steps, "finished"]
        assert [e["epoch"] for e in mine if e["event"] == "epoch"] == list(range(1, steps + 1))
        assert mine[-1]["state"] == "COMPLETE"
        assert mine[-1]["value"] == pytest.approx(mine[-2]["val_accuracy"])


# --------------------------------------------------------------------------- the three ways in

def test_plugin_file_serves_every_hook(tmp_path, monkeypatch, capsys):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("STRIPES_EVENTS", str(events))
    out = tmp_path / "run"
    assert main([*SEARCH, "--out", str(out), "--plugin", str(EXAMPLE)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["backbone"]) == {"stripenet"} and (board["state"] == "COMPLETE").all()
    check_lifecycle(read_events(events), trials=2, epochs=2)

    features = np.random.default_rng(0).normal(size=(20, 4))
    labels = np.arange(20) % 2
    expected = float(np.linalg.norm(features.mean(axis=0)))
    assert score("mean_feature_norm", features, labels, plugins=(str(EXAMPLE),)) == pytest.approx(expected)

    capsys.readouterr()
    assert main(["plugins", "--plugin", str(EXAMPLE)]) == 0
    listing = capsys.readouterr().out
    assert f"{EXAMPLE} (loaded by --plugin or AUTOTRANSFER_PLUGINS" in listing
    for needle in ("datasets: stripes", "backbones: stripenet (stripenet)", "scorers: mean_feature_norm",
                   "callbacks: trial_started, epoch_ended, trial_finished", "scorers: hscore, leep, nce, logme, hscore_shrink, nleep"):
        assert needle in listing


def test_environment_variable_loads_plugins(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTRANSFER_PLUGINS", str(EXAMPLE))
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("STRIPES_EVENTS", str(events))
    assert main([*SEARCH, "--trials", "1", "--out", str(tmp_path / "run")]) == 0
    check_lifecycle(read_events(events), trials=1, epochs=2)


def install_fake_distribution(site: Path, module_name: str, source: str, version: str = "0.3") -> None:
    """What `pip install` leaves behind: the module plus a dist-info declaring the entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module_name}.py").write_text(source)
    dist = site / f"autotransfer_{module_name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: autotransfer-{module_name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[autotransfer]\n{module_name} = {module_name}\n")


@pytest.mark.slow
def test_installed_entry_point_is_discovered(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(site, "stripes_ep", EXAMPLE.read_text())
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "STRIPES_EVENTS": str(tmp_path / "events.jsonl")}
    listing = run_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "stripes_ep (autotransfer-stripes_ep 0.3)" in listing.stdout
    assert "backbones: stripenet" in listing.stdout and "scorers: mean_feature_norm" in listing.stdout
    result = run_cli(*SEARCH, "--trials", "1", "--out", str(tmp_path / "run"), env=env)
    assert result.returncode == 0, result.stderr
    check_lifecycle(read_events(tmp_path / "events.jsonl"), trials=1, epochs=2)


# --------------------------------------------------------------------------- freezing a plugin backbone

@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_plugin_backbone_freezes_k_stages(k):
    found = registries((str(EXAMPLE),))
    backbone = provider_for("stripenet", found).create("stripenet", WeightsRequest(pretrained=False))
    prefixes = ["stem.", "blocks.0.", "blocks.1."]  # the plugin's own coarse groups, stem first
    assert [sorted({n.startswith(p) for n in stage}) for stage, p in zip(backbone.stages, prefixes)] == [[True]] * 3
    assert sum(len(stage) for stage in backbone.stages) == len(list(backbone.module.parameters()))
    model = assemble(backbone, HeadConfig("linear"), num_classes=2, frozen_stages=k)
    frozen = {name for stage in backbone.stages[:k] for name in stage}
    for name, param in model.backbone.named_parameters():
        assert param.requires_grad == (name not in frozen), name
    assert all(p.requires_grad for p in model.head.parameters())


# --------------------------------------------------------------------------- broken plugins


@pytest.mark.slow
def test_plugin_that_fails_to_import(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("import numpy\nraise ImportError('needs the private_sdk package')\n")
    message = one_line_error(run_cli(*SEARCH, "--out", str(tmp_path / "r"), "--plugin", str(broken)))
    assert str(broken) in message and "needs the private_sdk package" in message


def test_missing_plugin_module(tmp_path):
    message = one_line_error(run_cli("plugins", "--plugin", "no_such_plugin_module"))
    assert "no_such_plugin_module" in message and "ModuleNotFoundError" in message


@pytest.mark.slow
def test_plugin_that_fails_to_register(tmp_path):
    broken = tmp_path / "raises_plugin.py"
    broken.write_text("from autotransfer.hookspecs import hookimpl\n\n@hookimpl\n"
                      "def autotransfer_dataset_sources():\n    raise KeyError('config.yaml')\n")
    message = one_line_error(run_cli(*SEARCH, "--out", str(tmp_path / "r"), "--plugin", str(broken)))
    assert str(broken) in message and "autotransfer_dataset_sources" in message and "config.yaml" in message


def test_plugin_with_a_wrong_hook_signature(tmp_path):
    broken = tmp_path / "signature_plugin.py"
    broken.write_text("from autotransfer.hookspecs import hookimpl\n\n@hookimpl\n"
                      "def autotransfer_trial_started(trial, colour):\n    pass\n")
    message = one_line_error(run_cli("plugins", "--plugin", str(broken)))
    assert str(broken) in message and "colour" in message


def test_plugin_returning_a_nameless_item(tmp_path):
    broken = tmp_path / "nameless_plugin.py"
    broken.write_text("from autotransfer.hookspecs import hookimpl\n\n@hookimpl\n"
                      "def autotransfer_scorers():\n    return [lambda f, y, p: 0.0]\n")
    message = one_line_error(run_cli("plugins", "--plugin", str(broken)))
    assert str(broken) in message and "autotransfer_scorers" in message and "name" in message


@pytest.mark.slow
def test_two_plugins_registering_one_name(tmp_path):
    twin = tmp_path / "twin_plugin.py"
    shutil.copy(EXAMPLE, twin)
    message = one_line_error(run_cli(*SEARCH, "--out", str(tmp_path / "r"), "--plugin", str(EXAMPLE),
                                     "--plugin", str(twin)))
    assert str(EXAMPLE) in message and str(twin) in message and "'stripes'" in message


def test_builtin_name_taken_by_a_plugin(tmp_path):
    clash = tmp_path / "clash_plugin.py"
    clash.write_text("from autotransfer.hookspecs import hookimpl\nfrom autotransfer.scorers import Scorer\n\n"
                     "@hookimpl\ndef autotransfer_scorers():\n"
                     "    return [Scorer('leep', lambda f, y, p: 0.0)]\n")
    message = one_line_error(run_cli("plugins", "--plugin", str(clash)))
    assert "autotransfer.builtin" in message and str(clash) in message and "'leep'" in message


def test_installed_plugin_that_fails_to_import(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(site, "bad_ep", "raise RuntimeError('licence server down')\n", version="1.2")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    message = one_line_error(run_cli("plugins", env=env))
    assert "'bad_ep'" in message and "autotransfer-bad_ep 1.2" in message and "licence server down" in message


def test_failing_callback_does_not_fail_the_trial(tmp_path, monkeypatch, caplog):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("STRIPES_EVENTS", str(events))
    monkeypatch.setenv("STRIPES_FAIL_FINISHED", "1")
    out = tmp_path / "run"
    assert main([*SEARCH, "--out", str(out), "--plugin", str(EXAMPLE)]) == 0
    assert (pd.read_csv(out / "leaderboard.csv")["state"] == "COMPLETE").all()
    warnings = [r.getMessage() for r in caplog.records if "webhook unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "autotransfer_trial_finished" in warnings[0]  # reported once, not per trial
    assert [e["event"] for e in read_events(events)].count("started") == 2


# --------------------------------------------------------------------------- a source returning a torch Dataset

TORCH_SOURCE = '''
import torch
from torch.utils.data import Dataset
from autotransfer.hookspecs import hookimpl


class Squares(Dataset):
    classes = ["dark", "light"]

    def __len__(self):
        return 40

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.rand(3, 12, 12, generator=generator) * 0.3 + 0.6 * (index % 2), index % 2


class SquaresSource:
    name = "squares"

    def can_load(self, uri):
        return uri.startswith("squares:")

    def load(self, uri):
        return Squares() if uri == "squares:ok" else {"not": "a dataset"}


@hookimpl
def autotransfer_dataset_sources():
    return [SquaresSource()]
'''


@pytest.mark.slow
def test_source_may_return_a_torch_dataset(tmp_path):
    plugin = tmp_path / "squares_plugin.py"
    plugin.write_text(TORCH_SOURCE)
    found = registries((str(plugin),))
    from autotransfer.data import load_dataset

    refs = load_dataset(found.dataset_source("squares:ok"), "squares:ok")
    assert refs.class_names == ["dark", "light"] and refs.labels.tolist() == [i % 2 for i in range(40)]
    dataset = type(found.dataset_source("squares:ok").load("squares:ok"))()
    expected = (dataset[3][0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(refs.refs[3], expected)
    out = tmp_path / "run"
    assert main(["search", "--dataset", "squares:ok", "--backbones", "test_efficientnet", "--no-pretrained",
                 "--trials", "1", "--epochs", "1", "--out", str(out), "--quiet", "--plugin", str(plugin)]) == 0
    assert pd.read_csv(out / "leaderboard.csv").loc[0, "state"] == "COMPLETE"
    message = one_line_error(run_cli("search", "--dataset", "squares:bad", "--no-pretrained", "--out", str(tmp_path / "b"),
                                     "--plugin", str(plugin)))
    assert "'squares' returned dict" in message and "LabelledRefs" in message


def test_every_hook_has_a_docstring_and_is_documented_in_docs_plugins_md():
    """As datasette does: a hook a plugin author cannot find in the guide does not exist for them, and a
    hook the guide names that the spec module lacks is a stale guide."""
    import inspect
    import re

    from autotransfer import hookspecs

    specs = {name: fn for name, fn in vars(hookspecs).items()
             if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")}
    assert len(specs) >= 6
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    for name, fn in specs.items():
        assert (fn.__doc__ or "").strip(), f"hook {name} has no docstring"
        params = list(inspect.signature(fn).parameters)
        documented = f"`{name}({', '.join(params)})`" if params else f"`{name}`"
        assert documented in guide, f"docs/plugins.md does not document {documented}"
    named = set(re.findall(r"\bautotransfer_[a-z_]+\b", guide))
    assert named <= set(specs), f"docs/plugins.md names hooks that do not exist: {sorted(named - set(specs))}"


def test_every_registered_source_and_provider_follows_its_protocol():
    """The protocols (data.DatasetSource, backbones.BackboneProvider) are the contract docs/plugins.md
    describes: the built-ins and the example plugin follow them, and the registry checks their methods."""
    import inspect

    from autotransfer.backbones import BackboneProvider
    from autotransfer.data import DatasetSource
    from autotransfer.plugins import REQUIRED

    found = registries((str(EXAMPLE),))
    assert {type(s).__name__ for s in found.datasets} >= {"FolderSource", "CsvSource", "BuiltinSource"}
    assert all(isinstance(source, DatasetSource) for source in found.datasets)
    assert all(isinstance(provider, BackboneProvider) for provider in found.backbones)
    assert len(found.backbones) >= 3  # the example's stripenet, checkpoint folders, timm

    def methods(protocol) -> set[str]:
        return {name for name, member in vars(protocol).items() if inspect.isfunction(member) and not name.startswith("_")}

    assert set(REQUIRED["autotransfer_dataset_sources"]) == methods(DatasetSource)
    assert set(REQUIRED["autotransfer_backbone_providers"]) == methods(BackboneProvider)

    class NoLoad:
        name = "half"

        def can_load(self, uri: str) -> bool:
            return False

    assert not isinstance(NoLoad(), DatasetSource)  # a source without load() is not one
