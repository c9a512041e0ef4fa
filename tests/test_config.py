"""SearchConfig validation and parsing helpers, and the search space sampled from a real Optuna study."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import optuna
import pytest

from autotransfer.config import (HEAD_HIDDEN, SearchConfig, parse_frozen_spec, parse_list, parse_range,
                                 parse_size, parse_weights, resolve_stage)
from autotransfer.errors import UserError
from autotransfer.heads import HeadConfig
from autotransfer.space import TrialParams, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _config(**changes) -> SearchConfig:
    base = SearchConfig(dataset="builtin:digits", backbones=["resnet18.a1_in1k", "efficientnet_b0.ra_in1k"])
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- validate

def test_defaults_validate():
    config = SearchConfig(dataset="some/folder")
    assert config.validate() is config


@pytest.mark.parametrize("changes", [
    dict(trials=None, timeout=60.0),
    dict(trials=3, timeout=0.5),
    dict(lr=(1e-3, 1e-3)),
    dict(head_dropout=(0.0, 0.0)),
    dict(weights={"resnet18.a1_in1k": "/weights/r18.safetensors"}),
    dict(frozen_stages="0,2,all"),
    dict(heads=["mlp"], optimizers=["sgd", "adamw"], pruner="none"),
    dict(image_size=96, val_fraction=0.5),
])
def test_valid_configs(changes):
    config = _config(**changes)
    assert config.validate() is config


@pytest.mark.parametrize("changes, pattern", [
    (dict(trials=0), r"--trials must be a positive integer, got 0"),
    (dict(trials=-3), r"--trials .* got -3"),
    (dict(epochs=-1), r"--epochs must be a positive integer, got -1"),
    (dict(epochs=0), r"--epochs .* got 0"),
    (dict(epochs=2.5), r"--epochs .* got 2.5"),
    (dict(batch_size=0), r"--batch-size .* got 0"),
    (dict(image_size=0), r"--image-size .* got 0"),
    (dict(heads=["linear", "transformer"]), r"--heads: unknown value 'transformer'"),
    (dict(heads=[]), r"--heads is empty"),
    (dict(optimizers=["lbfgs"]), r"--optimizers: unknown value 'lbfgs'"),
    (dict(pruner="asha"), r"unknown pruner 'asha'"),
    (dict(lr=(0.1, 0.001)), r"--lr range .* got 0.1:0.001"),
    (dict(lr=(0.0, 0.01)), r"--lr range .* got 0.0:0.01"),
    (dict(lr=(-1e-3, 0.01)), r"--lr range .* got -0.001:0.01"),
    (dict(lr=(1e-3, math.inf)), r"--lr range .* got 0.001:inf"),
    (dict(head_dropout=(0.4, 0.2)), r"--head-dropout .* got 0.4:0.2"),
    (dict(head_dropout=(0.0, 1.0)), r"--head-dropout .* got 0.0:1.0"),
    (dict(head_dropout=(-0.1, 0.2)), r"--head-dropout .* got -0.1:0.2"),
    (dict(head_hidden=[128, 0]), r"--head-hidden .* got 0"),
    (dict(backbones=[]), r"--backbones is empty"),
    (dict(weights={"vit_base": "/w.safetensors"}), r"--weights names vit_base, which is not in --backbones"),
    (dict(trials=None, timeout=None), r"no budget"),
    (dict(timeout=-5.0), r"--timeout .* got -5.0"),
    (dict(val_fraction=1.0), r"--val-fraction .* got 1.0"),
    (dict(val_fraction=0.0), r"--val-fraction .* got 0.0"),
    (dict(frozen_stages="deep"), r"--frozen-stages: bad value 'deep'"),
    (dict(cache_views=0), r"--cache-views must be a positive integer, got 0"),
    (dict(cache_memory=0), r"--cache-memory must be a positive integer, got 0"),
    (dict(probe_cs=["cv", "strong"]), r"--probe-c: 'strong' is neither 'cv' nor a positive number"),
    (dict(probe_cs=["0"]), r"--probe-c: '0' is neither"),
    (dict(probe_cs=["-0.1"]), r"--probe-c: '-0.1' is neither"),
    (dict(probe_cs=["nan"]), r"--probe-c: 'nan' is neither"),
    (dict(probe_cs=[]), r"--probe-c is empty"),
])
def test_validate_errors_name_the_bad_value(changes, pattern):
    with pytest.raises(UserError, match=pattern):
        _config(**changes).validate()


def test_probe_cs_are_written_one_way():
    assert _config(probe_cs=["CV", "1e-2", "0.01", "1"]).validate().probe_cs == ["cv", "0.01", "1.0"]


def test_weights_for_a_similar_but_different_name_is_rejected():
    with pytest.raises(UserError, match="--weights names resnet18, which"):
        _config(weights={"resnet18": "/w.safetensors"}).validate()  # backbone is resnet18.a1_in1k


# --------------------------------------------------------------------------- frozen stages

@pytest.mark.parametrize("spec, expected", [
    ("0-all", ("range", ["0", "all"])),
    ("1-3", ("range", ["1", "3"])),
    ("2-2", ("range", ["2", "2"])),
    (" 0 - ALL ", ("range", ["0", "all"])),
    ("all", ("choice", ["all"])),
    ("3", ("choice", ["3"])),
    ("0,all", ("choice", ["0", "all"])),
    ("0, 2, all", ("choice", ["0", "2", "all"])),
    ("2,0,2,all,0", ("choice", ["2", "0", "all"])),  # de-duplicated, first-seen order
    ("0,", ("choice", ["0"])),
])
def test_parse_frozen_spec(spec, expected):
    assert parse_frozen_spec(spec) == expected


@pytest.mark.parametrize("spec, pattern", [
    ("", "bad value ''"),
    (",", "bad value ','"),
    ("all-2", "bad range 'all-2'"),
    ("3-1", "range '3-1' is empty"),
    ("1-2-3", "bad range '1-2-3'"),
    ("-1", "bad range '-1'"),
    ("0-", "bad range '0-'"),
    ("x-2", "bad range 'x-2'"),
    ("1-2,3", "bad value '1-2,3'"),
    ("0,half", "bad value '0,half'"),
    ("1.5", "bad value '1.5'"),
])
def test_parse_frozen_spec_errors(spec, pattern):
    with pytest.raises(UserError, match=f"--frozen-stages: {pattern}"):
        parse_frozen_spec(spec)


@pytest.mark.parametrize("token, stages, expected", [
    ("all", 4, 4), ("all", 0, 0), ("0", 4, 0), ("2", 4, 2), ("4", 4, 4), ("9", 4, 4), ("3", 1, 1),
])
def test_resolve_stage(token, stages, expected):
    assert resolve_stage(token, stages) == expected


# --------------------------------------------------------------------------- other parsers

def test_parse_range():
    assert parse_range("--lr", "1e-5:1e-1") == (1e-5, 1e-1)
    assert parse_range("--lr", "0.003") == (0.003, 0.003)
    assert parse_range("--head-dropout", " 0 : 0.5 ") == (0.0, 0.5)
    low, high = parse_range("--epochs", "2:8", cast=int)
    assert (low, high) == (2, 8) and isinstance(low, int)
    assert parse_range("--lr", "0.1:0.001") == (0.1, 0.001)  # order is validate()'s business


@pytest.mark.parametrize("flag, text, cast, pattern", [
    ("--lr", "fast", float, "--lr: cannot read 'fast'"),
    ("--lr", "1e-3:big", float, "--lr: cannot read '1e-3:big'"),
    ("--lr", "", float, "--lr: cannot read ''"),
    ("--lr", "1:2:3", float, r"--lr: '1:2:3' is not LOW:HIGH"),
    ("--epochs", "2.5", int, "--epochs: cannot read '2.5'"),
])
def test_parse_range_errors(flag, text, cast, pattern):
    with pytest.raises(UserError, match=pattern):
        parse_range(flag, text, cast=cast)


def test_parse_weights():
    assert parse_weights([]) == {}
    assert parse_weights(["resnet18.a1_in1k=/w/r18.safetensors", " vit = ./v.pth "]) == {
        "resnet18.a1_in1k": "/w/r18.safetensors", "vit": "./v.pth"}
    assert parse_weights(["m=C:/a=b.bin"]) == {"m": "C:/a=b.bin"}  # splits at the first '='
    assert parse_weights(["m=/a", "m=/b"]) == {"m": "/b"}


@pytest.mark.parametrize("item", ["resnet18", "=/w.bin", "resnet18=", ""])
def test_parse_weights_errors(item):
    with pytest.raises(UserError, match=f"--weights expects NAME=PATH, got {item!r}"):
        parse_weights([item])


def test_parse_list():
    assert parse_list(" a, b ,,c ,") == ["a", "b", "c"]
    assert parse_list("") == []


# --------------------------------------------------------------------------- serialisation

def _custom_config() -> SearchConfig:
    return SearchConfig(
        dataset="/data/bees", backbones=["a", "b"], pretrained=False, weights={"a": "/w/a.bin"},
        frozen_stages="0,2,all", heads=["mlp"], head_hidden=[64], head_dropout=(0.1, 0.3), lr=(1e-4, 1e-2),
        optimizers=["sgd"], epochs=3, batch_size=8, image_size=64, val_fraction=0.3, seed=7, pruner="hyperband",
        trials=None, timeout=120.0)


def test_to_dict_from_dict_round_trip():
    config = _custom_config()
    assert SearchConfig.from_dict(config.to_dict()) == config
    # Through JSON (as Optuna's storage keeps it): tuples come back as lists and are restored.
    restored = SearchConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.lr, tuple) and isinstance(restored.head_dropout, tuple)
    assert SearchConfig.from_dict(SearchConfig(dataset="x").to_dict()) == SearchConfig(dataset="x")


def test_from_dict_ignores_unknown_keys():
    data = _custom_config().to_dict() | {"added_in_a_later_version": 1}
    assert SearchConfig.from_dict(data) == _custom_config()


def test_conflicts_with_ignores_run_fields():
    stored = _custom_config()
    rerun = dataclasses.replace(stored, trials=50, timeout=None)
    assert rerun.conflicts_with(stored) == []
    from_storage = SearchConfig.from_dict(json.loads(json.dumps(stored.to_dict())))
    assert from_storage.conflicts_with(stored) == []
    as_lists = dataclasses.replace(stored, lr=list(stored.lr))  # list vs tuple is no conflict
    assert as_lists.conflicts_with(stored) == []


def test_cache_memory_and_compile_may_change_on_resume_but_caching_may_not():
    stored = _custom_config()
    assert dataclasses.replace(stored, cache_memory=1 << 20, compile=True).conflicts_with(stored) == []
    assert dataclasses.replace(stored, cache=False, cache_views=4).conflicts_with(stored) == ["cache", "cache_views"]


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("512MiB", 512 << 20), ("1.5G", 3 << 29),
                                        ("4096", 4096), (" 2 gib ", 2 << 30), ("10kB", 10_000)])
def test_parse_size(text, size):
    assert parse_size("--cache-memory", text) == size


@pytest.mark.parametrize("text", ["lots", "", "2XB", "-1GB", "0", "0.1"])
def test_parse_size_errors_name_value_and_fix(text):
    with pytest.raises(UserError, match=r"--cache-memory.*" + re.escape(repr(text)) + r".*2GB"):
        parse_size("--cache-memory", text)


def test_conflicts_with_flags_search_changes():
    stored = _custom_config()
    assert dataclasses.replace(stored, backbones=["a"]).conflicts_with(stored) == ["backbones"]
    assert dataclasses.replace(stored, backbones=["b", "a"]).conflicts_with(stored) == ["backbones"]
    assert dataclasses.replace(stored, epochs=4).conflicts_with(stored) == ["epochs"]
    changed = dataclasses.replace(stored, backbones=["c"], epochs=9, trials=1, lr=(1e-3, 1e-2))
    assert changed.conflicts_with(stored) == ["backbones", "lr", "epochs"]


# --------------------------------------------------------------------------- search space

STAGES = {"small": 2, "big": 5}


def _study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))


def _sample(config: SearchConfig, n: int, seed: int = 0) -> list[tuple[optuna.Trial, TrialParams]]:
    study = _study(seed)
    out = []
    for _ in range(n):
        trial = study.ask()
        params = suggest(trial, config, STAGES.__getitem__)
        study.tell(trial, 0.0)
        out.append((trial, params))
    return out


def test_suggest_respects_ranges():
    config = _config(backbones=["small", "big"], lr=(1e-4, 1e-2), head_dropout=(0.1, 0.3), head_hidden=[64, 128],
                     optimizers=["adam", "sgd"]).validate()
    samples = _sample(config, 150)
    for trial, params in samples:
        assert params.backbone in ("small", "big")
        assert params.num_stages == STAGES[params.backbone]
        assert 0 <= params.frozen_stages <= params.num_stages
        assert params.head.kind in ("linear", "mlp")
        if params.probe:  # whole backbone frozen, linear head: the converged probe, no lr or optimizer drawn
            assert "lr" not in trial.params and "optimizer" not in trial.params and params.head_init == "probe"
            continue
        assert 1e-4 <= params.lr <= 1e-2
        assert params.optimizer in ("adam", "sgd")
        if params.head.kind == "linear":
            assert params.head_init == trial.params["head_init"] in ("random", "probe")
        if params.head.kind == "mlp":
            assert params.head.hidden in (64, 128)
            assert 0.1 <= params.head.dropout <= 0.3
            assert trial.params["head_hidden"] == params.head.hidden
            assert trial.params["head_dropout"] == params.head.dropout
        else:
            assert params.head == HeadConfig("linear")
            assert "head_hidden" not in trial.params and "head_dropout" not in trial.params
        assert trial.params["lr"] == params.lr and trial.params["backbone"] == params.backbone
    seen = {(p.backbone, p.frozen_stages) for _, p in samples}
    # Every depth is reachable, and the small backbone is never frozen beyond its 2 stages.
    assert {f for b, f in seen if b == "small"} == {0, 1, 2}
    assert {f for b, f in seen if b == "big"} == {0, 1, 2, 3, 4, 5}
    assert {p.head.kind for _, p in samples} == {"linear", "mlp"}
    assert {p.optimizer for _, p in samples if not p.probe} == {"adam", "sgd"}
    lrs = sorted(p.lr for _, p in samples)
    assert lrs[len(lrs) // 2] < 2e-3  # log-uniform: the median sits near 1e-3, not near 5e-3


def test_suggest_range_clipped_to_backbone_stages():
    config = _config(backbones=["small", "big"], frozen_stages="3-4").validate()
    for _, params in _sample(config, 60):
        if params.backbone == "small":
            assert params.frozen_stages == 2  # 3-4 clipped into 0..2
        else:
            assert params.frozen_stages in (3, 4)


def test_suggest_pinned_values():
    config = _config(backbones=["big"], lr=(3e-4, 3e-4), heads=["mlp"], head_hidden=[256], head_dropout=(0.2, 0.2),
                     optimizers=["adamw"], frozen_stages="1-1").validate()
    for trial, params in _sample(config, 5):
        assert params.lr == 3e-4
        assert params.head == HeadConfig("mlp", 256, 0.2)
        assert params.frozen_stages == 1
        assert params.optimizer == "adamw"
        assert "lr" not in trial.params and "head_dropout" not in trial.params
        assert trial.user_attrs["lr"] == 3e-4 and trial.user_attrs["head_dropout"] == 0.2


def test_suggest_choice_spec_only_listed_depths():
    config = _config(backbones=["small", "big"], frozen_stages="0,all").validate()
    samples = _sample(config, 60)
    for trial, params in samples:
        assert params.frozen_stages in (0, STAGES[params.backbone])
        assert trial.params["frozen_stages"] in ("0", "all")
        assert params.frozen_stages == (0 if trial.params["frozen_stages"] == "0" else params.num_stages)
    seen = {(p.backbone, p.frozen_stages) for _, p in samples}
    assert seen == {("small", 0), ("small", 2), ("big", 0), ("big", 5)}


def test_suggest_choice_spec_number_above_stage_count_is_clipped():
    config = _config(backbones=["small", "big"], frozen_stages="4").validate()
    for _, params in _sample(config, 20):
        assert params.frozen_stages == min(4, params.num_stages)


def test_suggest_default_config_values():
    config = _config(backbones=["small", "big"]).validate()
    for trial, params in _sample(config, 40, seed=3):
        if params.probe:
            assert params.optimizer == "lbfgs" and "lr" not in trial.params
            continue
        assert config.lr[0] <= params.lr <= config.lr[1]
        if params.head.kind == "mlp":
            assert params.head.hidden in HEAD_HIDDEN
        assert params.optimizer in config.optimizers


@pytest.mark.parametrize("dataset, name", [
    ("builtin:digits", "digits"), ("builtin:digits:0-4", "digits-0-4"), ("data/flowers/", "flowers"),
    ("data/manifest.csv", "manifest"), ("wds:shards/train-{000000..000003}.tar", "train"), ("shards/x.tar.gz", "x"),
])
def test_default_study_name_is_readable(dataset, name):
    from autotransfer.search import default_study_name

    assert default_study_name(dataset) == name


def test_default_crop_is_the_pretrained_size_capped_on_cpu_and_at_four_times_the_images():
    import torch

    from autotransfer.backbones import BackboneInfo
    from autotransfer.backbones import Preprocessing
    from autotransfer.prepared import trial_inputs

    def info(size: int, fixed: bool = False) -> BackboneInfo:
        return BackboneInfo("net", 5, 64, Preprocessing(size, (0.5,) * 3, (0.25,) * 3, 0.875), fixed)

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert trial_inputs(info(224), None, cpu, 500).image_size == 224  # ImageNet's size is kept on CPU
    assert trial_inputs(info(384), None, cpu, 500).image_size == 224  # larger pretrained sizes are capped there
    assert trial_inputs(info(384), None, gpu, 500).image_size == 384  # not on a GPU
    assert trial_inputs(info(224), None, cpu, 8).image_size == 32  # 8 px digits: 4x their size
    assert trial_inputs(info(224), 96, cpu, 500).image_size == 96  # --image-size wins
    assert trial_inputs(info(384, fixed=True), 96, cpu, 500).image_size == 384  # a fixed-size model keeps its own
    assert trial_inputs(info(224), None, cpu, 500).resize_size == 256  # 224 / crop_pct


def test_a_dataset_path_is_stored_one_way_so_a_trailing_slash_resumes_the_study():
    from autotransfer.config import normalise_dataset
    from autotransfer.flags import given

    assert normalise_dataset("../x/") == normalise_dataset("../x/.") == normalise_dataset("../x") == "../x"
    for uri in ("builtin:digits:0-4", "wds:shards/train-{0..3}.tar"):
        assert normalise_dataset(uri) == uri  # source URIs are not paths
    assert given(SearchConfig, {"dataset": "data/images/"}) == {"dataset": "data/images"}  # as the flag reads it
    stored = SearchConfig(dataset="data/images/").validate()
    assert stored.dataset == "data/images"
    assert SearchConfig.from_dict({**stored.to_dict(), "dataset": "data/images/"}).conflicts_with(stored) == []
    older = SearchConfig(dataset="x")
    older.dataset = "data/images/"  # a study stored before paths were normalised
    assert SearchConfig(dataset="data/images").conflicts_with(older) == []
    assert SearchConfig(dataset="data/other").conflicts_with(older) == ["dataset"]
