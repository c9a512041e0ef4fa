"""Export a saved model for serving (`autotransfer export`): ONNX or TorchScript, checked before it is kept.

The exported graph's contract, written beside it as `<file>.json`: input `images`, float32
N x 3 x image_size x image_size, RGB in [0, 1], prepared as `predict` prepares files (decode to
RGB; resize the short side to decode_size and centre-crop a square; resize that square to
resize_size, antialiased bilinear; centre-crop image_size); the normalisation (mean, std) is inside
the graph; output `probabilities`, N x classes (softmax), in `class_names` order; the batch axis is
dynamic. `prepare_images` is exactly that path, so a server in Python can reuse it.

Invariant: an export is written to a temporary name, loaded back with its own runtime (onnxruntime,
torch.jit.load) and compared with the PyTorch model on a batch of inputs; only if every probability
agrees within `TOLERANCE` does it take its final name. A file that disagrees is never left behind.
Everything that can be refused cheaply (format, missing packages, the --model folder, an unwritable
--output) is refused, in one line, before the export runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data.decode import ImageRef
from .errors import UserError
from .model import ModelCard, TransferModel, load_model

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT, OUTPUT = "images", "probabilities"
TOLERANCE = 1e-4
CHECK_BATCH = 8
OPSET = 18


class Served(nn.Module):
    """[0, 1] RGB crops -> class probabilities: the saved model with its normalisation and softmax."""

    def __init__(self, model: TransferModel, card: ModelCard):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std).softmax(dim=1)


@dataclass(frozen=True)
class Exported:
    path: Path
    contract: Path
    max_difference: float  # the largest |exported - PyTorch| probability on the check batch


def contract(card: ModelCard, fmt: str, file: Path) -> dict:
    """What a server needs to feed the exported file and read its output."""
    return {
        "format": fmt, "file": file.name, "input": INPUT, "output": OUTPUT,
        "input_layout": "float32 NCHW, RGB in [0, 1], batch axis dynamic",
        "input_shape": ["N", 3, card.image_size, card.image_size],
        "preprocessing": ["decode to RGB", f"resize the short side to {card.decode_size} px (bicubic) and centre-crop "
                          f"{card.decode_size}x{card.decode_size}", f"resize to {card.resize_size}x{card.resize_size} "
                          "(bilinear, antialiased, rounded to uint8)", f"centre-crop {card.image_size}x{card.image_size}",
                          "divide by 255"],
        "normalisation_inside": {"mean": list(card.mean), "std": list(card.std)},
        "output_layout": "float32 N x classes, softmax probabilities in class_names order",
        "class_names": list(card.class_names), "image_size": card.image_size, "resize_size": card.resize_size,
        "decode_size": card.decode_size, "backbone": card.backbone, "trial": card.trial,
        "val_accuracy": card.val_accuracy, "test_accuracy": card.test_accuracy,
    }


def prepare_images(refs: Sequence[ImageRef], card: ModelCard) -> tuple[list[int], torch.Tensor]:
    """(indices of the readable images, their float32 [0, 1] crops), exactly as `predict` feeds the model."""
    from .data.transforms import centre_crop
    from .predict import decode_chunks

    index, crops = [], []
    for found, images in decode_chunks(refs, card.decode_size):
        index += found
        crops.append(centre_crop(images.at_size(card.resize_size).images, card.image_size).float() / 255.0)
    if not crops:
        raise UserError("none of the given images could be read")
    return index, torch.cat(crops)


def export_model(model_dir: Path, fmt: str, output: Path | None, registries,
                 check_inputs: torch.Tensor | None = None) -> Exported:
    """Export the saved model in `model_dir`; checked on `check_inputs` (default: a seeded random batch)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_runtime(fmt)
    model, card = load_model(Path(model_dir), registries)
    served = Served(model.cpu().eval(), card).eval()
    output = Path(output) if output else Path(model_dir) / f"model{SUFFIX[fmt]}"
    if check_inputs is None:
        check_inputs = torch.rand((CHECK_BATCH, 3, card.image_size, card.image_size),
                                  generator=torch.Generator().manual_seed(0))
    staging = claim(output, fmt)
    try:
        example = check_inputs[:2]
        (_to_onnx if fmt == "onnx" else _to_torchscript)(served, example, staging)
        with torch.inference_mode():
            expected = served(check_inputs).numpy()
        got = (_run_onnx if fmt == "onnx" else _run_torchscript)(staging, check_inputs)
        difference = float(np.abs(got - expected).max())
        if got.shape != expected.shape or not difference <= TOLERANCE:
            raise UserError(f"the {fmt} export of {model_dir} does not match the PyTorch model (largest probability "
                            f"difference {difference:.2e} > {TOLERANCE:g}); it was not written. Report this with the "
                            "backbone's name")
        os.replace(staging, output)
    except OSError as exc:
        raise UserError(f"cannot write --output {output}: {exc.strerror or exc}") from None
    finally:
        staging.unlink(missing_ok=True)
    described = output.with_name(output.name + ".json")
    try:
        described.write_text(json.dumps(contract(card, fmt, output), indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {described}: {exc.strerror or exc}; choose an --output in a writable "
                        "folder") from None
    return Exported(output, described, difference)


def require_runtime(fmt: str) -> None:
    """A UserError naming the install when a package `fmt` needs (to export or to check) is missing."""
    needed = ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ()
    missing = [name for name in needed if _missing(name)]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)} (onnx and onnxscript to export, onnxruntime to check "
                        "the result): pip install 'autotransfer[export]'")


def _missing(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is None  # None: imports of it are blocked
    return importlib.util.find_spec(name) is None


def claim(output: Path, fmt: str) -> Path:
    """The staging file beside `output`, created now: an unwritable --output fails here, in one line, before
    the export runs (torch's own writers raise deep inside with a traceback)."""
    hint = f"give a file name in a writable folder, e.g. model{SUFFIX[fmt]}"
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name, e.g. {output / ('model' + SUFFIX[fmt])}")
    blocking = next((p for p in output.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"cannot write --output {output}: {blocking} is a file, not a folder; {hint}")
    staging = output.with_name(f".{output.name}.partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.touch()
    except OSError as exc:
        raise UserError(f"cannot write --output {output}: {exc.strerror or exc}; {hint}") from None
    return staging


def _to_onnx(served: Served, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401 - torch.onnx needs it; say so before torch fails deep inside
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages (and onnxruntime to check the result): "
                        "pip install 'autotransfer[export]'") from None
    import warnings

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on the traced graph; the check below is what counts
        torch.onnx.export(served, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes={"images": {0: batch}}, opset_version=OPSET, dynamo=True,
                          external_data=False, verbose=False)


def _run_onnx(path: Path, inputs: torch.Tensor) -> np.ndarray:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("checking an ONNX export needs onnxruntime: pip install 'autotransfer[export]'") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: inputs.numpy()})[0]


def _to_torchscript(served: Served, example: torch.Tensor, path: Path) -> None:
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes; the check below compares outputs on other inputs
        traced = torch.jit.trace(served, example, check_trace=False)
    traced.save(str(path))


def _run_torchscript(path: Path, inputs: torch.Tensor) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; it still loads and runs
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.no_grad():
        return loaded(inputs).numpy()


def run_exported(path: Path, fmt: str, inputs: torch.Tensor) -> np.ndarray:
    """Probabilities of an exported file on [0, 1] crops, through its own runtime."""
    return (_run_onnx if fmt == "onnx" else _run_torchscript)(Path(path), inputs)
