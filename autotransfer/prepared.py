"""A search's inputs, checked and loaded once: what the driver, `rank`, `pretrain` and the benchmark share.

`prepare_search` does everything that can fail on bad input before any trial runs (the dataset, every
backbone's description and weights, the crop sizes, the memory floor) and returns a `Prepared`: the
configuration, the device, the registries, the backbones' facts, the decoded images and, per backbone,
how trials see them (`inputs_for`) and where their weights come from (`weights_for`).

Invariant: a `Prepared` is data handed down; nothing in it calls back into the driver that made it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backbones import BackboneInfo, WeightsRequest, provider_for, weights_request
from .backbones.weights import ways_out
from .config import CPU_IMAGE_SIZE_CAP, RANDOM_WEIGHTS, SearchConfig
from .data import ImageRef, LabelledRefs, PixelCache, PreparedData, load_dataset, native_size, prepare
from .devices import available_memory
from .errors import UserError, WeightsUnavailable
from .plugins import Registries
from .trainer import TrialInputs


@dataclass
class Prepared:
    """A search's checked inputs (see the module docstring). `data` is None once released (a parent that
    only supervises worker processes gives its copy back); `test_refs` is the test split, undecoded."""

    config: SearchConfig
    device: torch.device
    registries: Registries
    out: Path
    infos: dict[str, BackboneInfo]
    data: PreparedData | None
    native_size: int
    sources: dict[str, str] = field(default_factory=dict)  # where each backbone's weights came from
    test_refs: tuple[list[ImageRef], np.ndarray | None] = ((), None)

    def inputs_for(self, backbone: str) -> TrialInputs:
        """How `backbone`'s trials see the images (crop, stored size, normalisation) in this search."""
        return trial_inputs(self.infos[backbone], self.config.image_size, self.device, self.native_size)

    def weights_for(self, backbone: str) -> WeightsRequest:
        return weights_request(self.config, backbone)

    def header(self) -> str:
        """One line before trial 0: the data, the candidates and the budget."""
        data, config = self.data, self.config
        test = f" / {len(self.test_refs[0])} test" if len(self.test_refs[0]) else ""
        crops = sorted({self.inputs_for(name).image_size for name in self.infos})
        budget = " and ".join(part for part in (f"{config.trials} trials" if config.trials else "",
                                                f"{config.timeout:g}s" if config.timeout else "") if part) or "no limit"
        return (f"{data.name}: {len(data.train)} train / {len(data.val)} val{test} images, {data.num_classes} classes; "
                f"{len(self.infos)} backbone(s) at {'/'.join(map(str, crops))} px; {budget} of up to {config.epochs} "
                f"epoch(s) on {self.device.type}")

    def release_data(self) -> None:
        self.data = None


def prepare_search(config: SearchConfig, registries: Registries, device: torch.device, out: Path,
                   memory_budget: int | None = None, say: Callable[[str], None] = lambda message: None,
                   data_cache: Path | None = None) -> Prepared:
    """Check and load everything a search needs, in the order that fails fastest on bad input; `say`
    gets a line as each slow step (weights, decoding) starts, so a run is never silent. `data_cache`:
    the folder of the decoded-image cache (data/pixels.py), None to decode in this process only."""
    if config.prerank is not None:
        registries.scorer(config.prerank)  # a typo fails before anything is stored
    infos = {name: provider_for(name, registries).describe(name) for name in config.backbones}
    for name, path in config.weights.items():
        if path != RANDOM_WEIGHTS:
            check_checkpoint_architecture(name, path)
    refs = load_source(config, registries)
    native = native_size([r for i, r in enumerate(refs.refs)  # test images choose nothing, not even this
                          if refs.splits is None or refs.splits[i] != "test"])
    prepared = Prepared(config, device, registries, Path(out), infos, None, native, test_refs=refs.split_refs("test"))
    load_weights(prepared, say)
    decode_size = max(prepared.inputs_for(name).resize_size for name in infos)
    check_memory(len(refs.refs), decode_size, max(prepared.inputs_for(name).image_size for name in infos),
                 config.batch_size, available_memory())
    started = time.perf_counter()
    prepared.data = prepare(refs, decode_size, val_fraction=config.val_fraction, seed=config.seed,
                            memory_budget=memory_budget, say=say,
                            cache=None if data_cache is None else PixelCache(Path(data_cache)))
    say(f"images ready in {time.perf_counter() - started:.1f}s")
    return prepared


def load_weights(prepared: Prepared, say: Callable[[str], None] = lambda message: None) -> None:
    """Read every backbone's weights once, before any image is decoded; when some cannot be had, one
    error lists every one of them (a line each), not only the first."""
    missing: list[WeightsUnavailable] = []
    for name in prepared.config.backbones:
        say(f"loading {name} ({prepared.weights_for(name).label})")
        try:
            backbone = provider_for(name, prepared.registries).create(name, prepared.weights_for(name))
        except WeightsUnavailable as exc:
            missing.append(exc)
            continue
        prepared.sources[name] = backbone.source
        if prepared.inputs_for(name).image_size < PROBE_BELOW_PX:
            check_takes_size(name, backbone.module, prepared.inputs_for(name).image_size)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        lines = [str(exc).split("; ways out:")[0] for exc in missing]
        ways = ways_out("NAME") if any("; ways out:" in str(exc) for exc in missing) else ""
        raise WeightsUnavailable(f"weights for {len(missing)} of {len(prepared.config.backbones)} backbones cannot be "
                                 "had:\n  " + "\n  ".join(lines) + (f"\n{ways}" if ways else ""))


def trial_inputs(info: BackboneInfo, image_size: int | None, device: torch.device, native_size: int) -> TrialInputs:
    """Crop size: --image-size, else the backbone's pretrained size, capped on CPU and at 4x the
    images' own size (an 8 px digit gains nothing from 224 px); fixed-size models keep theirs."""
    pre = info.preprocessing
    if info.fixed_input_size:
        size = pre.input_size
    elif image_size:
        size = image_size
    else:
        cap = CPU_IMAGE_SIZE_CAP if device.type == "cpu" else pre.input_size
        size = max(32, min(pre.input_size, cap, 4 * native_size))
    return TrialInputs(size, int(math.ceil(size / pre.crop_pct)), pre.mean, pre.std)


PROBE_BELOW_PX = 64  # crops this small are tried through the backbone once (cheap) before any trial


def check_takes_size(name: str, module: torch.nn.Module, size: int) -> None:
    """One forward pass of a blank image: a crop too small for the backbone's pooling or strides is a
    one-line error before the study starts, not a failed trial."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"backbone {name!r} cannot take {size} px crops ({detail}); give a larger --image-size")
    finally:
        module.train(was_training)


def check_memory(images: int, decode_size: int, crop: int, batch_size: int, available: int) -> None:
    """Refuse, before decoding, what cannot fit even at its floor: one decoded image (uint8 at the decode
    size) plus one float32 input batch at the crop size. Activations come on top, so this is a lower bound:
    it stops a crop size that would have the kernel's OOM killer end processes, not every tight fit."""
    one_image = 3 * decode_size * decode_size
    batch = min(batch_size, images) * 3 * crop * crop * 4
    floor = one_image + batch
    if floor > available:
        raise UserError(f"{crop} px crops (decoded at {decode_size} px) need at least {floor / 2**30:.1f} GiB for "
                        f"one image and one batch of {min(batch_size, images)}, before activations; "
                        f"{available / 2**30:.1f} GiB is available; lower --image-size or --batch-size")


def load_source(config: SearchConfig, registries) -> LabelledRefs:
    """The dataset as its source gives it, with --val-as-test applied: the splits every command sees."""
    refs = load_dataset(registries.dataset_source(config.dataset), config.dataset)
    return refs.with_val_as_test() if config.val_as_test else refs


def check_checkpoint_architecture(name: str, path: str) -> None:
    """`--weights NAME=DIR` with a checkpoint of another architecture: say so before loading tensors."""
    from .backbones.checkpoints import is_checkpoint, locate, read_manifest

    if is_checkpoint(path) and locate(name) is None:
        architecture = read_manifest(path).architecture
        if architecture != name:
            raise UserError(f"--weights {name}={path}: that checkpoint holds a {architecture!r} backbone, not {name!r}; "
                            f"use --weights {architecture}={path} or --backbones {path}")
