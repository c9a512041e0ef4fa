"""The trial trainer: fit one transfer configuration, reporting validation accuracy per epoch."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .data import ImageSet, batch_order, eval_transform, train_transform
from .devices import autocast_for, eval_batch, memory_format, to_device, wants_channels_last
from .train_state import TrainState

log = logging.getLogger(__name__)


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
    seconds: float  # the whole epoch: training pass and validation
    train_seconds: float = 0.0  # the training pass alone, up to its one synchronisation at the epoch's end
    probe_c: float | None = None  # a probe's one "epoch": the L2 strength its fit used


@dataclass(frozen=True)
class FitSettings:
    """How a trial is fitted, whichever path it takes: the one settings object every training
    function takes (`fit`, `train`, `train_on_features`, `cache.plan.train_from_boundary`)."""

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
    probe: bool = False  # fully frozen linear head: fit it to convergence (probe.py), not for `epochs`
    probe_c: float | None = None  # the probe's L2 strength; None: chosen by cross-validation on train
    label_smoothing: float = 0.0  # of the cross-entropy every trained head minimises


def no_report(stats: EpochStats) -> None:
    """The default `on_epoch`: nothing to report to, nothing to stop."""


Batches = Callable[[int, torch.Generator], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class Trainee:
    """What one trial trains, whichever path it takes (images, cached features, cached activations).

    `module` is called on each training batch and its parameters that require gradients are
    trained; `batches(epoch_index, generator)` yields (inputs, labels) on the device, ready for
    `module`; `evaluate()` returns the validation accuracy.
    """

    module: nn.Module
    size: int
    batches: Batches
    evaluate: Callable[[], float]


FUSED_DEVICES = frozenset({"cpu", "cuda"})


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The named optimizer; Adam, AdamW and SGD run fused (one kernel over all tensors) where torch
    has the kernel. The default loops over parameters one op at a time: on the 2-core CPU, a
    resnet18 Adam step took 38 ms that way and 7.5 ms fused (same values within 4e-7 after 15
    steps). RMSprop has no fused kernel; its default loop was faster than `foreach` on that CPU."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.05, fused=fused or None)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)
    raise ValueError(f"unknown optimizer {name!r}")


@torch.inference_mode()
def infer(model: nn.Module, images: ImageSet, inputs: TrialInputs, device: torch.device,
          channels_last: bool = False) -> torch.Tensor:
    """Class probabilities for every image, in order; the one path shared by validation and predict."""
    model.eval()
    autocast, _ = autocast_for(device)
    outputs = []
    for batch, _ in images.batches(eval_batch(device), shuffle=False, device=device):
        with autocast():
            logits = model(memory_format(eval_transform(batch, inputs.image_size, inputs.mean, inputs.std),
                                         channels_last))
        outputs.append(logits.float().softmax(dim=1))
    if not outputs:
        return torch.empty((0, 0))
    return torch.cat(outputs)


def accuracy(model: nn.Module, images: ImageSet, inputs: TrialInputs, device: torch.device,
             channels_last: bool = False) -> float:
    probs = infer(model, images, inputs, device, channels_last)
    labels = images.labels.to(probs.device)
    correct = int((probs.argmax(dim=1) == labels).sum().item())
    return correct / max(len(labels), 1)


def compiled(module: nn.Module, device: torch.device) -> tuple[Callable[..., torch.Tensor], str]:
    """torch.compile'd `module`, or the module itself with the reason when no compiler can serve.
    Compilation happens at the first call; if that fails, training goes on eagerly with a warning."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(cc) for cc in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if cc):
        return module, "compile skipped: no C++ compiler for torch.compile on CPU (install g++ or drop --compile)"
    try:
        return _EagerFallback(module, torch.compile(module)), "compiled"
    except Exception as exc:  # e.g. an unsupported Python version for dynamo
        return module, f"compile skipped: {type(exc).__name__}: {exc}"


class _EagerFallback:
    """Calls the compiled module; if its first call fails to compile, the eager module from then on."""

    def __init__(self, module: nn.Module, compiled_module: Callable[..., torch.Tensor]):
        self.module, self.compiled, self.proven = module, compiled_module, False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.module(*args)
        try:
            out = self.compiled(*args)
        except Exception as exc:
            if self.proven:
                raise
            log.warning("torch.compile failed (%s: %s); training eagerly", type(exc).__name__, str(exc)[:200])
            self.compiled = None
            return self.module(*args)
        self.proven = True
        return out


def train(model: nn.Module, train_set: ImageSet, val_set: ImageSet, inputs: TrialInputs, settings: FitSettings,
          on_epoch: Callable[[EpochStats], None] = no_report, *, augment: bool = True,
          channels_last: bool | None = None) -> list[EpochStats]:
    """The plain path: every epoch runs the whole model on (augmented, unless `augment` is off)
    image batches. Cosine-decayed `settings.lr`; `on_epoch` may raise to stop (pruning); the
    rest of `settings` as in `fit`."""
    device = settings.device
    model.to(device)
    layout = wants_channels_last(model, device) if channels_last is None else channels_last
    if layout:
        model.to(memory_format=torch.channels_last)
    train_set, val_set = resident(train_set, device), resident(val_set, device)
    trainee = Trainee(model, len(train_set),
                      image_batches(train_set, inputs, settings.batch_size, device, augment, layout),
                      lambda: accuracy(model, val_set, inputs, device, layout))
    return fit(trainee, settings, on_epoch)


def resident(images: ImageSet, device: torch.device, share: float = 0.5) -> ImageSet:
    """The images on the training device when they fit in `share` of its free memory; otherwise they
    stay in host memory and each batch is copied over through pinned memory."""
    if device.type == "cuda" and images.in_memory and images.images.device.type == "cpu":
        free, _ = torch.cuda.mem_get_info(device)
        if images.images.numel() > share * free:
            return images
    return images.to(device)


def image_batches(train_set: ImageSet, inputs: TrialInputs, batch_size: int, device: torch.device, augment: bool,
                  channels_last: bool) -> Batches:
    def batches(epoch: int, generator: torch.Generator):
        for images, labels in train_set.batches(batch_size, shuffle=True, generator=generator, device=device):
            if augment:
                batch = train_transform(images, inputs.image_size, inputs.mean, inputs.std, generator)
            else:
                batch = eval_transform(images, inputs.image_size, inputs.mean, inputs.std)
            yield memory_format(batch, channels_last), labels
    return batches


def fit(trainee: Trainee, settings: FitSettings, on_epoch: Callable[[EpochStats], None] = no_report,
        state_module: nn.Module | None = None) -> list[EpochStats]:
    """The training loop every path shares: optimizer, cosine schedule, mixed precision on CUDA,
    the loss summed on the device (one synchronisation per epoch), validation after each epoch.

    `settings.accumulation` splits each batch from `trainee.batches` into micro-batches (same
    effective batch and schedule, less memory); `settings.resume` continues after its last epoch;
    `settings.on_checkpoint` gets the state after every epoch. Checkpoints hold the tensors of
    `state_module` (default `trainee.module`): the paths pass the whole TransferModel, so a
    checkpoint written on one path (features, boundary, plain) restores on any other, e.g. a retry
    on a machine that planned differently."""
    lr, epochs, batch_size, device, seed = (settings.lr, settings.epochs, settings.batch_size, settings.device,
                                            settings.seed)
    accumulation, resume, on_checkpoint = settings.accumulation, settings.resume, settings.on_checkpoint
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    trainable = [p for p in trainee.module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(settings.optimizer_name, trainable, lr)
    steps_per_epoch = max(1, trainee.size // batch_size + (trainee.size % batch_size >= 2))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch, eta_min=lr * 0.01)
    autocast, needs_scaler = autocast_for(device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    forward: Callable[..., torch.Tensor] = trainee.module
    if settings.compile:
        forward, note = compiled(trainee.module, device)
        if forward is trainee.module:
            log.warning("%s", note)
    state_module = trainee.module if state_module is None else state_module
    history: list[EpochStats] = []
    if resume is not None:
        resume.restore(state_module, optimizer, schedule, scaler, generator)
        history = [EpochStats(**stats) for stats in resume.history]
    for epoch in range(len(history) + 1, epochs + 1):
        start = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        trainee.module.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for batch, labels in trainee.batches(epoch - 1, generator):
            optimizer.zero_grad(set_to_none=True)
            for part, part_labels in micro_batches(batch, labels, accumulation):
                with autocast():
                    loss = loss_fn(forward(part), part_labels)
                share = len(part_labels) / len(labels)  # 1 unless accumulating: then no extra op
                scaler.scale(loss if share == 1 else loss * share).backward()
                loss_sum += loss.detach().float() * len(part_labels)  # stays on the device: no sync per step
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            seen += len(labels)
        train_loss = float(loss_sum.item()) / max(seen, 1)
        train_seconds = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite training loss at epoch {epoch} (lr {lr:.3g} too high?)")
        stats = EpochStats(epoch, train_loss, trainee.evaluate(), epoch_lr, time.perf_counter() - start, train_seconds)
        history.append(stats)
        if on_checkpoint is not None:
            on_checkpoint(TrainState.capture(epoch, state_module, optimizer, schedule, scaler, generator,
                                             [vars(s) for s in history]))
        on_epoch(stats)
    return history


def micro_batches(images: torch.Tensor, labels: torch.Tensor, parts: int):
    """Split one batch into `parts` micro-batches of at least two images each (BatchNorm needs two)."""
    parts = max(1, min(parts, len(labels) // 2))
    return zip(torch.tensor_split(images, parts), torch.tensor_split(labels, parts))


def feature_batches(rows: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int,
                    device: torch.device, channels_last: bool = False) -> Batches:
    """Shuffled batches of precomputed rows (pooled features or boundary activations); with several
    views of the rows, epoch e reads view e mod V, and only then (a lazy sequence computes a view
    when first read). `labels` live on the rows' device."""
    views = [rows] if isinstance(rows, torch.Tensor) else rows

    def batches(epoch: int, generator: torch.Generator):
        source = views[epoch % len(views)]
        for index in batch_order(len(labels), batch_size, shuffle=True, generator=generator, device=source.device):
            yield memory_format(to_device(source[index], device), channels_last), to_device(labels[index], device)
    return batches


@torch.inference_mode()
def rows_accuracy(module: nn.Module, rows: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Validation accuracy of `module` on precomputed rows, counted on the device, read once."""
    module.eval()
    autocast, _ = autocast_for(device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    step = eval_batch(device)
    for start in range(0, len(labels), step):
        with autocast():
            logits = module(to_device(rows[start:start + step], device))
        correct += (logits.argmax(dim=1) == to_device(labels[start:start + step], device)).sum()
    return int(correct.item()) / max(len(labels), 1)


def train_on_features(model: nn.Module, train_features: torch.Tensor, train_labels: torch.Tensor,
                      val_features: torch.Tensor, val_labels: torch.Tensor, settings: FitSettings,
                      on_epoch: Callable[[EpochStats], None] = no_report) -> list[EpochStats]:
    """The fully frozen path: train `model.head` on cached pooled features (clean centre crops, no
    augmentation) with the plain path's optimizer, schedule, batches and seed. The backbone is
    not run; `model` stays whole, so it can be saved and used for prediction as it is."""
    device = settings.device
    head = model.head.to(device)
    train_features, val_features = to_device(train_features.float(), device), to_device(val_features.float(), device)
    train_labels = to_device(train_labels, device)
    trainee = Trainee(head, len(train_labels), feature_batches(train_features, train_labels, settings.batch_size, device),
                      lambda: rows_accuracy(head, val_features, val_labels, device))
    return fit(trainee, settings, on_epoch, state_module=model)


def probe_on_features(model: nn.Module, train_features: torch.Tensor, train_labels: torch.Tensor,
                      val_features: torch.Tensor, val_labels: torch.Tensor, settings: FitSettings,
                      on_epoch: Callable[[EpochStats], None] = lambda stats: None) -> list[EpochStats]:
    """The fully frozen path with a linear head: the head is the converged logistic-regression probe of
    `probe.fit_probe` (at C `settings.probe_c`, or C by CV on train alone when that is None), one step
    instead of `epochs` passes of a sampled optimizer; of the settings it reads only seed, device and
    probe_c."""
    from .probe import PROBE_CS, fit_probe

    start = time.perf_counter()
    head, device, c = model.head, settings.device, settings.probe_c
    fitted = fit_probe(train_features.numpy(), train_labels.numpy(), head.out_features, settings.seed,
                       PROBE_CS if c is None else (c,))
    fitted.load_into(head)
    head.to(device)
    with torch.no_grad():
        logits = head(to_device(train_features.float(), device))
        loss = float(nn.functional.cross_entropy(logits, to_device(train_labels, device)))
    accuracy = rows_accuracy(head, val_features.float(), val_labels, device)
    stats = EpochStats(1, loss, accuracy, 0.0, time.perf_counter() - start, fitted.seconds, fitted.c)
    on_epoch(stats)
    return [stats]
