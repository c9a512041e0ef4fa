"""Trial paths: cached features for frozen backbones, boundary replay for partly frozen ones, the plain
path as the reference both must match. Tiny timm models, random init, CPU."""

from __future__ import annotations

import copy
import re

import optuna
import pandas as pd
import pytest
import torch
from torch import nn

from autotransfer.backbones import WeightsRequest, provider_for
from autotransfer.cache.boundary import NoBoundary, Replay, ReplayedModel, capture, verified_boundary
from autotransfer.cli import main
from autotransfer.data import BuiltinSource, eval_transform, prepare
from autotransfer.cache.plan import CachePolicy, TrialCaches
from autotransfer.heads import HeadConfig
from autotransfer.model import TransferModel, assemble
from autotransfer.plugins import registries
from autotransfer.trainer import FitSettings, TrialInputs, train

CPU = torch.device("cpu")
INPUTS = TrialInputs(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def digits():
    return prepare(BuiltinSource().load("builtin:digits:0-4"), 32, val_fraction=0.3, seed=0)


def tiny_model(name: str, frozen: int, head: HeadConfig = HeadConfig("linear"), classes: int = 5) -> TransferModel:
    torch.manual_seed(0)
    backbone = provider_for(name, registries()).create(name, WeightsRequest(pretrained=False))
    return assemble(backbone, head, classes, frozen)


def num_stages(name: str) -> int:
    return provider_for(name, registries()).describe(name).num_stages


def settings(epochs: int = 3, seed: int = 7) -> FitSettings:
    return FitSettings("adam", 3e-3, epochs, 32, CPU, seed)


# --------------------------------------------------------------------------- fully frozen

@pytest.mark.parametrize("head", [HeadConfig("linear"), HeadConfig("mlp", 64, 0.3)])
def test_cached_features_match_the_uncached_path_without_augmentation(digits, tmp_path, head):
    stages = num_stages("test_resnet")
    plain_model = tiny_model("test_resnet", stages, head)
    cached_model = copy.deepcopy(plain_model)
    plain = train(plain_model, digits.train, digits.val, INPUTS, settings(), augment=False)

    caches = TrialCaches(CachePolicy(folder=tmp_path))
    path = caches.plan(cached_model, ("test_resnet", "random"), digits.train, digits.val, INPUTS, stages, stages,
                       settings())
    assert path.mode == "features" and re.fullmatch(r"features: train extracted in .* s, val extracted in .* s", path.note)
    cached = path.run(lambda stats: None)

    one_image = 1 / len(digits.val)
    for a, b in zip(plain, cached):
        assert abs(a.val_accuracy - b.val_accuracy) <= one_image + 1e-9
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-3)
        assert b.train_seconds > 0 and b.seconds >= b.train_seconds
    for p, c in zip(plain_model.head.parameters(), cached_model.head.parameters()):
        assert torch.allclose(p, c, atol=1e-4)
    assert [p.data_ptr() for p in cached_model.backbone.parameters()]  # still the whole model

    again = TrialCaches(CachePolicy(folder=tmp_path)).plan(copy.deepcopy(plain_model), ("test_resnet", "random"),
                                                           digits.train, digits.val, INPUTS, stages, stages, settings())
    assert again.note == "features: train from the cache, val from the cache"


# --------------------------------------------------------------------------- boundary replay

REPLAY_CASES = [("test_resnet", k) for k in (1, 2, 4)] + [("test_efficientnet", k) for k in (1, 3, 5)] + \
               [("test_vit", k) for k in (1, 3, 6)]


@pytest.mark.parametrize("name, frozen", REPLAY_CASES)
def test_boundary_replay_reproduces_the_forward_pass_and_its_gradients(digits, name, frozen):
    model = tiny_model(name, frozen)
    images = eval_transform(digits.train.images[:6], 32, INPUTS.mean, INPUTS.std)
    boundary = verified_boundary(model.backbone, images)
    activation = capture(model.backbone, boundary, images)
    assert tuple(activation.shape[1:]) == boundary.shape

    model.eval()
    with torch.no_grad():
        expected = model(images)
        with Replay(model.backbone, boundary) as replay:
            got = ReplayedModel(model, replay)(activation)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)

    # In training mode too (the tail's BatchNorm on batch statistics): same loss, same gradients.
    plain, replayed = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    labels = digits.train.labels[:6]
    nn.functional.cross_entropy(plain(images), labels).backward()
    boundary = verified_boundary(replayed.backbone, images)
    cached = capture(replayed.backbone, boundary, images)
    with Replay(replayed.backbone, boundary) as replay:
        logits = ReplayedModel(replayed, replay)(cached)
    nn.functional.cross_entropy(logits, labels).backward()
    pairs = [(a.grad, b.grad) for a, b in zip(plain.parameters(), replayed.parameters()) if a.requires_grad]
    assert pairs and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)


class SkipNet(nn.Module):
    """A stem whose output is also used after the trainable body: no single boundary activation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.num_features = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        stem = self.stem(images)
        return (self.body(stem) + stem).mean(dim=(2, 3))


def test_a_model_that_cannot_be_replayed_falls_back_to_the_plain_path(digits):
    model = TransferModel(SkipNet(), nn.Linear(4, 5))
    model.freeze_stages([["stem.weight", "stem.bias"], ["body.weight", "body.bias"]], 1)
    images = eval_transform(digits.train.images[:6], 32, INPUTS.mean, INPUTS.std)
    with pytest.raises(NoBoundary, match="does not reproduce"):
        verified_boundary(model.backbone, images)
    path = TrialCaches(CachePolicy()).plan(model, "skipnet", digits.train, digits.val, INPUTS, 1, 2, settings(1))
    assert path.mode == "plain" and path.note == "cache: plain (replay from body does not reproduce the forward pass)"
    assert len(path.run(lambda stats: None)) == 1


def test_boundary_path_trains_on_views_and_is_shared_between_trials(digits):
    caches = TrialCaches(CachePolicy(views=2, seed=3))
    first = caches.plan(tiny_model("test_resnet", 2), "r", digits.train, digits.val, INPUTS, 2, 5, settings(3))
    assert first.mode == "boundary" and re.fullmatch(r"2 view\(s\) at layer2, [\d.]+ MB", first.note), first.note
    history = first.run(lambda stats: None)
    assert len(history) == 3 and all(0 <= s.val_accuracy <= 1 for s in history)
    assert re.fullmatch(r"2 view\(s\) at layer2, [\d.]+ MB; 3 from images, [\d.]+ s",
                        first.describe()), first.describe()  # 2 views and validation; epoch 3 reads view 0 again
    second = caches.plan(tiny_model("test_resnet", 2, HeadConfig("mlp", 32, 0.1)), "r", digits.train, digits.val,
                         INPUTS, 2, 5, settings(3, seed=8))
    second.run(lambda stats: None)
    assert second.mode == "boundary" and second.describe().endswith("; 3 part(s) reused"), second.describe()


def test_a_pruned_trial_computes_only_the_views_it_read(digits):
    caches = TrialCaches(CachePolicy(views=3))
    path = caches.plan(tiny_model("test_resnet", 2), "r", digits.train, digits.val, INPUTS, 2, 5, settings(3))
    (entry,) = caches._entries.values()
    assert all(part is None for part in entry.parts)  # planning computes nothing
    with pytest.raises(Killed):
        path.run(die_after_first)
    assert [part is not None for part in entry.parts] == [True, False, False, True]  # view 0 and validation
    assert re.fullmatch(r"3 view\(s\) at layer2, [\d.]+ MB; 2 from images, [\d.]+ s", path.describe()), path.describe()


def test_a_deeper_boundary_is_computed_from_a_shallower_cache_and_trains_the_same(digits):
    """Trial at layer1, then at layer3: the layer3 activations come from replaying the cached layer1
    ones through layer1-2, equal to computing them from the images, and training on them is the same."""
    shared = TrialCaches(CachePolicy(views=2, seed=5))
    shared.plan(tiny_model("test_resnet", 1), "r", digits.train, digits.val, INPUTS, 1, 5, settings(2)).run(
        lambda stats: None)
    deep_model = tiny_model("test_resnet", 3)
    deep = shared.plan(deep_model, "r", digits.train, digits.val, INPUTS, 3, 5, settings(2))
    derived = deep.run(lambda stats: None)
    assert "3 from the layer1 cache" in deep.describe() and "from images" not in deep.describe(), deep.describe()

    alone = TrialCaches(CachePolicy(views=2, seed=5))
    alone_model = tiny_model("test_resnet", 3)
    direct = alone.plan(alone_model, "r", digits.train, digits.val, INPUTS, 3, 5, settings(2))
    expected = direct.run(lambda stats: None)
    assert "3 from images" in direct.describe()
    (by_replay,) = [e for key, e in shared._entries.items() if key[1] == "layer3"]
    (by_images,) = alone._entries.values()
    for a, b in zip(by_replay.parts, by_images.parts):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [s.val_accuracy for s in derived] == [s.val_accuracy for s in expected]
    assert [s.train_loss for s in derived] == pytest.approx([s.train_loss for s in expected], rel=1e-4)


def test_a_derivation_that_does_not_match_the_images_is_not_used(digits, monkeypatch):
    import autotransfer.cache.plan as fastpath

    shared = TrialCaches(CachePolicy(views=1))
    shared.plan(tiny_model("test_resnet", 1), "r", digits.train, digits.val, INPUTS, 1, 5, settings(1)).run(
        lambda stats: None)
    monkeypatch.setattr(fastpath, "capture_from", lambda backbone, source, activation, target:
                        torch.zeros((len(activation), *target.shape)))  # a replay that gets it wrong
    deep = shared.plan(tiny_model("test_resnet", 3), "r", digits.train, digits.val, INPUTS, 3, 5, settings(1))
    deep.run(lambda stats: None)
    assert re.fullmatch(r"1 view\(s\) at layer3, [\d.]+ MB; 2 from images, [\d.]+ s", deep.describe()), deep.describe()


def test_the_boundary_cache_evicts_the_least_recently_used_entry_to_stay_in_budget(digits):
    sizes = {}
    for frozen in (2, 3):
        probe = TrialCaches(CachePolicy(views=1))
        probe.plan(tiny_model("test_resnet", frozen), "r", digits.train, digits.val, INPUTS, frozen, 5, settings(1))
        (entry,) = probe._entries.values()
        sizes[frozen] = entry.planned
    caches = TrialCaches(CachePolicy(views=1, memory=max(sizes.values()) + 1))  # room for one at a time
    assert sum(sizes.values()) > caches.policy.memory
    for frozen, kept in ((3, ["layer3"]), (2, ["layer2"]), (3, ["layer3"])):
        path = caches.plan(tiny_model("test_resnet", frozen), "r", digits.train, digits.val, INPUTS, frozen, 5,
                           settings(1))
        path.run(lambda stats: None)
        assert path.mode == "boundary" and [key[1] for key in caches._entries] == kept
        assert sum(e.nbytes for e in caches._entries.values()) <= caches.policy.memory


def test_capturing_keeps_the_frozen_stages_in_eval_mode(digits):
    model = tiny_model("test_resnet", 2).train()
    modes = {name: m.training for name, m in model.named_modules()}
    images = eval_transform(digits.train.images[:4], 32, INPUTS.mean, INPUTS.std)
    capture(model.backbone, verified_boundary(model.backbone, images), images)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.backbone.layer1.training and model.backbone.layer3.training


def test_boundary_cache_over_budget_falls_back_with_the_reason(digits):
    caches = TrialCaches(CachePolicy(memory=100_000))
    path = caches.plan(tiny_model("test_resnet", 2), "r", digits.train, digits.val, INPUTS, 2, 5, settings(1))
    assert path.mode == "plain"
    assert re.fullmatch(r"cache: plain \(boundary cache [\d.]+ MB > --cache-memory 100\.0 kB\)", path.note), path.note


def test_no_cache_and_unfrozen_trials_take_the_plain_path(digits):
    off = TrialCaches(CachePolicy(enabled=False)).plan(tiny_model("test_resnet", 5), "r", digits.train, digits.val,
                                                        INPUTS, 5, 5, settings(1))
    assert off.mode == "plain" and off.note == "cache off (--no-cache)"
    unfrozen = TrialCaches(CachePolicy()).plan(tiny_model("test_resnet", 0), "r", digits.train, digits.val, INPUTS,
                                               0, 5, settings(1))
    assert unfrozen.mode == "plain" and unfrozen.note == ""


# --------------------------------------------------------------------------- through the search

@pytest.mark.slow
def test_search_records_the_cache_path_of_every_trial(tmp_path):
    out = tmp_path / "s"
    assert main(["search", "--dataset", "builtin:digits:0-4", "--backbones", "test_resnet,test_efficientnet",
                 "--no-pretrained", "--frozen-stages", "0,2,all", "--trials", "6", "--epochs", "2",
                 "--pruner", "none", "--out", str(out), "--quiet"]) == 0
    study = optuna.load_study(study_name="digits-0-4", storage=f"sqlite:///{out / 'study.db'}")
    expected = {0: "plain", 2: "boundary"}
    for trial in study.trials:
        frozen, stages = trial.user_attrs["frozen_stages"], trial.user_attrs["num_stages"]
        assert trial.user_attrs["cache"] == ("features" if frozen == stages else expected[frozen])
        if trial.user_attrs["cache"] == "boundary":  # after the trial: where its activations came from
            assert re.fullmatch(r"2 view\(s\) at \S+, [\d.]+ [kMG]?B; .*(reused|from images|cache).*",
                                trial.user_attrs["cache_note"]), trial.user_attrs["cache_note"]
    board = pd.read_csv(out / "leaderboard.csv")
    assert set(board["cache"]) <= {"features", "boundary", "plain"}
    # pooled features are extracted (and cached) for a fully frozen trial, and for the probe an LP-FT trial starts from
    assert (out / "features").is_dir() == any(t.user_attrs["cache"] == "features" or
                                              t.user_attrs.get("head_init") == "probe" for t in study.trials)


@pytest.mark.slow
def test_trials_reuse_the_features_prerank_extracted(tmp_path):
    out = tmp_path / "p"
    assert main(["search", "--dataset", "builtin:digits:0-4", "--backbones", "test_resnet,test_efficientnet",
                 "--no-pretrained", "--prerank", "hscore", "--top-k", "1", "--frozen-stages", "all", "--features", "final",
                 "--trials", "1",
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    trial = optuna.load_study(study_name="digits-0-4", storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert trial.user_attrs["cache"] == "features"
    assert trial.user_attrs["cache_note"].startswith("features: train from the cache, val extracted in")


# --------------------------------------------------------------------------- checkpoints and resume on every path

class Killed(Exception):
    pass


def die_after_first(stats) -> None:
    if stats.epoch == 1:
        raise Killed


@pytest.mark.parametrize("frozen", [2, 5])  # boundary, features
def test_a_cached_path_resumes_from_its_checkpoint_as_if_never_stopped(digits, frozen):
    straight_model = tiny_model("test_resnet", frozen)
    straight = TrialCaches(CachePolicy()).plan(straight_model, "r", digits.train, digits.val, INPUTS, frozen, 5,
                                               settings(3))
    assert straight.mode == ("boundary" if frozen == 2 else "features")
    expected = straight.run(lambda stats: None)

    saved = []
    stopped = TrialCaches(CachePolicy()).plan(tiny_model("test_resnet", frozen), "r", digits.train, digits.val,
                                              INPUTS, frozen, 5, settings(3))
    with pytest.raises(Killed):
        stopped.run(die_after_first, on_checkpoint=saved.append)
    assert [s.epoch for s in saved] == [1]
    resumed_model = tiny_model("test_resnet", frozen)
    resumed = TrialCaches(CachePolicy()).plan(resumed_model, "r", digits.train, digits.val, INPUTS, frozen, 5,
                                              settings(3))
    history = resumed.run(lambda stats: None, resume=saved[0])
    assert [s.epoch for s in history] == [1, 2, 3]
    assert [s.val_accuracy for s in history] == pytest.approx([s.val_accuracy for s in expected])
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_from_one_path_restores_on_another(digits):
    """A retry on another machine may plan another path: checkpoints hold the whole model's tensors."""
    saved = []
    boundary = TrialCaches(CachePolicy()).plan(tiny_model("test_resnet", 2), "r", digits.train, digits.val, INPUTS, 2,
                                               5, settings(3))
    assert boundary.mode == "boundary"
    with pytest.raises(Killed):
        boundary.run(die_after_first, on_checkpoint=saved.append)
    model = tiny_model("test_resnet", 2)
    plain = TrialCaches(CachePolicy(enabled=False)).plan(model, "r", digits.train, digits.val, INPUTS, 2, 5,
                                                         settings(3))
    history = plain.run(lambda stats: None, resume=saved[0], accumulation=2)
    assert plain.mode == "plain" and [s.epoch for s in history] == [1, 2, 3]
    assert history[0] == type(history[0])(**saved[0].history[0])
