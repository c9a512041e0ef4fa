"""The trial trainer: fit one transfer configuration, reporting validation accuracy per epoch."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .data import ImageSet, eval_transform, train_transform
from .train_state import TrainState

EVAL_BATCH = 128


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the configuration diverged."""


@dataclass(frozen=True)
class TrialInputs:
    """How one trial sees the images: crop size, stored size and normalisation."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_accuracy: float
    lr: float
    seconds: float


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


def autocast_for(device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], bool]:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16


@torch.inference_mode()
def infer(model: nn.Module, images: ImageSet, inputs: TrialInputs, device: torch.device) -> torch.Tensor:
    """Class probabilities for every image, in order; the one path shared by validation and predict."""
    model.eval()
    autocast, _ = autocast_for(device)
    outputs = []
    for batch, _ in images.batches(EVAL_BATCH, shuffle=False, device=device):
        with autocast():
            logits = model(eval_transform(batch, inputs.image_size, inputs.mean, inputs.std))
        outputs.append(logits.float().softmax(dim=1))
    if not outputs:
        return torch.empty((0, 0))
    return torch.cat(outputs)


def accuracy(model: nn.Module, images: ImageSet, inputs: TrialInputs, device: torch.device) -> float:
    probs = infer(model, images, inputs, device)
    labels = images.labels.to(probs.device)
    correct = int((probs.argmax(dim=1) == labels).sum().item())
    return correct / max(len(labels), 1)


def train(model: nn.Module, train_set: ImageSet, val_set: ImageSet, inputs: TrialInputs, *,
          optimizer_name: str, lr: float, epochs: int, batch_size: int, device: torch.device, seed: int,
          on_epoch: Callable[[EpochStats], None] = lambda stats: None, accumulation: int = 1,
          resume: TrainState | None = None, on_checkpoint: Callable[[TrainState], None] | None = None,
          ) -> list[EpochStats]:
    """Train the trainable parameters with cosine-decayed `lr`; `on_epoch` may raise to stop (pruning).

    `accumulation` splits each batch into micro-batches (same effective batch, less memory);
    `resume` continues after its epoch; `on_checkpoint` gets the state after every epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    train_set, val_set = train_set.to(device), val_set.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(optimizer_name, trainable, lr)
    steps_per_epoch = max(1, len(train_set) // batch_size + (len(train_set) % batch_size >= 2))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=lr * 0.01)
    autocast, needs_scaler = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    loss_fn = nn.CrossEntropyLoss()
    history: list[EpochStats] = []
    if resume is not None:
        resume.restore(model, optimizer, schedule, scaler, generator)
        history = [EpochStats(**stats) for stats in resume.history]
    for epoch in range(len(history) + 1, epochs + 1):
        start = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for images, labels in train_set.batches(batch_size, shuffle=True, generator=generator, device=device):
            optimizer.zero_grad(set_to_none=True)
            for part, part_labels in micro_batches(images, labels, accumulation):
                batch = train_transform(part, inputs.image_size, inputs.mean, inputs.std, generator)
                with autocast():
                    loss = loss_fn(model(batch), part_labels)
                scaler.scale(loss * (len(part_labels) / len(labels))).backward()
                loss_sum += loss.detach().float() * len(part_labels)  # stays on the device: no sync per step
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            seen += len(labels)
        train_loss = float(loss_sum.item()) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite training loss at epoch {epoch} (lr {lr:.3g} too high?)")
        stats = EpochStats(epoch, train_loss, accuracy(model, val_set, inputs, device), epoch_lr,
                           time.perf_counter() - start)
        history.append(stats)
        if on_checkpoint is not None:
            on_checkpoint(TrainState.capture(epoch, model, optimizer, schedule, scaler, generator,
                                             [vars(s) for s in history]))
        on_epoch(stats)
    return history


def micro_batches(images: torch.Tensor, labels: torch.Tensor, parts: int):
    """Split one batch into `parts` micro-batches of at least two images each (BatchNorm needs two)."""
    parts = max(1, min(parts, len(labels) // 2))
    return zip(torch.tensor_split(images, parts), torch.tensor_split(labels, parts))
