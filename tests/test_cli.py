"""End-to-end tests of the `autotransfer` command line with tiny timm models."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from autotransfer.cli import main
from autotransfer.leaderboard import COLUMNS
from conftest import SHARED, error_lines, main_error, one_line_error, run_cli

HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
needs_shared = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} is absent (no ../shared beside the checkout)")


def finished_trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return optuna.load_study(study_name=study, storage=storage).get_trials(states=states)


@pytest.mark.slow
def test_digits_search_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "d"
    args = ["search", "--dataset", "builtin:digits", "--backbones", "test_resnet,test_efficientnet",
            "--no-pretrained", "--epochs", "3", "--out", str(out)]
    assert main([*args, "--trials", "6"]) == 0
    printed = capsys.readouterr().out
    assert "| rank" in printed and "test_" in printed
    from autotransfer.leaderboard import TERMINAL_COLUMNS, TERMINAL_NAMES

    header = next(line for line in printed.splitlines() if line.startswith("| rank"))  # compact: leaderboard.md is full
    assert [c.strip() for c in header.strip("|").split("|")] == [TERMINAL_NAMES.get(c, c) for c in TERMINAL_COLUMNS]
    assert max(len(line) for line in printed.splitlines() if line.startswith("|")) < 180

    frame = pd.read_csv(out / "leaderboard.csv")
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS
    assert len(frame) >= 6
    assert (frame["pretrained"] == "random init").all()
    complete = frame[frame["state"] == "COMPLETE"]
    assert complete["val_accuracy"].is_monotonic_decreasing
    assert complete["rank"].tolist() == list(range(1, len(complete) + 1))
    assert (frame["trainable_params"] <= frame["total_params"]).all()
    assert (out / "leaderboard.md").read_text().startswith("| rank")
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "model.json").is_file()
    runs = sorted((out / "tensorboard").iterdir())
    assert len(runs) == len(frame)
    assert all(any(f.name.startswith("events.out.tfevents") for f in run.iterdir()) for run in runs)

    storage = f"sqlite:///{out / 'study.db'}"
    assert len(finished_trials(storage, "digits")) == 6
    assert main([*args, "--trials", "8", "--quiet"]) == 0
    assert len(finished_trials(storage, "digits")) == 8
    # The configuration lives in the study: storage URL and study name alone resume it.
    assert main(["search", "--storage", storage, "--study", "digits", "--out", str(out), "--trials", "8", "--quiet"]) == 0
    assert len(finished_trials(storage, "digits")) == 8


def test_tensorboard_has_scalars_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["search", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained",
                 "--trials", "1", "--epochs", "2", "--out", str(out), "--quiet", "--frozen-stages", "all",
                 "--heads", "mlp"]) == 0  # an mlp head trains epoch by epoch (a probe is one step)
    events = EventAccumulator(str(out / "tensorboard" / "trial_0000"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/accuracy", "lr"} <= set(tags["scalars"])
    assert len(events.Scalars("val/accuracy")) == 2
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)


def test_changed_search_space_on_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["search", "--dataset", "builtin:digits", "--no-pretrained", "--epochs", "1", "--out", str(out),
            "--quiet", "--trials", "1", "--frozen-stages", "all"]
    assert main([*base, "--backbones", "test_resnet"]) == 0
    capsys.readouterr()
    assert main([*base, "--backbones", "test_vit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "backbones" in err and "--study" in err


def write_digit_folder(root: Path, per_class: int = 30) -> None:
    """Digits 0-2 as 8x8 grayscale PNGs in train/ and val/ folders."""
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=3)
    counts: dict[tuple[str, int], int] = {}
    for image, label in zip(digits.images, digits.target):
        seen = counts.get(("all", label), 0)
        if seen >= per_class:
            continue
        counts[("all", label)] = seen + 1
        split = "val" if seen % 3 == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{seen:03d}.png")


def test_predict_reproduces_leaderboard_accuracy(tmp_path):
    data = tmp_path / "digits"
    write_digit_folder(data)
    (data / "train" / "digit0" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(data), "--backbones", "test_resnet,test_vit", "--no-pretrained",
                 "--trials", "3", "--epochs", "2", "--out", str(out), "--quiet", "--pruner", "none"]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    chosen = json.loads((out / "best" / "model.json").read_text())["trial"]  # within the margin, not always rank 1
    best = board[board["trial"] == chosen].iloc[0]
    assert best["state"] == "COMPLETE"

    preds_file = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(out / "best"), str(data / "val"), "--output", str(preds_file)]) == 0
    preds = pd.read_csv(preds_file)
    assert list(preds.columns) == ["path", "label", "confidence"]
    assert preds["confidence"].between(0, 1).all()
    truth = preds["path"].map(lambda p: Path(p).parent.name)
    assert len(preds) == len(list((data / "val").rglob("*.png")))
    assert (preds["label"] == truth).mean() == pytest.approx(best["val_accuracy"], abs=1e-9)


@pytest.mark.parametrize("frozen, path", [("all", "features"), ("2", "boundary")])
def test_predict_reproduces_the_accuracy_of_a_cached_trial(tmp_path, frozen, path):
    data = tmp_path / "digits"
    write_digit_folder(data)
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(data), "--backbones", "test_resnet", "--no-pretrained", "--trials", "1",
                 "--epochs", "2", "--frozen-stages", frozen, "--out", str(out), "--quiet"]) == 0
    best = pd.read_csv(out / "leaderboard.csv").iloc[0]
    assert best["state"] == "COMPLETE" and best["cache"] == path
    preds_file = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(out / "best"), str(data / "val"), "--output", str(preds_file)]) == 0
    preds = pd.read_csv(preds_file)
    truth = preds["path"].map(lambda p: Path(p).parent.name)
    assert (preds["label"] == truth).mean() == pytest.approx(best["val_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_leaderboard_command_rebuilds_from_storage(tmp_path, capsys):
    out = tmp_path / "lb"
    assert main(["search", "--dataset", "builtin:digits", "--backbones", "test_efficientnet", "--no-pretrained",
                 "--trials", "2", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--format", "csv"]) == 0
    from io import StringIO

    rebuilt = pd.read_csv(StringIO(capsys.readouterr().out))
    written = pd.read_csv(out / "leaderboard.csv")
    pd.testing.assert_frame_equal(rebuilt.drop(columns=["duration_s"]), written.drop(columns=["duration_s"]))


def bad_inputs(tmp: Path) -> dict[str, list[str]]:
    empty = tmp / "empty"
    empty.mkdir()
    one = tmp / "one" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(one / "a.png")
    Image.new("RGB", (16, 16), (3, 2, 1)).save(one / "b.png")
    csv_file = tmp / "bad.csv"
    csv_file.write_text("file,label\na.png,x\n")
    common = ["--no-pretrained", "--epochs", "1", "--out", str(tmp / "out")]
    return {
        "missing path": ["search", "--dataset", str(tmp / "nope"), *common],
        "empty folder": ["search", "--dataset", str(empty), *common],
        "one class": ["search", "--dataset", str(tmp / "one"), "--backbones", "test_resnet", *common],
        "csv missing column": ["search", "--dataset", str(csv_file), "--backbones", "test_resnet", *common],
        "unknown backbone": ["search", "--dataset", "builtin:digits", "--backbones", "resnet1B", *common],
        "trials 0": ["search", "--dataset", "builtin:digits", "--trials", "0", *common],
        "unknown pruner": ["search", "--dataset", "builtin:digits", "--pruner", "fastest", *common],
        "cache memory": ["search", "--dataset", "builtin:digits", "--cache-memory", "lots", *common],
        "cache views 0": ["search", "--dataset", "builtin:digits", "--cache-views", "0", *common],
    }


@pytest.mark.parametrize("case", ["missing path", "empty folder", "one class", "csv missing column",
                                  "unknown backbone", "trials 0", "unknown pruner", "cache memory", "cache views 0"])
def test_bad_input_exits_2_with_one_line(tmp_path, case, capsys):
    line = main_error(capsys, *bad_inputs(tmp_path)[case])  # in-process (conftest.py)
    assert line.startswith("autotransfer") and "error" in line


@pytest.mark.slow
def test_unavailable_pretrained_weights_stop_with_ways_out(tmp_path):
    result = run_cli("search", "--dataset", "builtin:digits", "--backbones", "test_resnet.r160_in1k",
                     "--trials", "1", "--epochs", "1", "--out", str(tmp_path / "w"),
                     env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    message = one_line_error(result)
    for needle in ("test_resnet.r160_in1k", "HF_HUB_OFFLINE", "--weights", "Hugging Face cache", "--no-pretrained"):
        assert needle in message


@pytest.mark.slow
def test_unreachable_hub_lists_every_default_backbone_without_retrying(tmp_path):
    """No network and an empty cache: one quick request, no huggingface_hub retries, and every default
    backbone named on a line of its own, before any image is decoded (no study is created)."""
    from autotransfer.config import DEFAULT_BACKBONES

    out = tmp_path / "w"
    result = run_cli("search", "--dataset", "builtin:digits", "--trials", "1", "--out", str(out),
                     env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)  # without the "loading NAME (pretrained)" progress lines
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr
    assert lines[0] == "autotransfer: error: weights for 3 of 3 backbones cannot be had:"
    for name, line in zip(DEFAULT_BACKBONES, lines[1:4]):
        assert name in line and "not in the local cache and the hub cannot be reached" in line
    assert lines[4].startswith("ways out: --weights NAME=PATH") and len(lines) == 5
    assert not out.exists()


@pytest.mark.slow
@needs_shared
def test_hymenoptera_random_init_search(tmp_path):
    out = tmp_path / "hym"
    result = run_cli("search", "--dataset", str(HYMENOPTERA), "--backbones", "resnet18", "--no-pretrained",
                     "--trials", "1", "--epochs", "1", "--image-size", "64", "--frozen-stages", "3",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.loc[0, "state"] == "COMPLETE" and board.loc[0, "pretrained"] == "random init"
    assert "Traceback" not in result.stderr


def test_flags_are_never_abbreviated_and_unknown_ones_get_the_closest(capsys):
    line = main_error(capsys, "search", "--dataset", "builtin:digits", "--trails", "3")
    assert "unrecognized arguments: --trails 3" in line and "--trails: did you mean --trials?" in line
    line = main_error(capsys, "search", "--dataset", "builtin:digits", "--backbone", "resnet18")  # not --backbones
    assert "unrecognized arguments: --backbone resnet18" in line and "did you mean --backbones" in line
    line = main_error(capsys, "bench", "run", "suite.toml", "--quite")  # the nested command's own flags
    assert "did you mean --quiet?" in line
    line = main_error(capsys, "search", "--dataset", "builtin:digits", "--zzz")
    assert line.endswith("unrecognized arguments: --zzz (see --help)")  # nothing close: no guess


@pytest.mark.slow
def test_the_reason_a_search_stopped_is_always_said(tmp_path, capsys):
    tiny = ["--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained", "--image-size", "16",
            "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "s")]
    assert main(["search", *tiny, "--trials", "1"]) == 0
    assert "autotransfer: stopped: the --trials 1 budget is spent (1 finished trials)" in capsys.readouterr().err
    assert main(["search", *tiny, "--trials", "1"]) == 0  # resumed with nothing left to run
    assert "autotransfer: budget already spent: 1 finished trial(s)" in capsys.readouterr().err


def test_a_worker_loop_says_it_stopped_on_the_timeout(tmp_path):
    """--timeout is checked between trials: the loop ends after the trial that crossed it, and says so."""
    import time

    from autotransfer.search import stop_message
    from autotransfer.config import SearchConfig
    from autotransfer.worker import Budget, WorkerLoop

    study = optuna.create_study(direction="maximize")
    said: list[str] = []

    def objective(trial: optuna.Trial) -> float:
        time.sleep(0.3)
        return 0.5

    why = WorkerLoop(objective, study, Budget(trials=50, timeout=0.2), tmp_path, said.append, 30).run()
    assert why == "timeout" and len(study.trials) <= 1
    message = stop_message(why, study, SearchConfig(dataset="x", timeout=0.2))
    assert message.startswith("stopped: --timeout 0.2 s reached") and "a trial running at it ran to its end" in message
    assert WorkerLoop(objective, study, Budget(trials=1), tmp_path, said.append, 30).run() == "trials"


def _run_in_pty(args: list[str], columns: int = 120) -> str:
    """`autotransfer ARGS` with stdin, stdout and stderr on a pseudo-terminal of `columns` x 40; all it wrote."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "autotransfer.cli", *args], stdin=slave, stdout=slave,
                               stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed: the process is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        assert process.wait(timeout=60) == 0
    return b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.slow
def test_a_terminal_gets_a_live_display_and_a_pipe_plain_lines(tmp_path):
    import re

    args = ["search", "--dataset", "builtin:digits", "--backbones", "test_resnet", "--no-pretrained",
            "--trials", "3", "--epochs", "1"]
    shown = _run_in_pty([*args, "--out", str(tmp_path / "tty")])
    assert re.search(r"trials 0/3 \|", shown) and re.search(r"trials 3/3 \|", shown), shown
    assert re.search(r"trials [12]/3 \|[^\r]*elapsed, ETA \d\d:\d\d, best 0\.\d{4} \(trial \d\)", shown), shown
    assert "now trial 1 epoch 1/1" in shown
    assert "trial 1: test_resnet frozen" in shown  # the messages still print, above the bar

    piped = run_cli(*args, "--out", str(tmp_path / "pipe"))
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "ETA" not in piped.stderr and "\x1b" not in piped.stderr
    lines = piped.stderr.splitlines()
    assert lines[0] == "loading test_resnet (random init)"
    assert any(line.startswith("digits: 1149 train / 288 val / 360 test images, 10 classes") for line in lines)
    assert "trial 2 done: val_acc" in piped.stderr


class _AlwaysPrune(optuna.pruners.BasePruner):
    """A pruner that asks to stop every trial at every report."""

    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("epochs, state", [(2, "PRUNED"), (1, "COMPLETE")])
def test_a_trial_is_never_pruned_after_its_last_epoch_and_a_pruned_one_logs_its_value(tmp_path, epochs, state):
    """A trial's value is its last epoch's val accuracy (README, "A trial's value"); stopping it after
    that epoch saves nothing, so it completes; a pruned trial's HParams metric is where it stood."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from autotransfer.config import SearchConfig
    from autotransfer.search import RunOptions, Search

    out = tmp_path / "p"
    config = SearchConfig(dataset="builtin:digits:0-2", backbones=["test_resnet"], pretrained=False, trials=1,
                          epochs=epochs, image_size=16, frozen_stages="0", heads=["linear"], portfolio=False).validate()
    options = RunOptions(out=out, storage=f"sqlite:///{out / 'study.db'}", study_name="p", device="cpu", quiet=True)
    study = Search(config, options, pruner=lambda config: _AlwaysPrune()).run()
    trial = study.get_trials()[0]
    assert trial.state.name == state and len(trial.intermediate_values) == 1
    reached = trial.intermediate_values[1]
    assert trial.value == reached  # Optuna stores a pruned trial's last report as its value too
    events = EventAccumulator(str(out / "tensorboard" / "trial_0000"))
    events.Reload()
    assert [s.value for s in events.Scalars("hparams/val_accuracy")] == [pytest.approx(reached)]
