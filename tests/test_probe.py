"""Issue 16: converged probe heads on frozen features, LP-FT from the probe, and the two-stage opening."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from torch import nn

from autotransfer.cli import main
from autotransfer.config import PROBE_CS, SearchConfig
from autotransfer.probe import fit_probe
from autotransfer.portfolio import FOLLOW_UP_ATTR, PORTFOLIO_ATTR, Opening
from autotransfer.portfolio import recipes as portfolio

TINY = ["--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--image-size", "16", "--epochs", "2",
        "--device", "cpu", "--quiet"]


def blobs(classes: int, n: int = 60, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 3, (classes, dim))
    scales = rng.uniform(0.01, 50, dim)  # very unequal feature scales: the scaler matters
    return ((centres[labels] + rng.normal(0, 1, (n, dim))) * scales).astype(np.float32), labels


@pytest.mark.parametrize("classes", [2, 4])
def test_the_probe_is_sklearns_standardised_logistic_regression_as_a_linear_layer(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(classes)
    probe = fit_probe(x, y, classes, seed=0)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=probe.c, max_iter=2000)).fit(x, y)
    np.testing.assert_allclose(torch.from_numpy(probe.logits(x)).softmax(1).numpy(), reference.predict_proba(x),
                               atol=1e-4)
    layer = nn.Linear(x.shape[1], classes)
    probe.load_into(layer)
    with torch.no_grad():
        assert (layer(torch.from_numpy(x)).argmax(1).numpy() == reference.predict(x)).all()


def test_a_class_missing_from_training_never_wins():
    x, y = blobs(3)
    probe = fit_probe(x[y < 2], y[y < 2], num_classes=3, seed=0)
    assert probe.weight.shape == (3, x.shape[1]) and set(probe.predict(x)) <= {0, 1}


def weights_file(tmp_path: Path) -> Path:
    """A backbone state dict on disk, so test_resnet counts as pretrained (from a file) offline."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


def test_a_fully_frozen_trial_is_never_worse_than_the_benchmark_probe(tmp_path):
    """Same backbone, same images, same seed: the search's probe trial and the bench's linear-probe method
    fit the same model, so the trial's val accuracy is the probe's (never below it)."""
    from autotransfer.bench.methods import MethodRun, linear_probe
    from autotransfer.bench.suite import Budget

    weights = weights_file(tmp_path)
    out = tmp_path / "search"
    assert main(["search", *TINY, "--weights", f"test_resnet={weights}", "--frozen-stages", "all", "--heads",
                 "linear", "--features", "final", "--trials", "1", "--out", str(out)]) == 0
    trial = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert trial.user_attrs["head_init"] == "probe" and not trial.intermediate_values  # nothing for the pruner
    assert "lr" not in trial.params and "optimizer" not in trial.params
    run = MethodRun(dataset="builtin:digits:0-2", backbones=["test_resnet"], weights={"test_resnet": str(weights)},
                    budget=Budget(trials=1, epochs=2, timeout_s=None), seed=0, work=tmp_path / "bench", image_size=16, device="cpu")
    baseline = linear_probe(run)
    assert trial.value >= baseline.best_val_accuracy
    assert trial.value == pytest.approx(baseline.best_val_accuracy)


def test_a_probe_trial_at_a_drawn_c_fits_at_that_c(tmp_path, capsys):
    weights = weights_file(tmp_path)
    out = tmp_path / "fixed-c"
    assert main(["search", *TINY, "--weights", f"test_resnet={weights}", "--frozen-stages", "all", "--heads",
                 "linear", "--features", "final", "--probe-c", "0.05", "--trials", "1", "--out", str(out)]) == 0
    trial = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert trial.params["probe_c"] == "0.05" and trial.user_attrs["probe_c"] == 0.05
    assert pd.read_csv(out / "leaderboard.csv")["probe_c"].tolist() == [0.05]
    assert main(["search", *TINY, "--probe-c", "0.05,weak", "--out", str(tmp_path / "bad")]) == 2
    assert "--probe-c: 'weak' is neither 'cv' nor a positive number" in capsys.readouterr().err


def test_the_probe_trial_does_not_need_the_cache(tmp_path):
    weights = weights_file(tmp_path)
    out = tmp_path / "nocache"
    assert main(["search", *TINY, "--weights", f"test_resnet={weights}", "--frozen-stages", "all", "--heads",
                 "linear", "--trials", "1", "--no-cache", "--out", str(out)]) == 0
    trial = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}").trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["cache"] == "features"
    assert not (out / "features").exists() or not any((out / "features").iterdir())


def test_lp_ft_starts_from_the_probe_and_keeps_its_normalisation_statistics(tmp_path):
    from autotransfer.backbones import provider_for
    from autotransfer.cache.features import forward_features
    from autotransfer.heads import HeadConfig
    from autotransfer.model import assemble
    from autotransfer.search import RunOptions, Search, weights_request
    from autotransfer.trainer import accuracy

    config = SearchConfig(dataset="builtin:digits:0-2", backbones=["test_resnet"], image_size=16,
                          weights={"test_resnet": str(weights_file(tmp_path))}, trials=1).validate()
    search = Search(config, RunOptions(out=tmp_path / "lpft", storage="", study_name="", device="cpu", quiet=True))
    search.prepare()
    request, inputs = weights_request(config, "test_resnet"), search.inputs_for("test_resnet")
    model = assemble(provider_for("test_resnet", search.registries).create("test_resnet", request),
                     HeadConfig("linear"), search.data.num_classes, 2)
    train, val = (split.at_size(inputs.resize_size) for split in (search.data.train, search.data.val))
    probe = search.caches.probe_head(model, ("test_resnet", request), train, inputs, search.device, seed=0)
    expected = float((probe.predict(forward_features(model.backbone, val, inputs, search.device)) ==
                      val.labels.numpy()).mean())
    assert accuracy(model, val, inputs, search.device) == pytest.approx(expected)
    model.keep_norm_statistics()
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert any(p.requires_grad for m in norms for p in m.parameters())  # affine weights of trained stages train


def test_the_portfolio_stays_inside_the_configured_space():
    base = SearchConfig(dataset="d", backbones=["b"], trials=10).validate()
    recipes = portfolio(base, "b", 5, pretrained=True)
    assert list(recipes) == ["stage-probe", "probe", "fine-tune", "lp-ft"]  # the order they are queued in
    assert recipes["probe"] == {"backbone": "b", "frozen_stages": 5, "features": "final", "head": "linear",
                                "probe_c": "cv"}  # C by CV on train: the opening asks nothing of val
    assert recipes["stage-probe"] == {"backbone": "b", "frozen_stages": 5, "features": "stages", "head": "linear",
                                      "probe_c": "cv"}
    fixed_c = SearchConfig(dataset="d", backbones=["b"], probe_cs=["0.1", "1"], trials=10).validate()
    assert portfolio(fixed_c, "b", 5, pretrained=True)["probe"]["probe_c"] == "0.1"  # the first allowed C
    final_only = SearchConfig(dataset="d", backbones=["b"], features=["final"], trials=10).validate()
    assert list(portfolio(final_only, "b", 5, pretrained=True)) == ["probe", "fine-tune", "lp-ft"]
    assert recipes["lp-ft"] == {"backbone": "b", "frozen_stages": 2, "head": "linear", "head_init": "probe",
                                "lr": 1e-4, "optimizer": "adam"}
    assert recipes["fine-tune"] == {"backbone": "b", "frozen_stages": 0, "head": "linear", "head_init": "random",
                                    "lr": 3e-3, "optimizer": "adam"}
    assert list(portfolio(base, "b", 5, pretrained=False)) == ["fine-tune"]  # a probe of noise is no recipe
    mlp_only = SearchConfig(dataset="d", backbones=["b"], heads=["mlp"], lr=(3e-4, 3e-4), trials=10).validate()
    assert portfolio(mlp_only, "b", 5, True) == {"fine-tune": {"backbone": "b", "frozen_stages": 0, "head": "mlp",
                                                               "head_hidden": 128, "head_dropout": 0.0,
                                                               "optimizer": "adam"}}
    frozen_only = SearchConfig(dataset="d", backbones=["b"], frozen_stages="all", trials=10).validate()
    assert list(portfolio(frozen_only, "b", 5, True)) == ["stage-probe", "probe"]
    shallow = SearchConfig(dataset="d", backbones=["b"], frozen_stages="2-3", lr=(1e-2, 1e-1), trials=10).validate()
    shallow_recipes = portfolio(shallow, "b", 5, True)
    assert shallow_recipes == {
        "fine-tune": {"backbone": "b", "frozen_stages": 2, "head": "linear", "head_init": "random", "lr": 1e-2,
                      "optimizer": "adam"},
        "lp-ft": {"backbone": "b", "frozen_stages": 2, "head": "linear", "head_init": "probe", "lr": 1e-2,
                  "optimizer": "adam"}}
    assert list(shallow_recipes) == ["fine-tune", "lp-ft"]


def _opening(trials: int | None = 10, pretrained: dict[str, bool] | None = None) -> Opening:
    pretrained = pretrained or {"a": True, "b": True, "r": False}
    config = SearchConfig(dataset="d", backbones=list(pretrained), trials=trials).validate()
    return Opening(config, list(pretrained), {name: 5 for name in pretrained}, pretrained)


def _probe_trial(backbone: str, value: float | None, state=optuna.trial.TrialState.COMPLETE, kind: str = "probe"):
    dists = {"backbone": optuna.distributions.CategoricalDistribution([backbone]),
             "frozen_stages": optuna.distributions.IntDistribution(0, 5),
             "features": optuna.distributions.CategoricalDistribution(["final", "stages"]),
             "head": optuna.distributions.CategoricalDistribution(["linear"])}
    features = "stages" if kind == "stage-probe" else "final"
    return optuna.trial.create_trial(state=state, value=value, params={"backbone": backbone, "frozen_stages": 5,
                                                                      "features": features, "head": "linear"},
                                     distributions=dists, user_attrs={PORTFOLIO_ATTR: kind})


def test_the_opening_probes_first_then_follows_up_on_the_best_probed_backbone_only():
    opening = _opening()
    assert [(kind, p["backbone"]) for kind, p in opening.first()] == [  # not "r"; every stage probe first
        ("stage-probe", "a"), ("stage-probe", "b"), ("probe", "a"), ("probe", "b")]
    study = optuna.create_study(direction="maximize")
    opening.queue_first(study)
    assert opening.queue_due(study) == []  # the probes are queued, not finished
    waiting = study.get_trials(deepcopy=False)
    assert [t.state for t in waiting] == [optuna.trial.TrialState.WAITING] * 4

    finished = optuna.create_study(direction="maximize")
    finished.add_trial(_probe_trial("a", 0.80))
    assert opening.follow_up(finished.trials + [_probe_trial("b", None, optuna.trial.TrialState.RUNNING)]) is None
    finished.add_trial(_probe_trial("b", 0.85))
    backbone, queue = opening.follow_up(finished.trials)
    assert backbone == "b" and [kind for kind, _ in queue] == ["fine-tune", "lp-ft"]
    assert all(params["backbone"] == "b" for _, params in queue)
    assert opening.queue_due(finished) == queue and finished.user_attrs[FOLLOW_UP_ATTR] == "b"
    assert opening.queue_due(finished) == []  # queued once: a resumed study or another worker does not repeat it
    assert [t.user_attrs[PORTFOLIO_ATTR] for t in finished.trials] == ["probe", "probe", "fine-tune", "lp-ft"]

    by_stages = [_probe_trial("a", 0.80), _probe_trial("b", 0.85), _probe_trial("a", 0.95, kind="stage-probe"),
                 _probe_trial("b", 0.90, kind="stage-probe")]
    assert opening.follow_up(by_stages)[0] == "a"  # the best probe of either kind picks the backbone
    assert opening.follow_up([*by_stages, _probe_trial("b", None, optuna.trial.TrialState.WAITING,
                                                       kind="stage-probe")]) is None  # every probe must finish


def test_the_opening_follow_up_breaks_ties_to_the_earlier_probe_and_needs_one_that_completed():
    opening = _opening()
    tied = [_probe_trial("a", 0.9), _probe_trial("b", 0.9)]
    for number, trial in enumerate(tied):
        trial.number = number
    assert opening.follow_up(tied)[0] == "a"
    failed = [_probe_trial("a", None, optuna.trial.TrialState.FAIL)]
    assert opening.follow_up(failed) is None  # nothing measured: the sampler takes over
    assert opening.follow_up([]) is None


def test_the_opening_never_queues_past_the_budget_and_without_probes_queues_every_recipe():
    opening = _opening(trials=3)
    study = optuna.create_study(direction="maximize")
    study.add_trial(_probe_trial("a", 0.8))
    study.add_trial(_probe_trial("b", 0.7))
    assert [kind for kind, _ in opening.queue_due(study)] == ["fine-tune"]  # 2 probes + 1: the budget of 3
    assert len(study.trials) == 3

    one = _opening(trials=1)
    queued, cut = one.queue_first(optuna.create_study(direction="maximize"))
    assert [(kind, p["backbone"]) for kind, p in queued] == [("stage-probe", "a")] and cut == 3  # "3 more left out"

    random_only = _opening(pretrained={"r": False, "s": False})
    assert [(kind, p["backbone"]) for kind, p in random_only.first()] == [("fine-tune", "r"), ("fine-tune", "s")]


@pytest.mark.slow
def test_a_new_study_opens_with_the_portfolio_and_a_resumed_one_does_not_replay_it(tmp_path):
    weights = weights_file(tmp_path)
    out = tmp_path / "open"
    args = ["search", *TINY, "--weights", f"test_resnet={weights}", "--out", str(out)]
    assert main([*args, "--trials", "4"]) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    trials = optuna.load_study(study_name="digits-0-2", storage=storage).trials
    assert [t.user_attrs.get("portfolio") for t in trials] == ["stage-probe", "probe", "fine-tune", "lp-ft"]
    assert [t.user_attrs["head_init"] for t in trials] == ["probe", "probe", "random", "probe"]
    assert [t.params.get("features") for t in trials] == ["stages", "final", None, None]
    assert "train from the cache, val from the cache" in trials[1].user_attrs["cache_note"]  # the stage pass's columns
    assert trials[3].user_attrs["probe_c"] > 0
    board = pd.read_csv(out / "leaderboard.csv").set_index("trial")
    assert [board.loc[n, "opening"] for n in range(4)] == ["stage-probe", "probe", "fine-tune", "lp-ft"]
    assert main([*args, "--trials", "6"]) == 0
    trials = optuna.load_study(study_name="digits-0-2", storage=storage).trials
    assert len(trials) == 6 and [t.user_attrs.get("portfolio") for t in trials[4:]] == [None, None]

    plain = tmp_path / "plain"
    assert main(["search", *TINY, "--weights", f"test_resnet={weights}", "--out", str(plain), "--trials", "1",
                 "--no-portfolio"]) == 0
    first = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{plain / 'study.db'}").trials[0]
    assert "portfolio" not in first.user_attrs


def _config_study(config: SearchConfig, stages: dict[str, int], base) -> optuna.Study:
    from autotransfer.space import ProbeOnce

    return optuna.create_study(direction="maximize", sampler=ProbeOnce(base, config, stages))


@pytest.mark.parametrize("heads, spec", [(["linear", "mlp"], "0-all"), (["linear"], "0-all"), (["linear"], "0,2,all")])
def test_a_finished_probe_is_never_drawn_again(heads, spec):
    from autotransfer.space import suggest

    config = SearchConfig(dataset="d", backbones=["b"], heads=heads, frozen_stages=spec, trials=40).validate()
    for base in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=0, n_startup_trials=3,
                                                                                   multivariate=True, group=True)):
        study = _config_study(config, {"b": 3}, base)
        probe = {"backbone": "b", "frozen_stages": 3 if spec == "0-all" else "all", "features": "final",
                 "head": "linear", "probe_c": "cv"}
        study.enqueue_trial(probe)
        drawn = []
        for _ in range(25):
            trial = study.ask()
            params = suggest(trial, config, lambda name: 3)
            drawn.append(params)
            study.tell(trial, 0.9 if params.probe else 0.5)  # the probes score best: TPE would chase them
        probes = [(p.features, p.probe_c) for p in drawn if p.probe]
        assert drawn[0].probe and len(probes) == len(set(probes))  # each (features, C) probe at most once
        assert len(probes) > 2  # more than one C per kind of features is drawn: the sampler chases the probes
        assert {features for features, _ in probes} <= {"final", "stages"}
        assert {c for _, c in probes} <= {None} | {float(c) for c in PROBE_CS[1:]}


def test_with_only_probes_allowed_every_features_and_c_pair_is_drawn_once():
    """frozen_stages and head pinned (never sampled): the guard must still see them, so a space of only
    probes is walked without a repeat until it is exhausted."""
    from autotransfer.space import suggest

    config = SearchConfig(dataset="d", backbones=["b"], heads=["linear"], frozen_stages="all", trials=40).validate()
    pairs = len(config.features) * len(config.probe_cs)
    for base in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=0, n_startup_trials=3,
                                                                                   multivariate=True, group=True)):
        study = _config_study(config, {"b": 3}, base)
        drawn = []
        for _ in range(pairs):
            trial = study.ask()
            params = suggest(trial, config, lambda name: 3)
            drawn.append((params.features, params.probe_c))
            study.tell(trial, 0.9 if params.probe_c == 0.1 else 0.5)  # TPE would chase C 0.1
        assert len(set(drawn)) == pairs


def test_median_pruning_compares_trials_that_started_alike():
    from optuna.trial import TrialState, create_trial

    from autotransfer.space import PeerMedianPruner

    distributions = {"head_init": optuna.distributions.CategoricalDistribution(["random", "probe"])}
    study = optuna.create_study(direction="maximize")
    for init, value in [("probe", 0.9)] * 3 + [("random", 0.3)] * 3:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params={"head_init": init},
                                     distributions=distributions, intermediate_values={1: value}))
    pruner = PeerMedianPruner(n_startup_trials=3)

    def running(init: str, value: float):
        return create_trial(state=TrialState.COMPLETE, value=value, params={"head_init": init},
                            distributions=distributions, intermediate_values={1: value})

    assert not pruner.prune(study, running("random", 0.35))  # above its peers, though far below the LP-FT ones
    assert pruner.prune(study, running("random", 0.2))
    assert pruner.prune(study, running("probe", 0.8))
    assert not PeerMedianPruner(n_startup_trials=4).prune(study, running("random", 0.2))  # too few peers yet


def test_two_workers_racing_to_queue_the_second_stage_queue_it_once():
    """Both decided it was due before either marked the study: the second enqueue finds the same
    parameters already waiting and Optuna skips them, so no budget is spent twice."""
    from autotransfer.portfolio import _enqueue

    opening = _opening()
    study = optuna.create_study(direction="maximize")
    study.add_trial(_probe_trial("a", 0.8))
    study.add_trial(_probe_trial("b", 0.7))
    _, due = opening.follow_up(study.get_trials(deepcopy=False))
    for _worker in range(2):
        _enqueue(study, due, opening.config.trials)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs[PORTFOLIO_ATTR] for t in waiting] == ["fine-tune", "lp-ft"]
