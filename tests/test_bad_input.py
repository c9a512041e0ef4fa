"""Inputs that used to end in a traceback, a poisoned study or a misleading exit status (issue 15),
each run in-process: one line on stderr, exit 2 for bad input, and nothing already stored lost."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from autotransfer.cli import main
from autotransfer.data import FolderSource, prepare

OOM_PLUGIN = Path(__file__).parent / "plugin_examples" / "oom_plugin.py"
TINY = ["--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained", "--image-size", "16",
        "--epochs", "1", "--device", "cpu", "--quiet"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _image(path: Path, size: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "run"
    assert main(["search", *TINY, "--trials", "1", "--out", str(out)]) == 0
    return out / "best"


# --------------------------------------------------------------------------- the study

def test_every_trial_failing_exits_1_and_names_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OOM_ALWAYS_TRIALS", "0,1,2")
    out = tmp_path / "oom"
    assert main(["search", "--dataset", "builtin:digits:0-2", "--backbones", "oomnet", "--plugin", str(OOM_PLUGIN),
                 "--epochs", "1", "--trials", "2", "--pruner", "none", "--no-portfolio", "--frozen-stages", "0-1",
                 "--out", str(out), "--quiet"]) == 1  # trials that train through the backbone, where it fails
    err = capsys.readouterr().err
    assert "no trial completed (3 failed, 0 pruned); first reason: oom" in err and "no model was saved" in err
    assert "best model:" not in err and not (out / "best").exists()
    trials = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    assert len(trials) == 3  # the failed trials stay in the study


@pytest.mark.slow
def test_a_prerank_typo_is_refused_before_the_study_is_stored(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["search", *TINY, "--trials", "1", "--out", str(out), "--prerank", "logmee"]) == 2
    assert "logmee" in one_line(capsys)
    assert not (out / "study.db").exists()
    assert main(["search", *TINY, "--trials", "1", "--out", str(out), "--prerank", "logme"]) == 0


def test_leaderboard_on_a_missing_sqlite_file_does_not_create_it(tmp_path, capsys):
    missing = tmp_path / "nothing" / "study.db"
    assert main(["leaderboard", "--storage", f"sqlite:///{missing}", "--study", "x"]) == 2
    assert "no study database at" in one_line(capsys)
    assert not missing.exists() and not missing.parent.exists()


# --------------------------------------------------------------------------- predict on a tampered model

def _card_edit(key, value):
    def edit(folder: Path) -> None:
        card = json.loads((folder / "model.json").read_text())
        if value is KeyError:
            del card[key]
        else:
            card[key] = value(card) if callable(value) else value
        (folder / "model.json").write_text(json.dumps(card))
    return edit


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


TAMPERINGS = {
    "bad json": (lambda folder: (folder / "model.json").write_text("{not json"), "is not valid JSON"),
    "missing key": (_card_edit("class_names", KeyError), "missing class_names"),
    "extra key": (_card_edit("colour", "blue"), "unknown colour"),
    "class count": (_card_edit("class_names", lambda card: card["class_names"] + ["extra"]), "does not fit the model"),
    "truncated weights": (_truncate, "is not a readable safetensors file"),
    "image size 0": (_card_edit("image_size", 0), "image_size must be a positive integer"),
    "bad head": (_card_edit("head", {"kind": "linear", "depth": 3}), "cannot build the model it describes"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_predict_on_a_tampered_model_is_one_line(saved_model, tmp_path, capsys, case):
    tamper, message = TAMPERINGS[case]
    folder = tmp_path / "best"
    shutil.copytree(saved_model, folder)
    tamper(folder)
    image = _image(tmp_path / "img.png")
    assert main(["predict", str(image), "--model", str(folder), "--device", "cpu"]) == 2
    assert message in one_line(capsys)


# --------------------------------------------------------------------------- encodings

def test_a_csv_manifest_with_a_non_utf8_byte_is_one_line(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label\na.png,caf\xe9\nb.png,tea\n")
    assert main(["search", "--dataset", str(manifest), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "is not UTF-8 text (byte 0xe9 on line 2)" in one_line(capsys)


def test_predict_writes_file_names_that_are_not_utf8(saved_model, tmp_path, capsysbinary):
    folder = tmp_path / "imgs"
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: not valid UTF-8
    _image(folder / name)
    output = tmp_path / "preds.csv"
    assert main(["predict", str(folder), "--model", str(saved_model), "--output", str(output), "--device", "cpu"]) == 0
    assert b"caf\xe9.png" in output.read_bytes()
    capsysbinary.readouterr()
    assert main(["predict", str(folder), "--model", str(saved_model), "--device", "cpu"]) == 0
    assert b"caf\xe9.png" in capsysbinary.readouterr().out


# --------------------------------------------------------------------------- datasets on disk

def test_a_link_back_to_the_dataset_root_is_not_a_class(tmp_path, caplog):
    root = tmp_path / "data"
    for label in ("a", "b"):
        for i in range(3):
            _image(root / label / f"{i}.png", seed=i)
    (root / "loop").symlink_to(".")
    (root / "a" / "up").symlink_to("..")
    refs = FolderSource().load(str(root))
    assert refs.class_names == ["a", "b"] and len(refs.refs) == 6
    assert "a link back to" in caplog.text


def test_a_decompression_bomb_is_skipped_with_its_reason(tmp_path, caplog, monkeypatch):
    root = tmp_path / "data"
    for label in ("a", "b"):
        for i in range(3):
            _image(root / label / f"{i}.png", seed=i)
    _image(root / "a" / "huge.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice that: refused as a bomb
    data = prepare(FolderSource().load(str(root)), 16, val_fraction=0.34, seed=0)
    assert len(data.train) + len(data.val) == 6
    assert "huge.png" in caplog.text and "decompression bomb" in caplog.text and "MAX_IMAGE_PIXELS" in caplog.text


class _NotATensor:
    pass


def test_a_weights_file_with_pickled_objects_is_one_line(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": _NotATensor()}, weights)
    assert main(["search", *TINY, "--trials", "1", "--out", str(tmp_path / "run"),
                 "--weights", f"test_resnet={weights}"]) == 2
    assert "holds pickled Python objects" in one_line(capsys)


# --------------------------------------------------------------------------- creating and joining studies

def test_a_search_that_lost_the_creation_race_is_refused(tmp_path):
    """Two searches with other --epochs start together: both read "no such study" before either creates
    it. The second to open the storage must refuse, not run 3-epoch trials in a 2-epoch study."""
    from autotransfer.config import SearchConfig
    from autotransfer.errors import UserError
    from autotransfer.search import RunOptions, Search, default_storage

    out = tmp_path / "race"
    options = RunOptions(out=out, storage=default_storage(out), study_name="race", device="cpu", quiet=True)
    first = Search(SearchConfig(dataset="builtin:digits:0-2", backbones=["test_resnet"], epochs=2).validate(), options)
    second = Search(SearchConfig(dataset="builtin:digits:0-2", backbones=["test_resnet"], epochs=3).validate(), options)
    first.open_study()
    with pytest.raises(UserError, match="epochs: stored 2, given 3"):
        second.open_study()
    stored = optuna.load_study(study_name="race", storage=options.storage).user_attrs["autotransfer_config"]
    assert stored["epochs"] == 2


def _open_fresh(url: str, barrier, results) -> None:
    from autotransfer.errors import UserError
    from autotransfer.storage import open_storage

    barrier.wait()
    try:
        open_storage.__wrapped__(url, None)  # not the parent's cached engine: a process of its own
        results.put("ok")
    except UserError as exc:
        results.put(str(exc))


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_file_together_all_succeed(tmp_path):
    """Each used to create Optuna's tables itself: "table studies already exists" or "database is locked",
    reported as "check the URL ... server is running". Schema set-up now runs one process at a time."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(4):
        url = f"sqlite:///{tmp_path / f'fresh-{round_}.db'}"
        barrier, results = context.Barrier(4), context.Queue()
        processes = [context.Process(target=_open_fresh, args=(url, barrier, results)) for _ in range(4)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join()
        assert outcomes == ["ok"] * 4, outcomes


def _claim(url: str, trial_ids: list[int], barrier, results) -> None:
    from autotransfer.storage import open_storage

    storage = open_storage.__wrapped__(url, None)
    for trial_id in trial_ids:
        barrier.wait()
        results.put(storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING))


def test_a_queued_trial_on_sqlite_is_taken_by_one_worker_only(tmp_path):
    """Optuna takes a queued trial with "WAITING? then RUNNING" under SELECT ... FOR UPDATE, which SQLite
    ignores: 4 processes racing for each of 20 queued trials used to win ~3 claims per trial, so workers
    ran the same trial twice and crashed on "Cannot tell a COMPLETE trial"."""
    import multiprocessing

    from autotransfer.storage import open_storage

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    study = optuna.create_study(storage=open_storage(url, None), study_name="queue")
    for i in range(20):
        study.enqueue_trial({"x": i})
    trial_ids = [t._trial_id for t in study.get_trials()]
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_claim, args=(url, trial_ids, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    claims = [results.get(timeout=120) for _ in range(4 * len(trial_ids))]
    for process in processes:
        process.join()
    assert sum(claims) == len(trial_ids)


@pytest.mark.slow
def test_a_configuration_already_finished_is_not_run_again(tmp_path, capsys):
    out = tmp_path / "dup"
    assert main(["search", *TINY, "--trials", "1", "--out", str(out)]) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="digits-0-2", storage=storage)
    first = study.trials[0]
    study.enqueue_trial(first.params)  # as a worker with the same sampler seed would draw it
    assert main(["search", *TINY, "--trials", "2", "--out", str(out)]) == 0
    trials = optuna.load_study(study_name="digits-0-2", storage=storage).trials
    skipped = [t for t in trials if t.user_attrs.get("reason", "").startswith("duplicate")]
    assert [t.number for t in skipped] == [1] and skipped[0].state == optuna.trial.TrialState.FAIL
    assert "configuration of trial 0" in skipped[0].user_attrs["reason"]
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2 and finished[0].params != finished[1].params


def test_a_draw_equal_to_a_running_trial_gives_way_to_the_earlier_one():
    from datetime import datetime

    from autotransfer.worker import WORKER_ATTR, duplicate_of

    def _frozen(number: int, state, x: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(number=number, state=state, value=None, datetime_start=datetime.now(),
                                        datetime_complete=None, params={"x": x},
                                        distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                        user_attrs={WORKER_ATTR: "h:1"}, system_attrs={}, intermediate_values={},
                                        trial_id=number)

    RUNNING, COMPLETE, FAIL = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE,
                               optuna.trial.TrialState.FAIL)
    trials = [_frozen(0, FAIL, 0.1), _frozen(1, RUNNING, 0.2), _frozen(2, RUNNING, 0.2), _frozen(3, COMPLETE, 0.3)]
    assert duplicate_of(trials, 2, {"x": 0.2}) == 1  # the later of two equal running draws gives way
    assert duplicate_of(trials, 1, {"x": 0.2}) is None  # the earlier one runs
    assert duplicate_of(trials, 4, {"x": 0.3}) == 3  # finished
    assert duplicate_of(trials, 4, {"x": 0.1}) is None  # a failed trial's configuration may be retried


@pytest.mark.parametrize("size, needle", [("100000", "--image-size 100000 is outside 8-2048 px"),
                                           ("0", "--image-size must be a positive integer")])
def test_an_image_size_no_backbone_can_use_is_refused_before_anything_runs(tmp_path, capsys, size, needle):
    out = tmp_path / "huge"
    args = [a for a in TINY if a not in ("--image-size", "16")]
    assert main(["search", *args, "--image-size", size, "--trials", "1", "--out", str(out)]) == 2
    assert needle in one_line(capsys)
    assert not (out / "study.db").exists()


def test_a_crop_the_backbone_cannot_take_is_one_line(tmp_path, capsys):
    """A pooling window larger than the feature map: refused before the study starts, not a failed trial."""
    from autotransfer.prepared import check_takes_size

    with pytest.raises(Exception, match="cannot take 8 px crops"):
        check_takes_size("pool8", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AvgPool2d(8)), 8)
    check_takes_size("pool8", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AvgPool2d(8)), 32)


def test_the_memory_floor_is_checked_before_decoding():
    from autotransfer.errors import UserError
    from autotransfer.prepared import check_memory

    check_memory(1000, 256, 224, 32, available=8 << 30)
    with pytest.raises(UserError, match=r"need at least 18\.0 GiB for one image and one batch of 384, before "
                                        r"activations; 8\.0 GiB is available; lower --image-size or --batch-size"):
        check_memory(1000, 2048, 2048, 384, available=8 << 30)


@pytest.mark.slow
def test_local_workers_do_not_import_modules_from_the_current_folder(tmp_path, monkeypatch):
    marker = tmp_path / "imported-by-worker"
    here = tmp_path / "cwd"
    here.mkdir()
    # A module of an installed package's name, in the folder the user runs from.
    (here / "tabulate.py").write_text(
        "import sys, pathlib\n"
        f"if 'worker' in sys.argv: pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "raise ImportError('not the real tabulate')\n")
    import tabulate  # noqa: F401 - this process has the real one already; only the worker could pick up the fake

    monkeypatch.chdir(here)
    out = tmp_path / "run"
    assert main(["search", *TINY, "--trials", "1", "--out", str(out), "--workers", "1"]) == 0
    assert not marker.exists()
    assert (out / "leaderboard.md").read_text().startswith("| rank")


def test_a_trial_failed_by_the_heartbeat_check_says_so(tmp_path):
    from autotransfer.leaderboard import leaderboard_frame

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    dead = study.ask()
    study.tell(dead, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials leaves it: no reason recorded
    retry = study.ask()
    study._storage.set_trial_system_attr(retry._trial_id, "failed_trial", dead.number)
    study.tell(retry, 0.5)
    lonely = study.ask()
    study.tell(lonely, state=optuna.trial.TrialState.FAIL)
    reasons = leaderboard_frame(study).set_index("trial")["reason"]
    assert reasons[dead.number].startswith("heartbeat: its worker stopped") and "retried as trial 1" in reasons[0]
    assert reasons[lonely.number].startswith("heartbeat:") and reasons[retry.number] == ""


def test_a_retry_of_a_retry_is_named_by_its_direct_predecessor(tmp_path):
    """Optuna carries `failed_trial` (the first of the chain) over to every retry; the leaderboard must say
    which trial retried which: 0 -> 1 -> 2, not 0 -> 2."""
    from autotransfer.leaderboard import leaderboard_frame

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    first, second = study.ask(), None
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    second = study.ask()
    study._storage.set_trial_system_attr(second._trial_id, "failed_trial", 0)
    study._storage.set_trial_system_attr(second._trial_id, "retry_history", [0])
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    third = study.ask()
    study._storage.set_trial_system_attr(third._trial_id, "failed_trial", 0)
    study._storage.set_trial_system_attr(third._trial_id, "retry_history", [0, 1])
    study.tell(third, 0.5)
    reasons = leaderboard_frame(study).set_index("trial")["reason"]
    assert reasons[0].endswith("retried as trial 1") and reasons[1].endswith("retried as trial 2"), reasons


def test_a_worker_whose_trial_was_taken_over_drops_it_and_goes_on(tmp_path, capsys):
    import logging

    plugin = Path(__file__).parent / "plugin_examples" / "takeover_plugin.py"
    out = tmp_path / "late"
    printed: list[logging.LogRecord] = []  # what Optuna's handlers would print, after the worker's filters
    handler = logging.Handler()
    handler.emit = printed.append
    logging.getLogger("optuna").addHandler(handler)
    try:
        assert main(["search", "--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained",
                     "--image-size", "16", "--epochs", "3", "--trials", "1", "--pruner", "none", "--frozen-stages",
                     "0", "--device", "cpu", "--plugin", str(plugin), "--out", str(out)]) == 0
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    err = capsys.readouterr().err
    assert "trial 0 was taken over by another worker" in err and "Traceback" not in err
    assert not [r for r in printed if r.exc_info], [r.getMessage() for r in printed]
    trials = optuna.load_study(study_name="digits-0-2", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    first, retry = trials
    assert first.state == optuna.trial.TrialState.FAIL and first.intermediate_values.keys() == {1}
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["resumed_from_epoch"] == 1  # the checkpoint written before the takeover, not after
    assert not any((out / "checkpoints").glob("trial-*"))


def test_workers_opening_a_study_together_draw_different_configurations(tmp_path, monkeypatch):
    from autotransfer.config import SearchConfig
    from autotransfer.search import RunOptions, Search, default_storage
    from autotransfer.space import suggest
    from autotransfer.worker import worker_salt

    out = tmp_path / "together"
    config = SearchConfig(dataset="builtin:digits:0-2", backbones=["test_resnet", "test_efficientnet"],
                          trials=4).validate()
    studies = []
    for pid in (4101, 4102):  # two worker processes, opening the new study before either has a trial
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        options = RunOptions(out=out, storage=default_storage(out), study_name="together", device="cpu", quiet=True,
                             sampler_salt=worker_salt())
        studies.append(Search(config, options).open_study())
    drawn = [suggest(study.ask(), config, lambda name: 5, None) for study in studies]
    assert drawn[0] != drawn[1]
