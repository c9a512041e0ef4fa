"""selection.py: a later, larger trial replaces the chosen one only by more than the val set's standard
error, one no larger by any gain;
record.py: the one place the study's keys are spelled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

from autotransfer.record import FIELDS, TrialRecord, key, write
from autotransfer.selection import chosen_over_time, margin, replaces


def test_the_margin_is_the_standard_error_of_the_chosen_accuracy():
    assert margin(0.8, 49) == pytest.approx(math.sqrt(0.8 * 0.2 / 49))  # 0.057: about 3 images of 49
    assert margin(0.8, 10_000) < 0.005 and margin(1.0, 49) == 0.0 and margin(0.8, None) == 0.0


def test_one_lucky_image_on_a_small_val_set_does_not_replace_the_chosen_trial():
    assert replaces(0.80, None, 49)  # nothing chosen yet
    assert not replaces(41 / 49, 40 / 49, 49)  # one image ahead: noise at this size
    assert replaces(45 / 49, 40 / 49, 49)  # five images ahead: beyond one standard error
    assert replaces(0.945, 0.924, 288)  # the same two points of gain are real on 288 images
    assert not replaces(0.80, 0.80, None) and replaces(0.81, 0.80, None)  # size unknown: best val wins


def test_a_challenger_no_larger_than_the_chosen_model_needs_no_margin():
    probe, fine_tune = 994, 213_586  # trainable parameters: a stage probe, a full fine-tune (hymenoptera)
    assert replaces(137 / 153, 135 / 153, 153, probe, probe)  # another backbone's probe, two images ahead
    assert not replaces(137 / 153, 135 / 153, 153, fine_tune, probe)  # a fine-tune as far ahead is noise
    assert replaces(41 / 49, 40 / 49, 49, 514, probe)  # a smaller model (final features only) ahead
    assert not replaces(40 / 49, 40 / 49, 49, 514, probe)  # a tie keeps the chosen one
    assert not replaces(41 / 49, 40 / 49, 49, probe, None)  # a size not recorded counts as larger
    assert replaces(45 / 49, 40 / 49, 49, fine_tune, probe)  # beyond the margin any size replaces it


def test_the_anytime_curve_is_what_the_chosen_model_was_over_time():
    points = [(3.0, 0.84, 2), (1.0, 0.82, 0), (2.0, 0.70, 1), (5.0, 0.95, 4), (4.0, 0.86, 3)]
    assert chosen_over_time(points, 49) == [(1.0, 0.82, 0), (5.0, 0.95, 4)]
    assert chosen_over_time(points, None) == [(1.0, 0.82, 0), (3.0, 0.84, 2), (4.0, 0.86, 3), (5.0, 0.95, 4)]
    sizes = {0: 1_000, 1: 1_000, 2: 500, 3: 90_000, 4: 90_000}  # trial 2 is smaller than trial 0
    assert chosen_over_time(points, 49, lambda p: sizes[p[2]]) == [(1.0, 0.82, 0), (3.0, 0.84, 2), (5.0, 0.95, 4)]


def test_best_keeps_the_chosen_model_against_a_challenger_inside_the_margin(tmp_path):
    from torch import nn

    from autotransfer.holdout import saved_trial
    from autotransfer.model import ModelCard
    from autotransfer.resilience import publish_best

    study = optuna.create_study(direction="maximize")
    best = tmp_path / "best"

    def card(trial: int, accuracy: float, size: int = 10) -> ModelCard:
        return ModelCard(backbone="b", weights_source="s", pretrained=True, head={"kind": "linear"}, frozen_stages=1,
                         class_names=["a", "b"], image_size=8, resize_size=8, decode_size=8, mean=[0.5] * 3,
                         std=[0.5] * 3, val_accuracy=accuracy, val_images=49, trial=trial, trainable_params=size)

    model = nn.Linear(2, 2)
    assert publish_best(study, model, card(0, 40 / 49), best) and saved_trial(best) == 0
    assert not publish_best(study, model, card(1, 41 / 49, size=500), best) and saved_trial(best) == 0
    assert publish_best(study, model, card(2, 46 / 49, size=500), best) and saved_trial(best) == 2
    assert publish_best(study, model, card(3, 47 / 49, size=500), best) and saved_trial(best) == 3  # same size
    card_file = json.loads((best / "model.json").read_text())
    assert (card_file["val_images"], card_file["trainable_params"]) == (49, 500)  # what the rule used


def test_the_record_reads_back_what_was_written_and_refuses_unknown_names():
    study = optuna.create_study()
    trial = study.ask()
    write(trial, cache="features", epochs_done=3, reason="")
    with pytest.raises(KeyError, match="not a TrialRecord field: cahce"):
        write(trial, cahce="plain")
    study.tell(trial, 0.5)
    record = TrialRecord.of(study.trials[0])
    assert (record.cache, record.epochs_done, record.reason, record.probe_c) == ("features", 3, "", None)
    assert key("worker") == "worker" and "portfolio" in FIELDS
    with pytest.raises(KeyError):
        key("wokrer")


def test_no_module_but_record_spells_a_study_or_trial_key():
    """Every set_user_attr in the package goes through record.write, or a key record.py defines."""
    import re

    package = Path(__file__).resolve().parents[1] / "autotransfer"
    spelled = []
    for path in sorted(package.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"set_user_attr\(\s*[\"']|user_attrs(\.get)?[\[(]\s*[\"']", line):
                spelled.append(f"{path.name}:{number}: {line.strip()}")
    assert spelled == []
