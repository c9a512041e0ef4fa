"""The search driver: study, storage, sampler, pruner, and the objective that trains one trial.

All search state lives in the Optuna storage, the configuration included, so a study can be
resumed (or joined) from its storage URL and name alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import torch

from .backbones import BackboneInfo, provider_for, weights_label, weights_request
from .config import CONFIG_ATTR, DATASET_SCHEME, RANDOM_WEIGHTS, RUN_FIELDS, SearchConfig
from .data import ImageRef, PreparedData
from .errors import UserError
from .events import Lifecycle, TrialEvent
from .cache import FEATURES_DIR, CachePolicy, TrialCaches, default_cache_memory
from .model import ModelCard, assemble
from .multilevel import with_stage_features as stage_features
from .plugins import plugin_manager, registries
from .resilience import TrialTakenOver, fit_trial, publish_best
from .portfolio import FOLLOW_UP_ATTR, KINDS, Opening
from .devices import release_memory, resolve_device
from .display import Display, make_display
from .prepared import Prepared, prepare_search
from .record import PRERANK_KEY, TrialRecord, write
from .space import PeerMedianPruner, ProbeOnce, TrialParams, first_trial, suggest
from .storage import DEFAULT_HEARTBEAT_S, open_storage, sqlite_missing
from .tracking import TrialLog
from .trainer import EpochStats, FitSettings, NonFiniteLoss, TrialInputs
from .worker import ELAPSED_ATTR

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
PRERANK_ATTR = PRERANK_KEY  # the study attribute (record.py)
RUN_FILE = "run.json"
CONFIG_WAIT_S = 30.0  # how long a joining process waits for the creator to store the configuration
BEST_DIR = "best"
BEST_HISTORY_DIR = "best-history"


@dataclass
class RunOptions:
    """How this process runs the search; none of it changes what is searched."""

    out: Path
    storage: str
    study_name: str
    device: str = "auto"
    quiet: bool = False
    plugins: tuple[str, ...] = ()
    memory_budget: int | None = None
    heartbeat_s: int = DEFAULT_HEARTBEAT_S  # a worker silent for 3x this long is dead; its trial is retried
    best_history: bool = False  # keep every model that was best/ under <out>/best-history (the benchmark)
    sampler_salt: int = 0  # added to the sampler's seed; `autotransfer worker` sets one per process
    data_cache: Path | None = None  # the decoded-image cache folder (data/pixels.py); None: decode in-process


# --------------------------------------------------------------------------- naming and storage

def default_study_name(dataset: str) -> str:
    """A readable name from --dataset: builtin:digits:0-4 -> digits-0-4, wds:shards/train-{0..3}.tar -> train."""
    if dataset.startswith("builtin:"):
        base = dataset.split(":", 1)[1]
    else:
        scheme = DATASET_SCHEME.match(dataset)  # wds:..., not C:\...
        path = Path((dataset[scheme.end():] if scheme else dataset).rstrip("/\\"))
        base = re.sub(r"\{[^}]*\}", "", path.name)
        base = re.sub(r"(\.tar\.gz|\.tgz|\.tar|\.csv)$", "", base, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "study"


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def stored_config(storage: str, study_name: str, heartbeat_s: int = DEFAULT_HEARTBEAT_S) -> SearchConfig | None:
    """The configuration saved in an existing study, or None when there is no such study. `heartbeat_s`:
    the run's, so the storage opened here is the one the run then uses (opening one costs time)."""
    if sqlite_missing(storage):
        return None
    opened = open_storage(storage, heartbeat_s)
    try:
        names = optuna.get_all_study_names(opened)
    except Exception as exc:
        raise UserError(f"cannot open storage {storage!r}: {type(exc).__name__}: {exc}") from None
    if study_name not in names:
        return None
    study = optuna.load_study(study_name=study_name, storage=opened)
    data = study.user_attrs.get(CONFIG_ATTR)
    if data is None:
        raise UserError(f"study {study_name!r} in {storage} was not created by autotransfer; use another --study name")
    return SearchConfig.from_dict(data)


def merge_config(explicit: dict, stored: SearchConfig | None) -> SearchConfig:
    """Stored settings plus the flags given now; a changed search-defining flag is an error."""
    if stored is None:
        if "dataset" not in explicit:
            raise UserError("--dataset is required to start a new study")
        return SearchConfig(**explicit).validate()
    merged = SearchConfig.from_dict({**stored.to_dict(), **explicit})
    conflicts = merged.conflicts_with(stored)
    if conflicts:
        detail = "; ".join(f"{k}: stored {getattr(stored, k)!r}, given {getattr(merged, k)!r}" for k in conflicts)
        raise UserError(f"this study was created with other settings ({detail}); repeat the stored values, "
                        "or start a new study with --study NAME")
    return merged.validate()


# --------------------------------------------------------------------------- the search

@dataclass
class Search:
    """The driver: opens the study, queues the opening and runs trials on a `Prepared` search (prepared.py).
    The sampler and pruner are parts passed in (`sampler(seed)`, `pruner(config)`); the defaults are the
    seeded TPE and the configured pruner."""

    config: SearchConfig
    options: RunOptions
    sampler: Callable[[int], optuna.samplers.BaseSampler] | None = None  # the seed -> a sampler
    pruner: Callable[[SearchConfig], optuna.pruners.BasePruner] | None = None
    device: torch.device = field(init=False)
    prepared: Prepared | None = field(init=False, default=None)
    created_study: bool = field(init=False, default=False)  # this process created the study (and opens it)
    kept: list[str] | None = field(init=False, default=None)  # the candidates --prerank kept
    stop_reason: str = field(init=False, default="")  # why this process stopped running trials (one line)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.options.device)
        self.registries = registries(tuple(self.options.plugins))
        self.lifecycle = Lifecycle(plugin_manager(tuple(self.options.plugins)))
        self.out = Path(self.options.out)
        self.caches = TrialCaches(CachePolicy(
            enabled=self.config.cache, views=self.config.cache_views, seed=self.config.seed,
            memory=self.config.cache_memory or default_cache_memory(), folder=self.out / FEATURES_DIR))

    # -- preparation: everything that can fail on bad input happens before any trial runs
    def prepare(self, say: Callable[[str], None] = lambda message: None) -> Prepared:
        self.prepared = prepare_search(self.config, self.registries, self.device, self.out, self.options.memory_budget,
                                       say=say, data_cache=self.options.data_cache)
        return self.prepared

    @property
    def data(self) -> PreparedData | None:
        return None if self.prepared is None else self.prepared.data

    @property
    def infos(self) -> dict[str, BackboneInfo]:
        return {} if self.prepared is None else self.prepared.infos

    @property
    def test_refs(self) -> tuple[list[ImageRef], np.ndarray | None]:
        return ((), None) if self.prepared is None else self.prepared.test_refs

    def inputs_for(self, backbone: str) -> TrialInputs:
        """How `backbone`'s trials see the images (crop, stored size, normalisation) in this search."""
        return self.prepared.inputs_for(backbone)

    def open_study(self) -> optuna.Study:
        self.out.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.options.storage, self.options.heartbeat_s)
        name = self.options.study_name
        try:
            try:  # the storage's unique study name makes exactly one process the creator
                study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                            pruner=self._pruner(), load_if_exists=False)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study = optuna.load_study(study_name=name, storage=storage, pruner=self._pruner())
                created = False
        except Exception as exc:
            raise UserError(f"cannot open storage {self.options.storage!r}: {type(exc).__name__}: {exc}") from None
        self.created_study = created
        if not created:
            self._check_against(study)
        study.sampler = ProbeOnce(self._sampler(previous_trials=len(study.trials) + self.options.sampler_salt),
                                  self.config, {name: info.num_stages for name, info in self.infos.items()})
        study.set_user_attr(CONFIG_ATTR, self.config.to_dict())
        (self.out / RUN_FILE).write_text(json.dumps({"storage": self.options.storage,
                                                      "study": self.options.study_name}, indent=2) + "\n")
        return study

    def _check_against(self, study: optuna.Study) -> None:
        """Joining a study another process created: its settings, not this run's, define it. They were
        checked when this command started, but a search started at the same moment may have created the
        study since, with other settings; wait for its configuration (set right after creation) and
        refuse a difference rather than mix trials of two searches."""
        deadline = time.monotonic() + CONFIG_WAIT_S
        while CONFIG_ATTR not in study.user_attrs and time.monotonic() < deadline:
            time.sleep(0.2)
            study = optuna.load_study(study_name=study.study_name, storage=study._storage)
        stored = study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            raise UserError(f"study {study.study_name!r} in {self.options.storage} was not created by autotransfer; "
                            "use another --study name")
        merge_config({k: v for k, v in self.config.to_dict().items() if k not in RUN_FIELDS},
                     SearchConfig.from_dict(stored))

    def _sampler(self, previous_trials: int) -> optuna.samplers.BaseSampler:
        """The sampler part, seeded; a resumed study offsets the seed so it does not replay the first run's draws."""
        return (self.sampler or self.default_sampler)(self.config.seed + previous_trials)

    def _pruner(self) -> optuna.pruners.BasePruner:
        return (self.pruner or default_pruner)(self.config)

    def default_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """Seeded multivariate TPE with a constant liar (workers draw at once), start-up sized to the budget."""
        startup = max(3, min(10, (self.config.trials or 40) // 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                              n_startup_trials=startup)

    # -- the run
    def run(self, launch: Callable[[optuna.Study], None] | None = None) -> optuna.Study:
        """Prepare, open the study and run trials in this process, or hand the study to `launch`
        (local worker processes) once it is ready."""
        from .launch import is_supervised

        progress = make_display(self.options.quiet, self.config.trials, live=False if is_supervised() else None)
        try:
            return self._run(launch, progress)
        finally:
            progress.close()

    def _run(self, launch: Callable[[optuna.Study], None] | None, progress: Display) -> optuna.Study:
        self.prepare(progress.say)
        progress.say(self.prepared.header())
        study = self.open_study()
        self.kept = self.prerank(study, progress) if self.config.prerank else None
        if self.created_study and self.config.portfolio:
            self.open_with_portfolio(study, progress)
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        elapsed_before = float(study.user_attrs.get(ELAPSED_ATTR, 0.0))
        timeout = None if self.config.timeout is None else self.config.timeout - elapsed_before
        if (self.config.trials is not None and finished >= self.config.trials) or (timeout is not None and timeout <= 0):
            self.stop_reason = (f"budget already spent: {finished} finished trial(s), {elapsed_before:.0f}s searched; "
                                "raise --trials or --timeout to continue")
        else:
            if finished:
                progress.say(f"resuming study {self.options.study_name!r}: {finished} finished trial(s) kept")
            if launch is None:
                progress.finished = finished
                progress.trial_finished(finished, _best(study))
            if launch is not None:
                self.prepared.release_data()  # each worker process loads its own copy; this one only supervises
                launch(study)
            else:
                why = self._optimize(study, progress, timeout, elapsed_before)
                self.stop_reason = stop_message(why, study, self.config)
        self.finish(study)
        return study

    # -- scorer-guided search
    def prerank(self, study: optuna.Study, progress: Display) -> list[str]:
        """Score every candidate once (stored in the study, so a resumed or joining worker reuses
        the choice), keep the top k by --prerank, and open with one sensible trial per kept one."""
        from .rank import default_scorers, rank_frame, score_backbones, to_markdown, top_k

        stored = study.user_attrs.get(PRERANK_ATTR)
        if stored is not None:
            return list(stored["kept"])
        by = self.config.prerank
        names = [by, *[name for name in default_scorers(self.registries) if name != by]]
        self.registries.scorer(by)  # an unknown --prerank fails here, before any extraction
        progress.say(f"pre-ranking {len(self.config.backbones)} backbones with {', '.join(names)}")
        results = score_backbones(self.prepared, names, say=progress.say)
        frame = rank_frame(results, names, by)
        kept = top_k(results, by, self.config.top_k)
        frame.insert(1, "kept", frame["backbone"].isin(kept))
        frame.to_csv(self.out / "prerank.csv", index=False)
        (self.out / "prerank.md").write_text(to_markdown(frame, names) + "\n")
        progress.say(to_markdown(frame, names))
        progress.say(f"keeping the top {len(kept)} by {by}: {', '.join(kept)}")
        study.set_user_attr(PRERANK_ATTR, {"by": by, "scorers": names, "kept": kept,
                                           "table": json.loads(frame.to_json(orient="records"))})
        if not study.trials and not self.config.portfolio:
            for name in kept:
                study.enqueue_trial(first_trial(self.config, name, self.infos[name].num_stages), skip_if_exists=True)
        return kept

    def opening(self) -> Opening:
        """The two-stage opening (portfolio.Opening) for the kept candidates, as they were created."""
        names = list(self.kept or self.config.backbones)
        return Opening(self.config, names, {name: self.infos[name].num_stages for name in names},
                       {name: self.prepared.sources.get(name, RANDOM_WEIGHTS) != "random init" for name in names})

    def open_with_portfolio(self, study: optuna.Study, progress: Display) -> None:
        """Queue the opening's first stage (the probes; everything when nothing can be probed). Only the
        process that created the study does this; the second stage is queued by the worker loop once due."""
        queue, cut = self.opening().queue_first(study)
        if queue:
            counts = {kind: sum(k == kind for k, _ in queue) for kind in KINDS}
            then = ("; then a fine-tune and LP-FT of the best-probed backbone, then the sampler"
                    if counts["probe"] == len(queue) else "; then the sampler")
            progress.say(f"opening with {len(queue)} known recipe(s): " +
                         ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) +
                         (f" ({cut} more left out: --trials {self.config.trials})" if cut else then) +
                         " (--no-portfolio to start with the sampler)")

    def _follow_up(self, progress: Display) -> Callable[[optuna.Study], None]:
        """What the worker loop runs before each trial: queue the opening's second stage once it is due.
        Once the study says it is queued (by this worker or another), later calls read nothing."""
        opening, settled = self.opening(), not self.config.portfolio

        def queue(study: optuna.Study) -> None:
            nonlocal settled
            if settled:
                return
            queued = opening.queue_due(study)
            settled = FOLLOW_UP_ATTR in study.user_attrs
            if queued:
                backbone = queued[0][1]["backbone"]
                progress.say(f"opening, second stage: {' and '.join(kind for kind, _ in queued)} of {backbone}, "
                             "the backbone whose probe scored best on val; then the sampler")
        return queue

    def _optimize(self, study: optuna.Study, progress: Display, timeout: float | None, elapsed_before: float) -> str:
        from .worker import Budget, WorkerLoop, quiet_expected_failures, stop_on_sigterm

        quiet_expected_failures()
        restore = stop_on_sigterm()
        try:
            return WorkerLoop(lambda trial: self.objective(study, trial, progress), study,
                              Budget(self.config.trials, timeout, elapsed_before), self.out, progress.say,
                              self.options.heartbeat_s, self._follow_up(progress),
                              lambda study: progress.trial_finished(len(study.get_trials(deepcopy=False, states=FINISHED)),
                                                                    _best(study))).run()
        finally:
            restore()

    def objective(self, study: optuna.Study, trial: optuna.Trial, progress: Display) -> float:
        from .worker import DuplicateTrial, duplicate_of

        params = suggest(trial, self.config, lambda name: self.infos[name].num_stages, getattr(self, "kept", None))
        same = duplicate_of(study.get_trials(deepcopy=False), trial.number, trial.params)
        if same is not None:
            reason = f"duplicate: the configuration of trial {same}, already finished or running; not run"
            write(trial, reason=reason)
            raise DuplicateTrial(reason)
        inputs = self.inputs_for(params.backbone)
        request = weights_request(self.config, params.backbone)
        write(trial, frozen_stages=params.frozen_stages, num_stages=params.num_stages, pretrained=request.label,
              image_size=inputs.image_size, head_init=params.head_init)
        progress.trial_started(trial.number, params)
        first = TrialRecord.of(trial).checkpoint_key
        if first is not None and first != trial.number:  # a retry (Ctrl-C, a stopped worker): say whose work it goes on with
            progress.say(f"  trial {trial.number}: continues trial {first} (interrupted, or its worker stopped), "
                         "from its last checkpoint when one was kept")
        event = TrialEvent(self.options.study_name, self.options.storage, trial.number,
                           _hparams(params, request.label), self.out)
        self.lifecycle.trial_started(event)
        tracker = TrialLog(self.out / "tensorboard", trial.number)
        start = time.perf_counter()
        state, value, model, reason, path, taken = "FAIL", None, None, None, None, False
        reached: float | None = None  # the last epoch's val accuracy so far
        try:
            backbone = provider_for(params.backbone, self.registries).create(params.backbone, request)
            identity: tuple = (params.backbone, request)  # names the frozen tensors, for the caches
            if params.features == "stages":
                backbone = stage_features(backbone, inputs.image_size)
                identity = (*identity, "stages")
            torch.manual_seed(self.config.seed + trial.number)  # the head's init: this trial's alone
            model = assemble(backbone, params.head, self.data.num_classes, params.frozen_stages)
            trainable, total = model.parameter_counts()
            write(trial, trainable_params=trainable, total_params=total, weights_source=backbone.source,
                  pretrained=weights_label(request, backbone.source))
            if params.head_init == "probe" and not params.probe:  # LP-FT: start from the frozen backbone's probe
                fitted = self.caches.probe_head(model, identity,
                                                self.data.train.at_size(inputs.resize_size), inputs, self.device,
                                                self.config.seed)
                write(trial, probe_c=fitted.c)
                model.keep_norm_statistics()  # the probe was fitted to features made with them

            def on_epoch(stats: EpochStats) -> None:
                nonlocal reached
                reached = stats.val_accuracy
                tracker.epoch(stats)
                write(trial, epochs_done=stats.epoch)
                if stats.probe_c is not None:
                    write(trial, probe_c=stats.probe_c)
                if not params.probe:  # a probe converges in one step: nothing to compare with others' epochs
                    trial.report(stats.val_accuracy, stats.epoch)
                progress.epoch(trial.number, stats, 1 if params.probe else self.config.epochs, _best_value(study))
                self.lifecycle.epoch_ended(event, stats)
                # After the last epoch there is nothing left to save by stopping: the trial completes.
                if not params.probe and stats.epoch < self.config.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {stats.epoch} ({self.config.pruner}) "
                                             f"with val_acc {stats.val_accuracy:.4f}")

            settings = FitSettings(params.optimizer, params.lr, self.config.epochs, self.config.batch_size, self.device,
                                   self.config.seed + trial.number, self.config.compile,
                                   probe=params.probe, probe_c=params.probe_c,
                                   label_smoothing=self.config.label_smoothing)
            path = self.caches.plan(model, identity, self.data.train.at_size(inputs.resize_size),
                                    self.data.val.at_size(inputs.resize_size), inputs, params.frozen_stages,
                                    params.num_stages, settings)
            write(trial, cache=path.mode)
            if path.note:
                write(trial, cache_note=path.note)
            progress.path(trial.number, path.mode, path.note)
            history = fit_trial(self.out, trial, model, path, on_epoch)
            value = history[-1].val_accuracy  # the last epoch: what the saved weights give (README, "A trial's value")
            card = ModelCard(  # best/ takes it if it beats the chosen model (selection.py)
                backbone=params.backbone, weights_source=backbone.source, pretrained=backbone.source != "random init",
                head=params.head.to_dict(), frozen_stages=params.frozen_stages, class_names=self.data.class_names,
                image_size=inputs.image_size, resize_size=inputs.resize_size, decode_size=self.data.decode_size,
                mean=list(inputs.mean), std=list(inputs.std), val_accuracy=value, val_images=len(self.data.val),
                trial=trial.number, features=params.features, trainable_params=trainable,
                architecture=backbone.architecture)
            publish_best(study, model, card, self.out / BEST_DIR,
                         self.out / BEST_HISTORY_DIR if self.options.best_history else None)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned as exc:
            state, reason = "PRUNED", str(exc)
            raise
        except NonFiniteLoss as exc:
            state, reason = "PRUNED", str(exc)
            raise optuna.TrialPruned(str(exc)) from None
        except torch.cuda.OutOfMemoryError:
            reason = "oom: CUDA out of memory; lower --batch-size or --image-size"
            raise
        except TrialTakenOver as exc:  # the storage holds its retry now: write nothing more to this trial
            reason, taken = str(exc), True
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            duration = time.perf_counter() - start
            done = path.describe() if path is not None else None
            if not taken:
                if done is not None and done != path.note:  # what the caches did, now that it ran
                    write(trial, cache_note=done)
                if reason is not None:
                    write(trial, reason=reason)
                write(trial, duration_s=round(duration, 3))
            # A pruned trial's HParams row shows where it stood when it was stopped, not NaN.
            tracker.finish(_hparams(params, request.label), value if value is not None else reached, state)
            self.lifecycle.trial_finished(event, state, value, reason)
            del model, path
            if self.device.type == "cuda":  # give the GPU memory back now; on CPU, refcounting frees the model
                release_memory(self.device)

    def score_test(self, study: optuna.Study) -> dict | None:
        """The best/ model on the test split, once the study is finished (see holdout.py); None when
        the dataset has no test split, nothing was saved or other workers are still running."""
        from .holdout import score_best, study_finished

        refs, labels = self.test_refs
        if not len(refs) or not study_finished(study):
            return None
        test = self.data.test if self.data is not None else None
        return score_best(study, self.out / BEST_DIR, self.registries, self.device, images=test, refs=refs,
                          labels=labels)

    def finish(self, study: optuna.Study) -> None:
        from . import leaderboard  # pandas: only once trials are done

        self.score_test(study)
        frame = leaderboard.leaderboard_frame(study)
        leaderboard.write(frame, self.out)
        stored = study.user_attrs.get(PRERANK_ATTR)
        if stored is not None:
            write_scorer_tau(stored, frame, self.out)
        from .model import CONFIG_FILE, read_card
        from .selection import replaces

        complete = frame[frame["state"] == "COMPLETE"]
        if (self.out / BEST_DIR / CONFIG_FILE).is_file() and len(complete):  # rank 1 may differ only within the margin
            card = read_card(self.out / BEST_DIR)
            top = complete.iloc[0]
            best_number, best_value, size = int(top["trial"]), float(top["val_accuracy"]), top["trainable_params"]
            size = None if size is None or size != size else int(size)  # NaN: not recorded
            if card.val_accuracy is not None and replaces(best_value, card.val_accuracy, card.val_images, size,
                                                          card.trainable_params):
                log.warning("best/ holds trial %s but trial %s beats it by more than the selection margin "
                            "(selection.py); was best/ written by another study?", card.trial, best_number)


def write_scorer_tau(stored: dict, frame, out: Path) -> None:
    """How well each scorer predicted the best accuracy each trained backbone reached."""
    import pandas as pd

    from .rank import scorer_tau

    complete = frame[frame["state"] == "COMPLETE"]
    best = pd.to_numeric(complete["val_accuracy"], errors="coerce").groupby(complete["backbone"]).max()
    scores = pd.DataFrame(stored["table"])
    scorer_tau(scores, best, stored["scorers"]).to_csv(out / "scorer_tau.csv", index=False)


def stop_message(why: str, study: optuna.Study, config: SearchConfig) -> str:
    """Why the search stopped, in a line: the --trials budget, --timeout (checked between trials, so a
    trial running at the limit ran to its end), an exhausted space, or failures."""
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    searched = float(study.user_attrs.get(ELAPSED_ATTR, 0.0))
    if why == "trials":
        return f"stopped: the --trials {config.trials} budget is spent ({finished} finished trials)"
    if why == "timeout":
        return (f"stopped: --timeout {config.timeout:g} s reached ({searched:.0f} s searched over all runs of the "
                f"study, {finished} finished trials; the limit is checked between trials, so a trial running at it "
                "ran to its end)")
    if why == "exhausted":
        return f"stopped early: the search space looks exhausted ({finished} finished trials); widen it"
    return f"stopped early: too many trials failed in this run ({finished} finished trials)"


def default_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    """--pruner: the median of peers at the same epoch, Hyperband over --epochs, or none."""
    if config.pruner == "median":
        return PeerMedianPruner(n_startup_trials=3)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=config.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _best(study: optuna.Study) -> tuple[float, int] | None:
    """(value, trial number) of the best complete trial so far, for the display."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    return float(best.value), best.number


def _best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


def _hparams(params: TrialParams, pretrained: str) -> dict:
    return {
        "backbone": params.backbone, "pretrained": pretrained, "frozen_stages": params.frozen_stages,
        "head": params.head.kind, "head_hidden": params.head.hidden or 0, "head_dropout": params.head.dropout,
        "lr": params.lr, "optimizer": params.optimizer, "head_init": params.head_init, "features": params.features,
    }
