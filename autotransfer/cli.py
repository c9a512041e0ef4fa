"""The `autotransfer` command line: search, worker, leaderboard, report, predict, export, pretrain, rank,
plugins, server, bench."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

from .errors import UserError

PROG = "autotransfer"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other bad input here. Flags are never
    abbreviated (`--backbone` is not taken for `--backbones`), and an unknown flag gets the closest
    ones of its command as a suggestion."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(extras, _command_parser(self, parsed)))
        return parsed

    def error(self, message: str):  # noqa: D102 - argparse API
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _command_parser(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that read the arguments: `search`, `bench run`, ..."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(parsed, actions[0].dest, None) if actions else None
        if chosen is None or chosen not in actions[0].choices:
            return parser
        parser = actions[0].choices[chosen]


def unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's message for unknown arguments, with the closest flags of `parser` for each unknown flag."""
    import difflib

    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    hints = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        if flag.startswith("--"):
            close = difflib.get_close_matches(flag, known, n=2, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return f"{message} ({'; '.join(hints)})" if hints else message


def _shared() -> dict[str, argparse.ArgumentParser]:
    """The options several commands take, each declared once (argparse parents)."""
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress display")
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=[], help="plugin module or file.py to load (repeatable)")
    from .config import DEFAULT_HEARTBEAT_S

    heartbeat = argparse.ArgumentParser(add_help=False)
    heartbeat.add_argument("--heartbeat", type=int, help="seconds between a worker's heartbeats; a trial silent for "
                           f"3x this is failed and retried by another worker (default {DEFAULT_HEARTBEAT_S})")
    data_cache = argparse.ArgumentParser(add_help=False)
    where = data_cache.add_mutually_exclusive_group()
    where.add_argument("--data-cache", metavar="DIR", help="folder of the decoded-image cache, shared by every process "
                       "that reads the same images (default $AUTOTRANSFER_DATA_CACHE, else data-cache in --out; for pretrain only the former)")
    where.add_argument("--no-data-cache", action="store_true", help="decode the images in this process only")
    return {"device": device, "quiet": quiet, "plugin": plugin, "heartbeat": heartbeat, "data_cache": data_cache}


def _data_cache(given: dict, out: Path) -> Path | None:
    """The decoded-image cache folder the flags choose; None with --no-data-cache."""
    from .data.pixels import default_folder

    if given.get("no_data_cache"):
        return None
    return Path(given["data_cache"]) if given.get("data_cache") else default_folder(out)


def _search_parser(sub, shared: dict[str, argparse.ArgumentParser]) -> None:
    from .config import SearchConfig
    from .flags import add_flags

    p = sub.add_parser("search", help="search transfer configurations on a dataset",
                       parents=[shared[name] for name in ("device", "quiet", "plugin", "heartbeat", "data_cache")])
    add_flags(p, SearchConfig)  # every flag that sets the search's configuration (config.SearchConfig)
    p.add_argument("--storage", default=argparse.SUPPRESS, help="Optuna storage URL (default sqlite file in --out)")
    p.add_argument("--study", default=argparse.SUPPRESS, help="study name (default derived from the dataset)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="output folder (default runs/<study>)")
    p.add_argument("--workers", type=int, default=argparse.SUPPRESS,
                   help="run N local worker processes on the study (see docs/distributed.md)")
    p.add_argument("--gpus", default=argparse.SUPPRESS, help="GPU indices for the workers, one worker per GPU "
                   "(default all visible)")
    p.add_argument("--trials-per-gpu", type=int, default=argparse.SUPPRESS,
                   help="workers sharing each GPU, for small models (default 1)")
    p.add_argument("--create-only", action="store_true", help="create the study and exit; start `autotransfer "
                   "worker`s on it")


def _worker_parser(sub, shared: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="join a study in a shared storage and run its trials (any number of machines)",
                       parents=[shared[name] for name in ("device", "quiet", "plugin", "heartbeat", "data_cache")])
    p.add_argument("--storage", required=True, help="the study's storage URL, e.g. postgresql+psycopg2://USER:PW@HOST/DB")
    p.add_argument("--study", required=True, help="study name, created by `autotransfer search`")
    p.add_argument("--out", help="output folder: tensorboard, checkpoints, best/ (default runs/<study>; "
                   "shared between machines so a retried trial finds its checkpoint)")
    p.add_argument("--threads", type=int, help="CPU threads for this worker (default: torch's)")


def _pretrain_parser(sub, shared: dict[str, argparse.ArgumentParser]) -> None:
    from .flags import add_flags
    from .config import PretrainConfig

    p = sub.add_parser("pretrain", help="train a backbone on a source dataset; write a checkpoint a search can use",
                       parents=[shared[name] for name in ("device", "quiet", "plugin", "data_cache")])
    add_flags(p, PretrainConfig, required=("dataset", "backbone", "out"))


RANK_FLAGS = ("dataset", "backbones", "pretrained", "weights", "image_size", "val_fraction", "val_as_test", "seed")


def _rank_parser(sub, shared: dict[str, argparse.ArgumentParser]) -> None:
    from .config import SearchConfig
    from .flags import add_flags

    p = sub.add_parser("rank", help="rank backbones by transferability scores from one forward pass each",
                       parents=[shared[name] for name in ("device", "quiet", "plugin", "data_cache")])
    add_flags(p, SearchConfig, RANK_FLAGS, required=("dataset",))  # as in search
    from .config import parse_list

    p.add_argument("--scorers", type=parse_list, help="comma list (default: every registered scorer)")
    p.add_argument("--by", help="order by this scorer (default logme when scored, else the first of --scorers)")
    p.add_argument("--out", help="folder for rank.csv/rank.md and the feature cache (default runs/<dataset>-rank)")
    p.add_argument("--format", choices=("md", "csv"), default="md")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Find the best way to transfer a pretrained image model to your dataset.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    shared = _shared()
    _search_parser(sub, shared)
    _worker_parser(sub, shared)
    p = sub.add_parser("leaderboard", help="rebuild the leaderboard from the storage (also while a search runs)",
                       parents=[shared["device"], shared["plugin"]])
    p.add_argument("run_dir", nargs="?", help="a search's --out folder (its best/ model is scored on the test split "
                   "when the dataset has one and no score is stored yet)")
    p.add_argument("--storage")
    p.add_argument("--study")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p = sub.add_parser("report", help="rebuild a search's report.html from the storage (no dataset needed)")
    p.add_argument("run_dir", nargs="?", help="a search's --out folder (its run.json names the storage and study)")
    p.add_argument("--storage")
    p.add_argument("--study")
    p.add_argument("--out", help="folder to write report.html in (default RUN_DIR, else runs/<study>, whose best/ "
                   "and confusion.json are read when no RUN_DIR is given)")
    p = sub.add_parser("predict", help="label images with a saved model", parents=[shared["device"], shared["plugin"]])
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", required=True, help="a saved model folder, e.g. runs/<study>/best")
    p.add_argument("--output", help="write path,label,confidence to this CSV instead of stdout")
    p = sub.add_parser("export", help="export a saved model to ONNX or TorchScript for serving (checked against it)",
                       parents=[shared["plugin"]])
    p.add_argument("--model", required=True, help="a saved model folder, e.g. runs/<study>/best")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--output", help="the exported file (default: model.onnx or model.pt in --model); "
                                    "its input contract goes beside it as <file>.json")
    _pretrain_parser(sub, shared)
    _rank_parser(sub, shared)
    sub.add_parser("plugins", help="list loaded plugins and what they register", parents=[shared["plugin"]])
    p = sub.add_parser("server", help="the warm servers that start commands without re-importing torch "
                                      "(AUTOTRANSFER_WARM=0 turns them off)")
    p.add_argument("action", choices=("start", "status", "stop"),
                   help="start: start one for this environment and wait until it is ready; status: list this "
                        "user's servers; stop: stop them (running commands finish first)")
    _bench_parser(sub, shared)
    return parser


def _bench_parser(sub, shared: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmark suites: run methods nightly into a store, report leaderboards")
    actions = p.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    r = actions.add_parser("run", help="run a suite file; append one row per (dataset, method, seed) to the store",
                           parents=[shared["device"], shared["quiet"]])
    r.add_argument("suite", help="suite file (TOML), e.g. benchmarks/suites/smoke.toml")
    r.add_argument("--results", default="benchmarks/results", help="store folder: <suite name>.csv (default %(default)s)")
    r.add_argument("--work", default="runs/bench", help="scratch folder for studies and caches (default %(default)s)")
    r.add_argument("--only-dataset", help="run only this dataset of the suite (as written in the file)")
    r.add_argument("--run-id", help="rows already stored under this id are skipped (default <night>_<suite>)")
    r.add_argument("--night", help="date YYYY-MM-DD to record (default today, UTC), for tests and backfills")
    r = actions.add_parser("report", help="HTML + Markdown leaderboards, history and regression flags")
    r.add_argument("--results", default="benchmarks/results", help="store folder (default %(default)s)")
    r.add_argument("--suite", help="only this suite (default: every suite store in --results)")
    r.add_argument("--out", help="HTML page; the Markdown twin goes beside it (.md), its PNG plots in a folder "
                                 "beside it (<name>-plots/) (default: report.html in --results)")
    r.add_argument("--threshold", type=float, default=2.0, help="accuracy drop flagged, in percentage points (default 2.0)")
    r.add_argument("--slowdown", type=float, default=0.25, help="wall-time growth flagged, as a fraction (default 0.25)")


def _search(args: argparse.Namespace) -> int:
    from . import config as c
    from .flags import given as given_flags
    from .search import RunOptions, Search, default_storage, default_study_name, merge_config, stored_config

    given = vars(args)
    explicit = given_flags(c.SearchConfig, given)  # the configuration flags typed, converted (flags.py)
    if "dataset" not in explicit and not ("storage" in given and "study" in given):
        raise UserError("give --dataset PATH (or --storage URL --study NAME to resume a study)")
    study_name = given.get("study") or default_study_name(explicit["dataset"])
    out = Path(given.get("out") or Path("runs") / study_name)
    storage = given.get("storage") or default_storage(out)
    local = _local_workers(given)
    heartbeat = _heartbeat(given.get("heartbeat"))
    config = merge_config(explicit, stored_config(storage, study_name, **heartbeat))
    options = RunOptions(out=out, storage=storage, study_name=study_name, device=given.get("device", "auto"),
                         quiet=given.get("quiet", False), plugins=tuple(given.get("plugin", [])),
                         data_cache=_data_cache(given, out), **heartbeat)
    search = Search(config, options)
    launch = None
    if given.get("create_only"):
        launch = lambda study: None  # noqa: E731 - the workers run the trials
    elif local is not None:
        launch = local.bind(options)
    from .worker import exit_status, stop_on_sigterm

    restore = stop_on_sigterm()
    try:
        study = search.run(launch=launch)
    except KeyboardInterrupt as stop:
        running = "running trials are" if local is not None else "running trial is"
        print(f"{PROG}: {_stopped_by(stop)}; finished trials are kept in {storage} (study {study_name!r}); the "
              f"{running} recorded as interrupted and resume from their checkpoints when you run the same command "
              "again", file=sys.stderr)
        return exit_status(stop)
    finally:
        restore()
    if given.get("create_only"):
        print(f"study {study_name!r} is ready; start workers with: {PROG} worker --storage {storage} --study {study_name}",
              file=sys.stderr)
        return 0
    from . import leaderboard
    from .holdout import selection_summary

    if search.stop_reason:
        print(f"{PROG}: {search.stop_reason}", file=sys.stderr)
    frame = leaderboard.leaderboard_frame(study)
    if not (frame["state"] == "COMPLETE").any():
        if local is not None:
            local.status()  # one line per failed worker, if any failed
        return _nothing_completed(frame, storage, study_name)
    print(leaderboard.to_markdown(leaderboard.terminal(frame)))  # every column: leaderboard.md / .csv
    if frame["backbone"].nunique() > 1 or frame["pretrained"].nunique() > 1:
        print("\nbest per backbone:\n")
        print(leaderboard.to_markdown(leaderboard.per_backbone(frame)))
    print("\n" + selection_summary(study, frame, has_test=len(search.test_refs[0]) > 0, best_dir=out / "best"))
    report = _write_report(search, study, out)
    if not options.quiet:
        print(f"\nleaderboard: {out / 'leaderboard.csv'}   best model: {out / 'best'}   "
              + (f"report: {report}   " if report is not None else "")
              + f"tensorboard --logdir {out / 'tensorboard'}", file=sys.stderr)
    return local.status() if local is not None else 0


def _write_report(search, study, out: Path) -> Path | None:
    """The search's report.html (report.py), with the chosen model's confusion matrices on the data this
    search decoded (stored in confusion.json for rebuilds). Never fails the finished search: any error
    is one warning line and no path."""
    try:
        from .model import CONFIG_FILE, read_card
        from .report import compute_confusions, splits_again, store_confusions, write_report
        from .search import BEST_DIR

        best = out / BEST_DIR
        if (best / CONFIG_FILE).is_file():
            data, (refs, labels) = search.data, search.test_refs
            if data is None:  # released to worker processes (--workers): decode val and test again
                splits = splits_again(search.config, search.registries, read_card(best).decode_size,
                                      search.options.data_cache)
            else:
                splits = {"val": data.val, **({"test": data.test} if data.test is not None else {})}
            if "test" not in splits and len(refs):
                splits["test"] = (refs, labels)
            store_confusions(out, compute_confusions(best, splits, search.registries, search.device))
        return write_report(study, out)
    except Exception as exc:  # the search is done and its results are stored: a report is not worth failing it
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{PROG}: warning: report not written: {type(exc).__name__}{': ' + detail if detail else ''}",
              file=sys.stderr)
        return None


def _nothing_completed(frame, storage: str, study_name: str) -> int:
    """Every trial failed or was pruned: there is no model, so say why in one line and exit 1."""
    failed = frame[frame["state"] == "FAIL"]
    reasons = [r for r in failed["reason"].fillna("") if r]
    why = f"; first reason: {reasons[0]}" if reasons else ""
    print(f"{PROG}: error: no trial completed ({len(failed)} failed, {int((frame['state'] == 'PRUNED').sum())} pruned)"
          f"{why}; no model was saved. The trials are kept in {storage} (study {study_name!r}): see "
          f"`{PROG} leaderboard --storage {storage} --study {study_name}`", file=sys.stderr)
    return 1


def _heartbeat(value: int | None) -> dict:
    if value is None:
        return {}
    if value < 1:
        raise UserError(f"--heartbeat must be a positive number of seconds, got {value}")
    return {"heartbeat_s": value}


def _local_workers(given: dict):
    """`--workers N` / `--trials-per-gpu M`: checked before any data is read."""
    if "workers" not in given and "trials_per_gpu" not in given:
        if "gpus" in given:
            raise UserError("--gpus needs --workers N (or --trials-per-gpu M)")
        return None
    from .launch import LocalWorkers

    return LocalWorkers.plan(given.get("workers"), given.get("gpus"), given.get("trials_per_gpu"),
                             given.get("device", "auto"))


def _worker(args: argparse.Namespace) -> int:
    from .search import RunOptions, Search, stored_config
    from .storage import shown

    config = stored_config(args.storage, args.study, **_heartbeat(args.heartbeat))
    if config is None:
        raise UserError(f"no study {args.study!r} in {shown(args.storage)}; create it first with "
                        f"{PROG} search --dataset ... --storage URL --study {args.study} --create-only")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from .worker import worker_salt

    out = Path(args.out or Path("runs") / args.study)
    options = RunOptions(out=out, storage=args.storage, study_name=args.study, device=args.device, quiet=args.quiet,
                         plugins=tuple(args.plugin), sampler_salt=worker_salt(), data_cache=_data_cache(vars(args), out),
                         **_heartbeat(args.heartbeat))
    from .launch import is_supervised
    from .worker import exit_status, stop_on_sigterm

    restore = stop_on_sigterm()
    try:
        search = Search(config, options)
        study = search.run()
    except KeyboardInterrupt as stop:
        if not is_supervised():  # under `search --workers` the parent says it once for all workers
            print(f"{PROG}: worker {_stopped_by(stop)}; its running trial is recorded as interrupted and re-queued, "
                  "and resumes from its checkpoint in the next worker", file=sys.stderr)
        return exit_status(stop)
    finally:
        restore()
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    if not args.quiet:
        why = f" ({search.stop_reason})" if search.stop_reason else ""
        print(f"{PROG}: worker done{why}; study {args.study!r} has {finished} finished trial(s)", file=sys.stderr)
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from . import leaderboard

    study = _open_study(args.run_dir, args.storage, args.study)
    if args.run_dir:
        _score_run_on_test(study, Path(args.run_dir), args)
    frame = leaderboard.leaderboard_frame(study)
    print(frame.to_csv(index=False) if args.format == "csv" else leaderboard.to_markdown(frame))
    return 0


def _report(args: argparse.Namespace) -> int:
    """`report RUN_DIR` or `report --storage URL --study NAME [--out DIR]`: report.html again, from the
    storage and the run's confusion.json (report.py), without the dataset."""
    from .report import write_report

    study = _open_study(args.run_dir, args.storage, args.study)
    out = Path(args.out or args.run_dir or Path("runs") / study.study_name)
    print(f"wrote {write_report(study, out, run_dir=Path(args.run_dir) if args.run_dir else out)}")
    return 0


def _open_study(run_dir: str | None, storage: str | None, study_name: str | None):
    """The study a run folder's run.json names (--storage/--study override it), refusing to create one."""
    import optuna

    from .search import RUN_FILE
    from .storage import sqlite_missing

    if run_dir:
        run_file = Path(run_dir) / RUN_FILE
        if not run_file.is_file():
            raise UserError(f"{run_dir} is not a search folder (no {RUN_FILE}); give --storage URL --study NAME")
        stored = json.loads(run_file.read_text())
        storage, study_name = storage or stored["storage"], study_name or stored["study"]
    if not storage or not study_name:
        raise UserError("give a run folder, or --storage URL and --study NAME")
    if sqlite_missing(storage):  # opening it would create an empty database file
        raise UserError(f"no study database at {storage[len('sqlite:///'):]}; give the --storage of an existing "
                        "search (or its run folder)")
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UserError(f"no study {study_name!r} in {storage}") from None


def _score_run_on_test(study, run_dir: Path, args: argparse.Namespace) -> None:
    """`leaderboard RUN_DIR`: score the run's best/ on the test split when that trial has no score yet."""
    from .config import CONFIG_ATTR, SearchConfig
    from .holdout import saved_trial, score_best, stored_score
    from .plugins import registries
    from .devices import resolve_device
    from .prepared import load_source
    from .search import BEST_DIR

    best = run_dir / BEST_DIR
    trial = saved_trial(best)
    stored = stored_score(study)
    if trial is None or (stored is not None and stored.get("trial") == trial) or CONFIG_ATTR not in study.user_attrs:
        return
    config = SearchConfig.from_dict(study.user_attrs[CONFIG_ATTR])
    found = registries(tuple(args.plugin))
    try:
        refs, labels = load_source(config, found).split_refs("test")
    except UserError as exc:  # the data moved or needs a plugin: the leaderboard still prints, without it
        print(f"{PROG}: warning: best/ not scored on the test split: {exc}", file=sys.stderr)
        return
    if len(refs):
        score_best(study, best, found, resolve_device(args.device), refs=refs, labels=labels)


def _predict(args: argparse.Namespace) -> int:
    from .plugins import registries
    from .predict import predict
    from .devices import resolve_device

    frame = predict(Path(args.model), args.inputs, registries(tuple(args.plugin)), resolve_device(args.device))
    # File names that are not valid UTF-8 reach Python as surrogate escapes: write their original bytes back.
    data = frame.to_csv(index=False).encode("utf-8", errors="surrogateescape")
    if args.output:
        try:
            Path(args.output).write_bytes(data)
        except OSError as exc:
            raise UserError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
        print(f"wrote {len(frame)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_model
    from .plugins import registries

    done = export_model(Path(args.model), args.format, Path(args.output) if args.output else None,
                        registries(tuple(args.plugin)))
    print(f"wrote {done.path} (checked against the saved model: probabilities within {done.max_difference:.1e}) "
          f"and its input contract {done.contract}", file=sys.stderr)
    return 0


def _rank(args: argparse.Namespace) -> int:
    from . import config as c
    from .flags import given
    from .plugins import registries
    from .devices import resolve_device
    from .prepared import prepare_search
    from .rank import default_by, default_scorers, not_applicable_notes, rank_frame, score_backbones, to_markdown
    from .search import default_study_name

    config = c.SearchConfig(**given(c.SearchConfig, vars(args), RANK_FLAGS)).validate()
    out = Path(args.out or Path("runs") / f"{default_study_name(args.dataset)}-rank")
    found = registries(tuple(args.plugin))
    names = args.scorers or default_scorers(found)
    by = args.by or default_by(names)
    if by not in names:
        raise UserError(f"--by {by!r} is not among --scorers ({', '.join(names)})")
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    prepared = prepare_search(config, found, resolve_device(args.device), out, say=say,
                              data_cache=_data_cache(vars(args), out))
    results = score_backbones(prepared, names, say=say)
    frame = rank_frame(results, names, by)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "rank.csv", index=False)
    (out / "rank.md").write_text(to_markdown(frame, names) + "\n")
    print(frame.to_csv(index=False) if args.format == "csv" else to_markdown(frame, names))
    if not args.quiet:
        print(f"\nranked by {by} (higher transfers better); {out / 'rank.csv'}", file=sys.stderr)
        for line in not_applicable_notes(results):
            print(line, file=sys.stderr)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .backbones.checkpoints import path_name
    from .flags import given
    from .config import PretrainConfig
    from .pretrain import pretrain

    from .data.pixels import ENV

    config = PretrainConfig(**given(PretrainConfig, vars(args)), device=args.device)
    # --out is the checkpoint, which is copied around: the data cache goes there only when asked to
    cache = None if args.no_data_cache else args.data_cache or os.environ.get(ENV) or None
    manifest = pretrain(config, tuple(args.plugin), quiet=args.quiet, data_cache=None if cache is None else Path(cache))
    accuracy = "n/a" if manifest.val_accuracy is None else f"{manifest.val_accuracy:.4f}"
    print(f"wrote checkpoint {args.out}: {manifest.architecture} trained on {manifest.source_dataset} "
          f"({len(manifest.source_classes)} classes, source val_acc {accuracy}); "
          f"search with --backbones {path_name(args.out)}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import describe_plugins

    for plugin in describe_plugins(tuple(args.plugin)):
        print(f"{plugin.name} ({plugin.origin})")
        for kind, items in plugin.registers.items():
            print(f"  {kind}: {', '.join(items)}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from . import warm

    if not warm.supported():
        print("warm servers need Linux (fork, pidfd_open, descriptor passing); commands run in their own process")
        return 0
    if args.action == "start":
        if not warm.enabled():
            raise UserError(f"{warm.ENV_SWITCH}=0 turns warm servers off; unset it to start one")
        try:
            pid, started = warm.ensure_server(dict(os.environ))
        except OSError as exc:
            raise UserError(str(exc)) from None
        print(f"warm server {'started' if started else 'already running'}: pid {pid}")
        return 0
    if args.action == "stop":
        stopped = warm.stop_servers()
        print(f"stopped {len(stopped)} warm server(s)" + (f": pid {', '.join(map(str, stopped))}" if stopped else ""))
        return 0
    found = warm.servers()
    state = "off (AUTOTRANSFER_WARM=0)" if not warm.enabled() else "on"
    print(f"warm start: {state}; {len(found)} server(s) running")
    for pid, path, phase in found:
        print(f"  pid {pid}  {phase}  {path}")
    return 0


def _stopped_by(stop: KeyboardInterrupt) -> str:
    return "stopped by SIGTERM" if getattr(stop, "signum", None) == signal.SIGTERM else "interrupted"


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "run":
        from .bench.runner import RunRequest, run_suite

        try:
            run_suite(RunRequest(suite=Path(args.suite), results=Path(args.results), work=Path(args.work),
                                 only_dataset=args.only_dataset, run_id=args.run_id, night=args.night,
                                 quiet=args.quiet, device=args.device))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; finished rows are kept in {args.results}; run the same command again "
                  "(same night or --run-id) to fill in the rest", file=sys.stderr)
            return 130
        return 0
    from .bench.report import ReportRequest, plots_folder, write_report

    out = Path(args.out) if args.out else Path(args.results) / "report.html"
    html, markdown, flags = write_report(ReportRequest(results=Path(args.results), suite=args.suite, out=out,
                                                       threshold=args.threshold, slowdown=args.slowdown))
    plots = sorted(plots_folder(html).glob("*.png")) if plots_folder(html).is_dir() else []
    print(f"wrote {html}, {markdown} and {len(plots)} PNG plot(s) in {plots_folder(html)}/; {len(flags)} regression(s)")
    for flag in flags:
        print(f"REGRESSION {flag}")
    return 0


COMMANDS = {"bench": _bench, "search": _search, "worker": _worker, "leaderboard": _leaderboard, "report": _report, "predict": _predict,
            "export": _export, "pretrain": _pretrain,
            "rank": _rank, "plugins": _plugins, "server": _server}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.tensorboard")
    from .warm import set_environ_defaults

    set_environ_defaults()
    args = build_parser().parse_args(argv)  # --help and bad flags end here, before anything heavy is imported
    if args.command not in ("plugins", "server"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None, before_exit: Callable[[], None] | None = None) -> NoReturn:
    """A command in this process (`python -m autotransfer.cli`; entry.run when no warm server serves it):
    main(), `before_exit`, then exit without the interpreter's last garbage collections walking the
    import heap. With torch, timm and optuna loaded those passes take seconds at every exit and free
    nothing the process's end does not; gc.freeze() moves every object out of their reach (refcounting
    and atexit still run). Run the CLI in-process with main(), which leaves the collector as it is."""
    code = main(argv)
    sys.stdout.flush()
    if before_exit is not None:
        before_exit()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
