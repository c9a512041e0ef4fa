"""Which way a trial trains, and the caches that make frozen stages run once instead of every epoch.

- fully frozen backbone (`features`): pooled features of the clean centre crops, through the
  on-disk feature cache (the one `rank` and `--prerank` fill), train the head alone;
- partly frozen backbone (`boundary`): the activations at the freeze boundary for `views`
  augmented views of every training image (and the clean validation images), kept in memory for
  every later trial of the same backbone; epoch e trains the trainable part on view e mod `views`.
  Each view is computed when an epoch first reads it (a pruned trial pays only for what it read),
  and from a shallower cached boundary of the same backbone when there is one, so the frozen
  stages run once per view per search rather than once per epoch per trial;
- otherwise, with caching off (`--no-cache`), or when the boundary cache would exceed its memory
  budget or the model cannot be replayed (`plain`): the whole model on augmented images every epoch.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import nn

from .boundary import (CHECK_BATCH, Boundary, NoBoundary, Replay, ReplayedModel, capture, capture_from,
                       verified_boundary)
from ..data import ImageSet, eval_transform, train_transform
from ..devices import to_device
from .features import FeatureCache, FeatureSet, extract, fingerprint, images_digest, tensors_digest
from ..multilevel import StagePooled
from ..probe import Probe, fit_probe
from ..trainer import (EpochStats, FitSettings, Trainee, TrialInputs, autocast_for, feature_batches, fit,
                      memory_format, eval_batch, no_report, probe_on_features, rows_accuracy, train,
                      train_on_features, wants_channels_last)


DEFAULT_VIEWS = 2
GiB = 1 << 30


def default_cache_memory() -> int:
    """The in-memory boundary cache's default budget: 2 GiB, or a quarter of RAM if that is less."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2 * GiB
    return int(min(2 * GiB, ram // 4))


def format_bytes(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class CachePolicy:
    enabled: bool = True
    views: int = DEFAULT_VIEWS
    memory: int = 2 * GiB  # byte budget of the in-memory boundary cache
    seed: int = 0  # seeds the augmented views; one per search, so trials can share them
    folder: Path | None = None  # the on-disk feature cache; None keeps features in memory only


@dataclass
class TrialPath:
    """The chosen path: `mode` and `note` go into the trial's record; `run(on_epoch, **changes)`
    trains, with `changes` to the planned FitSettings (accumulation, resume, on_checkpoint; the
    out-of-memory retry and resume use them on every path)."""

    mode: str  # "features", "boundary" or "plain"
    train: Callable[[Callable[[EpochStats], None], FitSettings], list[EpochStats]]
    settings: FitSettings
    note: str = ""  # what was planned
    summary: Callable[[], str] | None = None  # what was done, once the trial ran (lazily filled caches)
    cache_seconds: Callable[[], float] = lambda: 0.0  # spent filling caches for this trial so far

    def run(self, on_epoch: Callable[[EpochStats], None], **changes) -> list[EpochStats]:
        return self.train(on_epoch, replace(self.settings, **changes))

    def describe(self) -> str:
        return self.summary() if self.summary is not None else self.note


@dataclass
class BoundaryEntry:
    """One boundary's activations for one family of trials (same backbone weights, crop, images
    and view seed): `parts` holds the V training views and then the clean validation images, each
    computed the first time a trial reads it, so a trial pruned after one epoch pays for one view."""

    boundary: Boundary  # as found on the model that made the entry; `.on(backbone)` rebinds it
    parts: list[torch.Tensor | None]  # views 0..V-1, then validation
    labels: torch.Tensor
    val_labels: torch.Tensor
    planned: int  # bytes once every part is computed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts if t is not None)


@dataclass
class PartCounts:
    """What one trial's boundary path did with the cache: its note after the trial."""

    reused: int = 0
    derived: int = 0
    computed: int = 0
    seconds: float = 0.0
    sources: set[str] = field(default_factory=set)


@dataclass
class TrialCaches:
    """One search process's caches: the disk feature cache, digests already computed, and boundary
    activations in memory, least recently used evicted first to stay within the budget. A deeper
    boundary of a backbone is computed from a shallower one already cached, not from the images."""

    policy: CachePolicy
    _digests: dict[Hashable, tuple[object, str]] = field(default_factory=dict)
    _entries: OrderedDict[Hashable, BoundaryEntry] = field(default_factory=OrderedDict)
    _derivable: dict[Hashable, bool] = field(default_factory=dict)
    _final_of_stages: dict[Hashable, tuple[ImageSet, FeatureSet]] = field(default_factory=dict)

    def plan(self, model: nn.Module, identity: Hashable, train_set: ImageSet, val_set: ImageSet,
             inputs: TrialInputs, frozen_stages: int, num_stages: int, settings: FitSettings) -> TrialPath:
        """Pick the path for a TransferModel with `frozen_stages` of `num_stages` frozen; `identity`
        names its backbone weights (same identity, same frozen tensors)."""
        if settings.probe:  # a probe is defined on pooled features, cached or not
            return self._features_path(model, identity, train_set, val_set, inputs, settings)
        if not self.policy.enabled or frozen_stages == 0:
            return plain_path(model, train_set, val_set, inputs, settings,
                              "" if self.policy.enabled else "cache off (--no-cache)")
        if frozen_stages >= num_stages:
            return self._features_path(model, identity, train_set, val_set, inputs, settings)
        try:
            return self._boundary_path(model, identity, train_set, val_set, inputs, settings)
        except NoBoundary as exc:
            return plain_path(model, train_set, val_set, inputs, settings, f"cache: plain ({exc})")

    # -- fully frozen
    def _digest(self, key: Hashable, subject: object, compute: Callable[[], str]) -> str:
        if key not in self._digests:
            self._digests[key] = (subject, compute())  # holding the subject keeps id() keys unique
        return self._digests[key][1]

    def _features(self, model: nn.Module, identity: Hashable, images: ImageSet, inputs: TrialInputs,
                  device: torch.device) -> FeatureSet:
        """Pooled features of `images`; the final features of a backbone whose stage features were
        extracted (identity + ("stages",)) are their last columns, not a second pass."""
        known = self._final_of_stages.get((identity, id(images), inputs))
        if known is not None:
            return known[1]
        weights = self._digest(("weights", identity), None, lambda: tensors_digest(model.backbone))
        pixels = self._digest(("images", id(images)), images, lambda: images_digest(images))
        cache = FeatureCache(self.policy.folder) if self.policy.folder is not None and self.policy.enabled else None
        found = extract(model.backbone, None, images, inputs, device, cache, key=fingerprint(weights, pixels, inputs),
                        meta={"backbone": str(identity)})
        if isinstance(model.backbone, StagePooled) and isinstance(identity, tuple) and identity[-1:] == ("stages",):
            final = FeatureSet(found.features[:, -model.backbone.final_width:], found.labels, None, 0.0, cached=True)
            self._final_of_stages[(identity[:-1], id(images), inputs)] = (images, final)  # holding images keeps id() unique
        return found

    def _features_path(self, model, identity, train_set, val_set, inputs, settings) -> TrialPath:
        model.to(settings.device)
        train_found = self._features(model, identity, train_set, inputs, settings.device)
        val_found = self._features(model, identity, val_set, inputs, settings.device)
        note = f"features: train {_origin(train_found)}, val {_origin(val_found)}"

        if settings.probe:
            note += "; head: logistic-regression probe, C by CV on train"

        def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
            if settings.probe:
                return probe_on_features(model, torch.from_numpy(train_found.features), train_set.labels,
                                         torch.from_numpy(val_found.features), val_set.labels, settings, on_epoch)
            return train_on_features(model, torch.from_numpy(train_found.features), train_set.labels,
                                     torch.from_numpy(val_found.features), val_set.labels, settings, on_epoch)
        spent = sum(found.seconds for found in (train_found, val_found) if not found.cached)
        return TrialPath("features", run, settings, note, cache_seconds=lambda: spent)

    def probe_head(self, model: nn.Module, identity: Hashable, train_set: ImageSet, inputs: TrialInputs,
                   device: torch.device, seed: int) -> Probe:
        """LP-FT: the probe of the backbone as it starts (its pretrained weights), fitted on the pooled
        features of the clean training crops (the feature cache a probe trial of it filled), loaded
        into `model.head`. Returns the fitted probe."""
        training = model.training
        found = self._features(model, identity, train_set, inputs, device)  # runs the backbone in eval mode
        model.train(training)
        fitted = fit_probe(found.features, train_set.labels.numpy(), model.head.out_features, seed)
        fitted.load_into(model.head)
        return fitted

    # -- partly frozen
    def _boundary_path(self, model, identity, train_set, val_set, inputs, settings) -> TrialPath:
        device = settings.device
        if len(train_set) < CHECK_BATCH or not train_set.in_memory:
            raise NoBoundary("boundary caching needs the training images in memory" if len(train_set) >= CHECK_BATCH
                             else "too few training images to check a boundary")
        model.to(device)
        layout = wants_channels_last(model, device)
        if layout:
            model.to(memory_format=torch.channels_last)
        sample = memory_format(eval_transform(train_set.images[:CHECK_BATCH].to(device), inputs.image_size,
                                              inputs.mean, inputs.std), layout)
        boundary = verified_boundary(model.backbone, sample)
        views = max(1, min(self.policy.views, settings.epochs))
        needed = (len(train_set) * views + len(val_set)) * boundary.bytes_per_example(store_dtype(device))
        if needed > self.policy.memory:
            raise NoBoundary(f"boundary cache {format_bytes(needed)} > --cache-memory {format_bytes(self.policy.memory)}")
        family = (identity, inputs, views, self.policy.seed, id(train_set), id(val_set), str(device), layout)
        key = (family, boundary.name)
        if key not in self._entries:
            self._make_room(needed)
            target = _store_device(device, needed)
            self._entries[key] = BoundaryEntry(boundary, [None] * (views + 1), train_set.labels.to(target),
                                               val_set.labels.to(target), needed)
        self._entries.move_to_end(key)
        entry = self._entries[key]
        counts = PartCounts()
        filler = _PartFiller(self, family, entry, model.backbone, boundary, (train_set, val_set), inputs, device,
                             layout, sample, counts)
        note = f"{views} view(s) at {boundary.name}, {format_bytes(needed)}"
        if settings.compile:
            note += "; compile skipped on the boundary path"

        def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
            return train_from_boundary(model, boundary, filler, entry, replace(settings, compile=False), on_epoch,
                                       channels_last=layout)
        return TrialPath("boundary", run, settings, note, lambda: note + "; " + _describe(counts),
                         lambda: counts.seconds)

    def _make_room(self, needed: int) -> None:
        """Evict the least recently used entries until `needed` more bytes fit in the budget."""
        while self._entries and sum(e.planned for e in self._entries.values()) + needed > self.policy.memory:
            self._entries.popitem(last=False)

    def derivable(self, pair: Hashable, check: Callable[[], bool]) -> bool:
        """Whether a deeper boundary may be computed from a shallower one: `check` runs once per pair."""
        if pair not in self._derivable:
            self._derivable[pair] = check()
        return self._derivable[pair]

    def shallower(self, family: Hashable, boundary: Boundary, index: int) -> BoundaryEntry | None:
        """The deepest cached entry of this family above `boundary` that has part `index`."""
        found = [entry for (fam, _), entry in self._entries.items()
                 if fam == family and entry.boundary.order < boundary.order and entry.parts[index] is not None]
        return max(found, key=lambda entry: entry.boundary.order, default=None)


def _describe(counts: PartCounts) -> str:
    done = []
    if counts.reused:
        done.append(f"{counts.reused} part(s) reused")
    if counts.derived:
        done.append(f"{counts.derived} from the {', '.join(sorted(counts.sources))} cache")
    if counts.computed:
        done.append(f"{counts.computed} from images")
    if counts.derived or counts.computed:
        done.append(f"{counts.seconds:.1f} s")
    return ", ".join(done) or "no part read"


@dataclass
class _PartFiller:
    """Computes an entry's missing parts with the current trial's backbone (its frozen stages are
    the family's): from a shallower cached boundary when one has the part and replaying from it is
    proven to match, else from the images."""

    caches: TrialCaches
    family: Hashable
    entry: BoundaryEntry
    backbone: nn.Module
    boundary: Boundary
    sets: tuple[ImageSet, ImageSet]  # train, val
    inputs: TrialInputs
    device: torch.device
    channels_last: bool
    sample: torch.Tensor  # clean images for the one-off check of a derivation
    counts: PartCounts
    seen: set[int] = field(default_factory=set)

    def __call__(self, index: int) -> torch.Tensor:
        part = self.entry.parts[index]
        if part is not None:
            if index not in self.seen:
                self.counts.reused += 1
        else:
            start = time.perf_counter()
            source = self.caches.shallower(self.family, self.boundary, index)
            if source is not None and self._derivable(source.boundary):
                part = self._derived(source, index)
                self.counts.derived += 1
                self.counts.sources.add(source.boundary.name)
            else:
                part = self._from_images(index)
                self.counts.computed += 1
            seconds = time.perf_counter() - start
            self.entry.parts[index] = part
            self.counts.seconds += seconds
        self.seen.add(index)
        return part

    def _rows(self, count: int) -> torch.Tensor:
        target = self.entry.labels.device
        rows = torch.empty((count, *self.boundary.shape), dtype=store_dtype(self.device), device=target)
        if self.channels_last and rows.dim() == 4:
            rows = rows.contiguous(memory_format=torch.channels_last)
        return rows

    def _from_images(self, index: int) -> torch.Tensor:
        views = len(self.entry.parts) - 1
        images = self.sets[index == views]
        generator = torch.Generator().manual_seed(view_seed(self.caches.policy.seed, index))
        rows = self._rows(len(images))
        autocast, _ = autocast_for(self.device)
        offset = 0
        for batch, _ in images.batches(eval_batch(self.device), shuffle=False, device=self.device):
            if index < views:
                batch = train_transform(batch, self.inputs.image_size, self.inputs.mean, self.inputs.std, generator)
            else:
                batch = eval_transform(batch, self.inputs.image_size, self.inputs.mean, self.inputs.std)
            with autocast():
                found = capture(self.backbone, self.boundary, memory_format(batch, self.channels_last))
            rows[offset:offset + len(found)].copy_(found)  # into host memory, a blocking copy: complete when read
            offset += len(found)
        return rows

    def _derived(self, source: BoundaryEntry, index: int) -> torch.Tensor:
        cached = source.parts[index]
        origin = source.boundary.on(self.backbone)
        rows = self._rows(len(cached))
        autocast, _ = autocast_for(self.device)
        step = eval_batch(self.device)
        for start in range(0, len(cached), step):
            chunk = memory_format(to_device(cached[start:start + step], self.device), self.channels_last)
            with autocast():
                rows[start:start + len(chunk)].copy_(capture_from(self.backbone, origin, chunk, self.boundary))
        return rows

    def _derivable(self, source: Boundary) -> bool:
        pair = (self.family, source.name, self.boundary.name)
        return self.caches.derivable(pair, lambda: self._replay_matches(source))

    def _replay_matches(self, source: Boundary) -> bool:
        """Does replaying from `source` give what the images give, on the sample?"""
        origin = source.on(self.backbone)
        autocast, _ = autocast_for(self.device)
        try:
            with autocast():
                direct = capture(self.backbone, self.boundary, self.sample)
                via = capture_from(self.backbone, origin, capture(self.backbone, origin, self.sample), self.boundary)
        except Exception:  # anything the replay cannot do: compute from images instead
            return False
        tolerance = 1e-4 if store_dtype(self.device) == torch.float32 else 3e-2
        return via.shape == direct.shape and torch.allclose(via.float(), direct.float(), rtol=tolerance, atol=tolerance)


def view_seed(seed: int, view: int) -> int:
    """Each view's augmentation has its own seed, so views can be computed in any order."""
    return seed * 1_000_003 + view


class _Views(Sequence):
    """The training views of an entry, each computed on first read (epoch e reads view e mod V)."""

    def __init__(self, fill: Callable[[int], torch.Tensor], count: int):
        self.fill, self.count = fill, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.fill(index)


def _origin(found) -> str:
    return "from the cache" if found.cached else f"extracted in {found.seconds:.1f} s"


def plain_path(model: nn.Module, train_set: ImageSet, val_set: ImageSet, inputs: TrialInputs, settings: FitSettings,
               note: str = "") -> TrialPath:
    def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
        return train(model, train_set, val_set, inputs, settings, on_epoch)
    return TrialPath("plain", run, settings, note)


def store_dtype(device: torch.device) -> torch.dtype:
    """Activations are kept in the autocast dtype on CUDA (what the next layer reads anyway), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _store_device(device: torch.device, needed: int, share: float = 0.5) -> torch.device:
    """The training device when the cache fits in `share` of its free memory, else host memory."""
    if device.type == "cuda" and needed > share * torch.cuda.mem_get_info(device)[0]:
        return torch.device("cpu")
    return device


def train_from_boundary(model: nn.Module, boundary: Boundary, fill: Callable[[int], torch.Tensor],
                        entry: BoundaryEntry, settings: FitSettings, on_epoch: Callable[[EpochStats], None] = no_report,
                        channels_last: bool = False) -> list[EpochStats]:
    """The partly frozen path: train the part after the boundary on cached activations, epoch e on
    view e mod V (`fill(index)` gives part `index` of `entry`, computing it if need be), with the
    plain path's optimizer, schedule, batches and seed."""
    views = len(entry.parts) - 1
    with Replay(model.backbone, boundary) as replay:
        def part(index: int) -> torch.Tensor:
            if entry.parts[index] is None:
                with replay.suspended():  # computing a part runs the frozen stages for real
                    return fill(index)
            return fill(index)

        replayed = ReplayedModel(model, replay)
        trainee = Trainee(replayed, len(entry.labels),
                          feature_batches(_Views(part, views), entry.labels, settings.batch_size, settings.device,
                                          channels_last),
                          lambda: rows_accuracy(replayed, part(views), entry.val_labels, settings.device))
        return fit(trainee, settings, on_epoch, state_module=model)
