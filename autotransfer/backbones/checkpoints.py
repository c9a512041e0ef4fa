"""Pretrained checkpoints made by `autotransfer pretrain`: the folder format (``checkpoint_provider``
serves them as backbones).

A checkpoint is a folder: ``backbone.safetensors`` (the backbone's state dict, no head),
``source_head.safetensors`` (the source-task classifier, for source-label scorers) and
``manifest.json`` (architecture, preprocessing, source dataset, training settings, checksums).
A search uses one as a backbone by its folder path (``--backbones resnet18,runs/src``), by its
folder name when its parent is listed in ``AUTOTRANSFER_ZOO``, or as weights for its
architecture (``--weights resnet18=runs/src``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, WeightsUnavailable
from .preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

MANIFEST = "manifest.json"
BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "source_head.safetensors"
FORMAT = "autotransfer-checkpoint"
FORMAT_VERSION = 1
ZOO_ENV = "AUTOTRANSFER_ZOO"


@dataclass
class Manifest:
    """What a checkpoint is: enough to rebuild, feed and audit it."""

    architecture: str  # the backbone name the weights fit (timm or plugin)
    num_features: int
    num_stages: int
    image_size: int  # the crop it was trained at: a search's default input size for it
    mean: list[float]
    std: list[float]
    crop_pct: float
    source_dataset: str
    source_classes: list[str]
    training: dict  # init, epochs, lr, optimizer, batch size, seed, device
    val_accuracy: float | None
    sha256: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, tuple(self.mean), tuple(self.std), self.crop_pct)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> Manifest:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint manifest {path}: {exc}; re-run `autotransfer pretrain`") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path} is not an autotransfer checkpoint manifest (format {data.get('format')!r})")
    if data.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format version {data['version']}; this autotransfer reads up to "
                        f"{FORMAT_VERSION}: upgrade autotransfer")
    known = {f for f in Manifest.__dataclass_fields__}
    return Manifest(**{k: v for k, v in data.items() if k in known})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_file(folder: Path, name: str, manifest: Manifest) -> Path:
    """`folder/name`, after checking it is the file the manifest was written with."""
    path = folder / name
    if not path.is_file():
        raise WeightsUnavailable(f"checkpoint {folder} lacks {name}; re-run `autotransfer pretrain` for it")
    expected = manifest.sha256.get(name)
    if expected and sha256_of(path) != expected:
        raise WeightsUnavailable(f"checkpoint file {path} does not match its manifest's sha256 (changed or corrupt); "
                                 "re-run `autotransfer pretrain` or restore the file")
    return path


def write_checkpoint(folder: Path, backbone: nn.Module, head: nn.Module, manifest: Manifest) -> None:
    """Write the three files into a fresh folder, then move it into place (never half a checkpoint)."""
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    for name, module in ((BACKBONE_FILE, backbone), (HEAD_FILE, head)):
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(staging / name), metadata={"format": FORMAT})
        manifest.sha256[name] = sha256_of(staging / name)
    (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    publish_permissions(staging)
    if folder.exists():
        folder.rmdir()  # the caller checked it is empty
    os.replace(staging, folder)


def publish_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders; give the published folder the modes a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def path_name(folder: str | os.PathLike) -> str:
    """How to name a checkpoint folder on --backbones: path-like, so it cannot pass for a model name."""
    text = str(folder)
    return text if ("/" in text or os.sep in text or text.startswith(".")) else f".{os.sep}{text}"


# --------------------------------------------------------------------------- lookup by name

def zoo_folders() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(ZOO_ENV, "").split(os.pathsep) if p.strip()]


def locate(name: str) -> Path | None:
    """The checkpoint folder `name` stands for: a path to one, or a folder in an AUTOTRANSFER_ZOO zoo."""
    if ("/" in name or os.sep in name or name.startswith(".")) and is_checkpoint(name):
        return Path(name)
    if "/" in name or os.sep in name:
        return None
    for zoo in zoo_folders():
        if is_checkpoint(zoo / name):
            return zoo / name
    return None


def weights_in_folder(path: Path) -> Path:
    """`--weights NAME=DIR` with a checkpoint folder means its backbone file."""
    return verified_file(path, BACKBONE_FILE, read_manifest(path))


def utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()

