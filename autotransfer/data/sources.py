"""Where labelled images come from: the image references and labels of a dataset, and the built-in
sources (image folders, CSV manifests, the built-in digits, any map-style torch Dataset).

Splits: train, val and test. The test split is fixed by the source alone (a `test/` folder, a CSV
`split=test`, the built-in digits' fixed carve, or a plugin's own), never by `--seed` or
`--val-fraction`.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

if TYPE_CHECKING:
    import torch

ImageRef = Union[Path, np.ndarray, bytes]  # a file, decoded pixels (H, W[, C]) uint8, or encoded image bytes


log = logging.getLogger(__package__)  # "autotransfer.data", as when this package was one module

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
BUILTIN_TEST_FRACTION = 0.2  # built-in digits: a fixed, stratified test carve ...
BUILTIN_TEST_SEED = 0        # ... the same whatever --seed, so every run and method scores the same images


@dataclass
class LabelledRefs:
    """Undecoded images with labels, as a dataset source returns them."""

    name: str
    refs: list[ImageRef]
    labels: np.ndarray
    class_names: list[str]
    splits: np.ndarray | None = None  # "train"/"val"/"test" per image, or None: val (and no test) split here

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.splits is not None:
            self.splits = np.asarray(self.splits)
            bad = sorted(set(self.splits.tolist()) - set(SPLITS))
            if bad:
                raise UserError(f"dataset {self.name!r}: unknown split value(s) {', '.join(map(repr, bad))}; "
                                f"a source must label each image {', '.join(SPLITS)}")

    def with_val_as_test(self) -> "LabelledRefs":
        """The source's val split becomes the test split; the search then carves its own val from train
        (for datasets that ship only train/val, like a benchmark that must keep one split unseen)."""
        if self.splits is None or not (self.splits == "val").any():
            raise UserError(f"dataset {self.name!r} has no val split to hold out as test; "
                            "drop --val-as-test or give a dataset with a val split")
        if (self.splits == "test").any():
            raise UserError(f"dataset {self.name!r} already has a test split; drop --val-as-test")
        return LabelledRefs(self.name, self.refs, self.labels, self.class_names,
                            np.where(self.splits == "val", "test", self.splits))

    def split_refs(self, split: str) -> tuple[list[ImageRef], np.ndarray]:
        """The undecoded images and labels of one source-defined split (empty when there is none)."""
        if self.splits is None:
            return [], np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(self.splits == split)
        return [self.refs[i] for i in rows], self.labels[rows]


@runtime_checkable
class DatasetSource(Protocol):
    """What the search asks of a dataset source (`autotransfer_dataset_sources`; docs/plugins.md is the
    contract). Optional: `datasets`, the names it serves, for `autotransfer plugins`."""

    name: str

    def can_load(self, uri: str) -> bool:
        """Whether this source reads `--dataset uri` (cheap: look at the string or the file name)."""

    def load(self, uri: str) -> Union[LabelledRefs, torch.utils.data.Dataset]:
        """The labels and undecoded images, or a map-style torch Dataset of (image, label)."""


def from_torch_dataset(dataset, name: str) -> LabelledRefs:
    """A map-style torch Dataset of (image, label) pairs, as a source may return one.

    Images may be PIL images, uint8 arrays (H, W[, C]) or tensors (C, H, W), uint8 or float in
    [0, 1]; class names come from `dataset.classes` when it has them. Every item is read once here,
    so the dataset's own transforms should not augment.
    """
    import torch
    refs, labels = [], []
    for index in range(len(dataset)):
        image, label = dataset[index]
        if isinstance(image, Image.Image):
            array = np.asarray(to_rgb(image), dtype=np.uint8)
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.is_floating_point():
                tensor = (tensor.clamp(0, 1) * 255).round()
            array = tensor.to(torch.uint8).numpy()
            array = array.transpose(1, 2, 0) if array.ndim == 3 else array
        else:
            array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise UserError(f"dataset {name!r}: item {index} is {type(image).__name__} of shape {array.shape}, "
                            f"dtype {array.dtype}; return PIL images, uint8 arrays or (C, H, W) tensors")
        refs.append(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        labels.append(int(label))
    classes = getattr(dataset, "classes", None)
    class_names = [str(c) for c in classes] if classes is not None else [str(c) for c in sorted(set(labels))]
    if classes is None:
        remap = {label: i for i, label in enumerate(sorted(set(labels)))}
        labels = [remap[label] for label in labels]
    return LabelledRefs(name, refs, np.array(labels), class_names)


def load_dataset(source: DatasetSource, uri: str) -> LabelledRefs:
    """Ask `source` for `uri`; a torch Dataset is read into LabelledRefs."""
    loaded = source.load(uri)
    if isinstance(loaded, LabelledRefs):
        return loaded
    import torch

    if isinstance(loaded, torch.utils.data.Dataset) and hasattr(loaded, "__len__"):
        return from_torch_dataset(loaded, getattr(loaded, "name", None) or uri)
    raise UserError(f"dataset source {source.name!r} returned {type(loaded).__name__} for {uri!r}; "
                    "a source must return autotransfer.data.LabelledRefs or a map-style torch Dataset")


# --------------------------------------------------------------------------- sources

class FolderSource:
    """ImageFolder layout: `root/train/<class>/*` with optional `root/val/` and `root/test/` beside it,
    or `root/<class>/*`. Without val/, val is carved from train; test/ is never carved."""

    name = "folder"

    def can_load(self, uri: str) -> bool:
        return Path(uri).is_dir()

    def load(self, uri: str) -> LabelledRefs:
        root = Path(uri)
        split_dirs = _split_dirs(root)
        if split_dirs:
            parts = {split: _scan_classes(path) for split, path in split_dirs.items()}
            class_names = sorted(set().union(*parts.values()))
        else:
            parts = {None: _scan_classes(root)}
            class_names = sorted(parts[None])
        if not class_names:
            raise UserError(
                f"no class folders in {root}; expected {root}/<class>/<image> or "
                f"{root}/train/<class>/<image> (with val/ and test/ beside train/ when you have them)")
        index = {name: i for i, name in enumerate(class_names)}
        refs, labels, splits = [], [], []
        for split, classes in parts.items():
            for class_name, files in classes.items():
                refs += files
                labels += [index[class_name]] * len(files)
                splits += [split] * len(files)
        if not refs:
            raise UserError(f"no files found under {root}; put images in one folder per class")
        return LabelledRefs(root.name, refs, np.array(labels), class_names,
                            None if None in parts else np.array(splits))


def _split_dirs(root: Path) -> dict[str, Path]:
    """`train/` (+ `val/`, `valid/`, `validation/`, `test/`) at the top of `root`, or {} for a class layout.
    Any other folder beside train/ is an error, not a class; so is a split folder without train/."""
    folders = _subdirs(root)
    named = {p.name.lower(): p for p in folders if p.name.lower() in SPLIT_NAMES}
    if "train" not in named:
        if named:
            found = ", ".join(f"{p.name}/" for p in named.values())
            raise UserError(f"{root} has {found} but no train/ beside it; a split layout needs train/ "
                            "(rename the folder if it is a class)")
        return {}
    stray = [p.name for p in folders if p.name.lower() not in SPLIT_NAMES]
    if stray:
        raise UserError(f"{root} has a folder {stray[0]!r} beside train/; only train/, val/ (or valid/, validation/) "
                        f"and test/ may stand there: move {stray[0]!r} inside a split or out of {root}")
    splits: dict[str, Path] = {}
    for key, path in sorted(named.items()):
        split = SPLIT_NAMES[key]
        if split in splits:
            raise UserError(f"{root} has both {splits[split].name}/ and {path.name}/; keep one {split} folder")
        splits[split] = path
    return splits


class CsvSource:
    """A CSV manifest with columns `path,label` (paths relative to the CSV), optionally `split`."""

    name = "csv"

    def can_load(self, uri: str) -> bool:
        return uri.lower().endswith(".csv") and Path(uri).is_file()

    def load(self, uri: str) -> LabelledRefs:
        path = Path(uri)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise UserError(f"CSV manifest {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                            "save it as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise UserError(
                f"CSV manifest {path} lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'}); "
                "its header must be path,label[,split]")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        if not rows:
            raise UserError(f"CSV manifest {path} has a header but no rows")
        class_names = sorted({row["label"] for row in rows})
        index = {name: i for i, name in enumerate(class_names)}
        refs = [(path.parent / row["path"]) for row in rows]
        labels = np.array([index[row["label"]] for row in rows])
        splits = None
        if "split" in columns:
            bad = sorted({row["split"] for row in rows if row["split"].lower() not in SPLIT_NAMES})
            if bad:
                raise UserError(f"CSV manifest {path}: unknown split value(s) {', '.join(map(repr, bad))}; "
                                "use train, val or test")
            splits = np.array([SPLIT_NAMES[row["split"].lower()] for row in rows])
        return LabelledRefs(path.stem, refs, labels, class_names, splits)


class BuiltinSource:
    """`builtin:digits`: scikit-learn's bundled 8x8 digits, so demos and tests need no files.

    `builtin:digits:0-4` (or `:5,7,9`) keeps only those classes, which gives disjoint source and
    target tasks for a two-phase transfer demo: pretrain on one half, search on the other.
    """

    name = "builtin"
    datasets = ("digits", "digits:LOW-HIGH")

    def can_load(self, uri: str) -> bool:
        return uri.startswith("builtin:")

    def load(self, uri: str) -> LabelledRefs:
        key, _, subset = uri.split(":", 1)[1].partition(":")
        if key != "digits":
            raise UserError(f"unknown built-in dataset {uri!r}; available: builtin:digits, builtin:digits:0-4")
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        names = [str(c) for c in digits.target_names]
        keep = _digit_subset(uri, subset) if subset else list(range(len(names)))
        rows = np.isin(digits.target, keep)
        remap = {old: new for new, old in enumerate(keep)}
        labels = np.array([remap[t] for t in digits.target[rows]])
        name = "digits" if not subset else f"digits-{subset.replace(',', '_')}"
        return LabelledRefs(name, list(images[rows]), labels, [names[k] for k in keep], _fixed_test_carve(labels))


def _fixed_test_carve(labels: np.ndarray) -> np.ndarray:
    """"test" for a stratified BUILTIN_TEST_FRACTION of the images, "train" for the rest; the same for
    every run (its seed is fixed, not --seed), so val is carved from the rest and test stays unseen."""
    from sklearn.model_selection import train_test_split

    _, test_index = train_test_split(np.arange(len(labels)), test_size=BUILTIN_TEST_FRACTION, stratify=labels,
                                     random_state=BUILTIN_TEST_SEED)
    splits = np.full(len(labels), "train", dtype=object)
    splits[test_index] = "test"
    return splits


def _digit_subset(uri: str, spec: str) -> list[int]:
    try:
        if "-" in spec:
            low, high = (int(v) for v in spec.split("-"))
            keep = list(range(low, high + 1))
        else:
            keep = sorted({int(v) for v in spec.split(",")})
    except ValueError:
        keep = []
    if len(keep) < 2 or not all(0 <= k <= 9 for k in keep):
        raise UserError(f"{uri!r}: the class subset must be LOW-HIGH or a comma list of at least two digits 0-9, "
                        "e.g. builtin:digits:0-4")
    return keep


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders; a link back to `path` or above it (`ln -s . data/loop`) is skipped with a warning,
    since it would make a class of every image again."""
    folders = []
    for p in sorted(path.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.is_symlink() and _loops_back(p, path):
            log.warning("skipped folder %s: a link back to %s, not a class", p, p.resolve())
            continue
        folders.append(p)
    return folders


def _loops_back(link: Path, parent: Path) -> bool:
    target, here = link.resolve(), parent.resolve()
    return target == here or target in here.parents


def _scan_classes(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
            for d in _subdirs(root)}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: 16-bit grey scaled to 8 bits, transparency composited on white."""
    if image.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits (convert() clips nearly all to white)
        grey = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
