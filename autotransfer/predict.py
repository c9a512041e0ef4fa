"""Predict with a saved model, through the same decode and crop as validation.

`label_images` is the one door from a loaded model to class probabilities: `autotransfer predict`
and the test score of a finished search both go through it, so the test accuracy a search reports
is what `predict` gives on those images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .data.decode import ImageRef, describe_ref, try_decode
from .data.images import ImageSet
from .errors import UserError
from .model import ModelCard, TransferModel, load_model
from .trainer import TrialInputs, infer

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
CHUNK = 1024


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{item}: no such file or folder; give image files or folders of images")
    if not files:
        raise UserError(f"no files found in {', '.join(inputs)}")
    return files


def label_images(model: TransferModel, card: ModelCard, images: ImageSet, device: torch.device) -> torch.Tensor:
    """Class probabilities (N, classes) on the host for images decoded at `card.decode_size`."""
    if images.decode_size != card.decode_size:
        raise ValueError(f"images decoded at {images.decode_size} px; this model reads {card.decode_size} px")
    inputs = TrialInputs(card.image_size, card.resize_size, tuple(card.mean), tuple(card.std))
    return infer(model, images.at_size(card.resize_size), inputs, device).cpu()


def decode_chunks(refs: Sequence[ImageRef], decode_size: int, labels: np.ndarray | None = None):
    """Yield (indices into refs, ImageSet) for the readable images, CHUNK at a time; unreadable ones are
    counted and reported once, after the last chunk."""
    skipped: list[str] = []
    for start in range(0, len(refs), CHUNK):
        decoded = [(i, try_decode(refs[i], decode_size)) for i in range(start, min(start + CHUNK, len(refs)))]
        good = [(i, t) for i, t in decoded if t is not None]
        skipped += [describe_ref(refs[i]) for i, t in decoded if t is None]
        if good:
            index = [i for i, _ in good]
            chunk_labels = torch.zeros(len(good), dtype=torch.long) if labels is None else torch.as_tensor(labels[index])
            yield index, ImageSet(chunk_labels, images=torch.stack([t for _, t in good]), decode_size=decode_size)
    if skipped:
        log.warning("skipped %d unreadable or non-image file(s): %s", len(skipped),
                    ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))


def predict(model_dir: Path, inputs: list[str], registries, device: torch.device) -> pd.DataFrame:
    model, card = load_model(model_dir, registries)
    model.to(device)
    files = collect_images(inputs)
    rows = []
    for index, images in decode_chunks(files, card.decode_size):
        confidence, label = label_images(model, card, images, device).max(dim=1)
        rows += [{"path": str(files[i]), "label": card.class_names[int(k)], "confidence": round(float(c), 6)}
                 for i, k, c in zip(index, label, confidence)]
    import pandas as pd  # here: a search imports this module, and pandas only for its end

    return pd.DataFrame(rows, columns=["path", "label", "confidence"])


@dataclass(frozen=True)
class SplitScore:
    """A saved model's accuracy on a split no choice saw."""

    trial: int | None
    accuracy: float
    images: int

    def to_dict(self) -> dict:
        return {"trial": self.trial, "test_accuracy": self.accuracy, "test_images": self.images}


def score_model(model_dir: Path, registries, device: torch.device, *, images: ImageSet | None = None,
                refs: Sequence[ImageRef] | None = None, labels: np.ndarray | None = None) -> SplitScore:
    """Accuracy of the saved model in `model_dir` through the predict path: on `images` already decoded
    at the model's decode size, or else on `refs` decoded here exactly as `predict` decodes files."""
    model, card = load_model(model_dir, registries)
    model.to(device)
    correct = total = 0
    if images is not None and images.decode_size == card.decode_size:
        parts = [images]
    else:
        if refs is None or labels is None:
            raise ValueError("score_model needs decoded images at the model's size, or refs and labels")
        parts = [chunk for _, chunk in decode_chunks(refs, card.decode_size, np.asarray(labels))]
    for part in parts:
        predicted = label_images(model, card, part, device).argmax(dim=1)
        correct += int((predicted == part.labels.cpu()).sum())
        total += len(part)
    if total == 0:
        raise UserError(f"no readable test images to score {model_dir} on")
    return SplitScore(card.trial, correct / total, total)
