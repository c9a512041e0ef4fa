"""`autotransfer pretrain`: the first phase of transfer learning, run on your own source data.

Trains a whole backbone with a linear head on a source dataset and writes a checkpoint folder
(`autotransfer.backbones.checkpoints`) that a later search uses as a backbone, so a team can build its
own in-house starting points offline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .backbones import WeightsRequest, provider_for, weights_label
from .backbones.checkpoints import Manifest, path_name, utc_now, write_checkpoint
from .config import PretrainConfig
from .errors import UserError
from .heads import HeadConfig
from .model import assemble
from .plugins import registries
from .devices import resolve_device
from .prepared import prepare_search
from .trainer import EpochStats, FitSettings, NonFiniteLoss, train


def pretrain(config: PretrainConfig, plugins: tuple[str, ...] = (), quiet: bool = False,
             data_cache: Path | None = None) -> Manifest:
    """Train `config.backbone` on `config.dataset`; write and return its checkpoint's manifest.
    `data_cache`: a decoded-image cache folder to read the images from (data/pixels.py)."""
    config.validate()
    found = registries(tuple(plugins))
    device = resolve_device(config.device)
    prepared = prepare_search(config.as_search(), found, device, Path(config.out),  # as a search reads its data
                              data_cache=data_cache)
    data, inputs, request = prepared.data, prepared.inputs_for(config.backbone), prepared.weights_for(config.backbone)
    backbone = provider_for(config.backbone, found).create(config.backbone, request)
    torch.manual_seed(config.seed)  # the head's init is part of what --seed fixes (the backbone's: init_seed)
    model = assemble(backbone, HeadConfig("linear"), data.num_classes, frozen_stages=0)
    say = (lambda message: None) if quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    say(f"pretraining {config.backbone} ({weights_label(request, backbone.source)}) on {data.name}: {len(data.train)} train / "
        f"{len(data.val)} val images, {data.num_classes} classes, {inputs.image_size} px, {device}")

    def on_epoch(stats: EpochStats) -> None:
        say(f"  epoch {stats.epoch}/{config.epochs}: loss {stats.train_loss:.4f} val_acc {stats.val_accuracy:.4f} "
            f"({stats.seconds:.1f}s)")

    train_set, val_set = data.train.at_size(inputs.resize_size), data.val.at_size(inputs.resize_size)
    try:
        settings = FitSettings(config.optimizer, config.lr, config.epochs, config.batch_size, device, config.seed)
        history = train(model, train_set, val_set, inputs, settings, on_epoch)
    except NonFiniteLoss as exc:
        raise UserError(f"pretraining diverged: {exc}; lower --lr") from None
    val_accuracy = history[-1].val_accuracy if len(data.val) else None
    manifest = Manifest(
        architecture=config.backbone, num_features=backbone.num_features, num_stages=len(backbone.stages),
        image_size=inputs.image_size, mean=list(inputs.mean), std=list(inputs.std),
        crop_pct=prepared.infos[config.backbone].preprocessing.crop_pct, source_dataset=config.dataset,
        source_classes=list(data.class_names),
        training=dict(init=backbone.source, epochs=config.epochs, lr=config.lr, optimizer=config.optimizer,
                      batch_size=config.batch_size, seed=config.seed, val_fraction=config.val_fraction,
                      train_images=len(data.train), val_images=len(data.val), device=str(device)),
        val_accuracy=val_accuracy, created=utc_now())
    model.to("cpu")
    write_checkpoint(Path(config.out), model.backbone, model.head, manifest)
    _check_round_trip(Path(config.out), found, model.backbone)
    return manifest


def _check_round_trip(folder: Path, found, trained: torch.nn.Module) -> None:
    """The folder must serve exactly the trained backbone through the provider a search will use."""
    name = path_name(folder)
    reloaded = provider_for(name, found).create(name, WeightsRequest(pretrained=True)).module.state_dict()
    for key, value in trained.state_dict().items():
        if not torch.equal(reloaded[key].cpu(), value.cpu()):
            raise RuntimeError(f"checkpoint {folder} does not reproduce the trained tensor {key}")
