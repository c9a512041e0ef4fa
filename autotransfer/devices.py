"""Device helpers, in one place: which device a run uses, and how tensors and models meet it (mixed
precision on CUDA, channels_last for CNNs, asynchronous host-to-GPU copies, giving GPU memory back).

Invariant: every device decision that differs between CPU and CUDA is made here, so the training,
caching and scoring paths ask the same questions and get the same answers.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for a GPU but CUDA sees none; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def available_memory() -> int:
    """Bytes this process can still take: MemAvailable (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def eval_batch(device: torch.device) -> int:
    """The batch of passes without gradients (validation, feature and activation caches): large on
    a GPU; small on a CPU, whose caches then hold the activations (measured: benchmarks/README.md,
    "Defaults measured ad hoc")."""
    return 128 if device.type == "cuda" else 32


def autocast_for(device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], bool]:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16


def memory_format(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch


def is_cnn(model: nn.Module) -> bool:
    """Convolutions beyond a patch-embedding stem: the layout channels_last speeds up."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last for CNNs, on any device: CUDA convolutions want NHWC, and on CPU (oneDNN) it was
    faster for the nets measured, most for depthwise ones (benchmarks/README.md, "Defaults measured ad
    hoc"); `train(channels_last=False)` turns it off."""
    return is_cnn(model)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without making the host wait: host tensors bound for CUDA go through pinned
    memory so the copy is asynchronous (a pageable copy would synchronise the stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
