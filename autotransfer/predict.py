"""Predict with a saved model, through the same decode and crop as validation."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from .data import ImageSet, _try_decode
from .errors import UserError
from .model import load_model
from .trainer import TrialInputs, infer

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


def predict(model_dir: Path, inputs: list[str], registries, device: torch.device) -> pd.DataFrame:
    model, card = load_model(model_dir, registries)
    model.to(device)
    trial_inputs = TrialInputs(card.image_size, card.resize_size, tuple(card.mean), tuple(card.std))
    rows, skipped = [], []
    files = collect_images(inputs)
    for start in range(0, len(files), CHUNK):
        chunk = files[start:start + CHUNK]
        decoded = [_try_decode(f, card.decode_size) for f in chunk]
        good = [(f, t) for f, t in zip(chunk, decoded) if t is not None]
        skipped += [str(f) for f, t in zip(chunk, decoded) if t is None]
        if not good:
            continue
        images = ImageSet(torch.zeros(len(good), dtype=torch.long), images=torch.stack([t for _, t in good]),
                          decode_size=card.decode_size).at_size(card.resize_size)
        probs = infer(model, images, trial_inputs, device).cpu()
        confidence, index = probs.max(dim=1)
        rows += [{"path": str(f), "label": card.class_names[int(i)], "confidence": round(float(c), 6)}
                 for (f, _), i, c in zip(good, index, confidence)]
    if skipped:
        log.warning("skipped %d unreadable or non-image file(s): %s", len(skipped),
                    ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))
    return pd.DataFrame(rows, columns=["path", "label", "confidence"])
