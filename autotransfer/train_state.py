"""A trial's training state after an epoch, so a retried or re-run trial resumes where it stopped.

Only what training changes is kept: the trainable parameters and every buffer (frozen weights
come back from the backbone's own weights), the optimizer, the learning-rate schedule, the loss
scaler, the random streams and the finished epochs' statistics.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    generator: torch.Tensor
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    history: list[dict[str, Any]]

    @classmethod
    def capture(cls, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, generator: torch.Generator, history: list[dict[str, Any]]) -> "TrainState":
        return cls(epoch=epoch, model=trained_tensors(model), optimizer=optimizer.state_dict(),
                   scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), generator=generator.get_state(),
                   rng=torch.get_rng_state(),
                   cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                   history=list(history))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, generator: torch.Generator) -> None:
        load_trained_tensors(model, self.model)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        scaler.load_state_dict(self.scaler)
        generator.set_state(self.generator)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None and torch.cuda.is_available() and len(self.cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def save(self, path: Path) -> None:
        """Write beside the target, then rename: a kill mid-write leaves the previous epoch's file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        os.close(handle)
        try:
            torch.save({f.name: getattr(self, f.name) for f in fields(self)}, temp)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "TrainState":
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers (BatchNorm statistics): what an epoch can change."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(dict(model.named_buffers()))
    return tensors


def load_trained_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    wanted = set(trained_tensors(model))
    if unexpected or wanted & set(missing):
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(wanted & set(missing))[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
