"""Which way a trial trains, and the caches that make frozen stages run once instead of every epoch.

- fully frozen backbone (`features`): pooled features of the clean centre crops, through the
  on-disk feature cache (the one `rank` and `--prerank` fill), train the head alone;
- partly frozen backbone (`boundary`): the activations at the freeze boundary for `views`
  augmented views of every training image (and the clean validation images), computed once and
  kept in memory; epoch e trains the trainable part on view e mod `views`;
- otherwise, with caching off (`--no-cache`), or when the boundary cache would exceed its memory
  budget or the model cannot be replayed (`plain`): the whole model on augmented images every epoch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch import nn

from .boundary import CHECK_BATCH, Boundary, NoBoundary, Replay, ReplayedModel, capture, verified_boundary
from .data import ImageSet, eval_transform, train_transform
from .features import FeatureCache, extract, fingerprint, images_digest, tensors_digest
from .train_state import TrainState
from .trainer import (EVAL_BATCH, EpochStats, Trainee, TrialInputs, autocast_for, feature_batches, fit, memory_format,
                      rows_accuracy, train, train_on_features, wants_channels_last)

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


@dataclass(frozen=True)
class FitSettings:
    """How a trial trains, whichever path it takes."""

    optimizer_name: str
    lr: float
    epochs: int
    batch_size: int
    device: torch.device
    seed: int
    compile: bool = False
    accumulation: int = 1  # micro-batches per batch (the out-of-memory retry uses 2)
    resume: TrainState | None = None  # continue after this checkpoint's epoch
    on_checkpoint: Callable[[TrainState], None] | None = None  # gets the state after every epoch

    def kwargs(self) -> dict:
        return {"optimizer_name": self.optimizer_name, "lr": self.lr, "epochs": self.epochs,
                "batch_size": self.batch_size, "device": self.device, "seed": self.seed, "compile": self.compile,
                "accumulation": self.accumulation, "resume": self.resume, "on_checkpoint": self.on_checkpoint}


@dataclass
class TrialPath:
    """The chosen path: `mode` and `note` go into the trial's record; `run(on_epoch, **changes)`
    trains, with `changes` to the planned FitSettings (accumulation, resume, on_checkpoint; the
    out-of-memory retry and resume use them on every path)."""

    mode: str  # "features", "boundary" or "plain"
    train: Callable[[Callable[[EpochStats], None], FitSettings], list[EpochStats]]
    settings: FitSettings
    note: str = ""

    def run(self, on_epoch: Callable[[EpochStats], None], **changes) -> list[EpochStats]:
        return self.train(on_epoch, replace(self.settings, **changes))


@dataclass
class BoundaryData:
    views: list[torch.Tensor]  # per view: (N, *boundary shape), training images in order
    labels: torch.Tensor
    val: torch.Tensor  # clean validation images' activations
    val_labels: torch.Tensor
    seconds: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.views, self.val))


@dataclass
class TrialCaches:
    """One search process's caches: the disk feature cache, digests already computed, and the
    latest boundary activations (one entry, within the budget) for the next trial that fits them."""

    policy: CachePolicy
    _digests: dict[Hashable, tuple[object, str]] = field(default_factory=dict)
    _boundary_key: Hashable | None = None
    _boundary: BoundaryData | None = None

    def plan(self, model: nn.Module, identity: Hashable, train_set: ImageSet, val_set: ImageSet,
             inputs: TrialInputs, frozen_stages: int, num_stages: int, settings: FitSettings) -> TrialPath:
        """Pick the path for a TransferModel with `frozen_stages` of `num_stages` frozen; `identity`
        names its backbone weights (same identity, same frozen tensors)."""
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
                  device: torch.device):
        weights = self._digest(("weights", identity), None, lambda: tensors_digest(model.backbone))
        pixels = self._digest(("images", id(images)), images, lambda: images_digest(images))
        cache = FeatureCache(self.policy.folder) if self.policy.folder is not None else None
        return extract(model.backbone, None, images, inputs, device, cache, key=fingerprint(weights, pixels, inputs),
                       meta={"backbone": str(identity)})

    def _features_path(self, model, identity, train_set, val_set, inputs, settings) -> TrialPath:
        model.to(settings.device)
        train_found = self._features(model, identity, train_set, inputs, settings.device)
        val_found = self._features(model, identity, val_set, inputs, settings.device)
        note = f"features: train {_origin(train_found)}, val {_origin(val_found)}"

        def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
            return train_on_features(model, torch.from_numpy(train_found.features), train_set.labels,
                                     torch.from_numpy(val_found.features), val_set.labels, on_epoch=on_epoch,
                                     **settings.kwargs())
        return TrialPath("features", run, settings, note)

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
        dtype = store_dtype(device)
        needed = (len(train_set) * views + len(val_set)) * boundary.bytes_per_example(dtype)
        if needed > self.policy.memory:
            raise NoBoundary(f"boundary cache {format_bytes(needed)} > --cache-memory {format_bytes(self.policy.memory)}")
        key = (identity, boundary.name, inputs, views, self.policy.seed, id(train_set), id(val_set), str(device), layout)
        reused = key == self._boundary_key and self._boundary is not None
        if not reused:
            self._boundary_key, self._boundary = None, None  # free the old entry before building the next
            data = build_boundary_data(model.backbone, boundary, train_set, val_set, inputs, views=views,
                                       seed=self.policy.seed, device=device, channels_last=layout, needed=needed)
            self._boundary_key, self._boundary = key, data
        data = self._boundary
        note = (f"{views} view(s) at {boundary.name}, {format_bytes(data.nbytes)}, "
                + ("reused" if reused else f"built in {data.seconds:.1f} s"))
        if settings.compile:
            note += "; compile skipped on the boundary path"

        def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
            return train_from_boundary(model, boundary, data, on_epoch=on_epoch, channels_last=layout,
                                       **{**settings.kwargs(), "compile": False})
        return TrialPath("boundary", run, settings, note)


def _origin(found) -> str:
    return "from the cache" if found.cached else f"extracted in {found.seconds:.1f} s"


def plain_path(model: nn.Module, train_set: ImageSet, val_set: ImageSet, inputs: TrialInputs, settings: FitSettings,
               note: str = "") -> TrialPath:
    def run(on_epoch: Callable[[EpochStats], None], settings: FitSettings) -> list[EpochStats]:
        return train(model, train_set, val_set, inputs, on_epoch=on_epoch, **settings.kwargs())
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


def build_boundary_data(backbone: nn.Module, boundary: Boundary, train_set: ImageSet, val_set: ImageSet,
                        inputs: TrialInputs, *, views: int, seed: int, device: torch.device, channels_last: bool,
                        needed: int) -> BoundaryData:
    """Boundary activations of `views` augmented views of every training image and of the clean
    validation images; the frozen stages run in eval mode, so each is fixed given its input."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    target = _store_device(device, needed)

    def activations(images: ImageSet, augment: bool) -> torch.Tensor:
        rows = torch.empty((len(images), *boundary.shape), dtype=store_dtype(device), device=target)
        if channels_last and rows.dim() == 4:
            rows = rows.contiguous(memory_format=torch.channels_last)
        autocast, _ = autocast_for(device)
        offset = 0
        for batch, _ in images.batches(EVAL_BATCH, shuffle=False, device=device):
            if augment:
                batch = train_transform(batch, inputs.image_size, inputs.mean, inputs.std, generator)
            else:
                batch = eval_transform(batch, inputs.image_size, inputs.mean, inputs.std)
            with autocast():
                found = capture(backbone, boundary, memory_format(batch, channels_last))
            rows[offset:offset + len(found)].copy_(found)  # into host memory, a blocking copy: complete when read
            offset += len(found)
        return rows

    train_views = [activations(train_set, augment=True) for _ in range(views)]
    val = activations(val_set, augment=False)
    return BoundaryData(train_views, train_set.labels.to(target), val, val_set.labels.to(target),
                        time.perf_counter() - start)


def train_from_boundary(model: nn.Module, boundary: Boundary, data: BoundaryData, *, optimizer_name: str, lr: float,
                        epochs: int, batch_size: int, device: torch.device, seed: int,
                        on_epoch: Callable[[EpochStats], None] = lambda stats: None, compile: bool = False,
                        channels_last: bool = False, accumulation: int = 1, resume: TrainState | None = None,
                        on_checkpoint: Callable[[TrainState], None] | None = None) -> list[EpochStats]:
    """The partly frozen path: train the part after the boundary on cached activations, epoch e on
    view e mod V, with the plain path's optimizer, schedule, batches and seed."""
    with Replay(model.backbone, boundary) as replay:
        replayed = ReplayedModel(model, replay)
        trainee = Trainee(replayed, len(data.labels),
                          feature_batches(data.views, data.labels, batch_size, device, channels_last),
                          lambda: rows_accuracy(replayed, data.val, data.val_labels, device))
        return fit(trainee, optimizer_name=optimizer_name, lr=lr, epochs=epochs, batch_size=batch_size,
                   device=device, seed=seed, on_epoch=on_epoch, compile=compile, accumulation=accumulation,
                   resume=resume, on_checkpoint=on_checkpoint, state_module=model)
