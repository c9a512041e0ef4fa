"""Reading weights: state dicts from files and checkpoint folders, loaded strictly with errors that
list what does not fit."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import WeightsUnavailable

if TYPE_CHECKING:
    import torch
    from torch import nn


def ways_out(name: str) -> str:
    return (f"ways out: --weights {name}=PATH to a local .safetensors/.pth state dict; "
            "fill the Hugging Face cache (run once with network, or point HF_HOME at a populated cache); "
            "or --no-pretrained to train from random init")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth state dict, unwrapping the usual checkpoint envelopes."""
    import torch

    file = Path(path)
    if file.is_dir():
        from .checkpoints import is_checkpoint, weights_in_folder

        if not is_checkpoint(file):
            raise WeightsUnavailable(f"weights path {file} is a folder but not an `autotransfer pretrain` checkpoint "
                                     "(no manifest.json); give a .safetensors/.pth file or a checkpoint folder")
        file = weights_in_folder(file)
    if not file.is_file():
        raise WeightsUnavailable(f"weights file {file} does not exist; fix the PATH in --weights NAME=PATH")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsUnavailable(f"weights file {file} holds pickled Python objects, not just tensors, and pickles "
                                 "are refused (they can run code); save a state dict of tensors "
                                 "(torch.save(model.state_dict(), path)) or a .safetensors file") from None
    except Exception as exc:
        detail = " ".join(str(exc).strip().splitlines()[:1]) or type(exc).__name__
        raise WeightsUnavailable(f"cannot read weights file {file}: {type(exc).__name__}: {detail}") from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"weights file {file} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, name: str, origin: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, every backbone tensor required; classifier keys may be ignored."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    expected = module.state_dict()
    # One-element tensors saved as (1,) for a 0-dim buffer (num_batches_tracked) fit, as in torch.
    state = {k: v.reshape(expected[k].shape) if k in expected and v.numel() == 1 == expected[k].numel() else v
             for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
    if problems:
        raise WeightsUnavailable(f"weights from {origin} do not fit backbone {name!r}: tensors {'; '.join(problems)}; "
                                 "check that the file belongs to this architecture")
    module.load_state_dict(state, strict=True)
