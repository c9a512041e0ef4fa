"""The dataset source: WebDataset tar shards -> ``autotransfer.data.LabelledRefs``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autotransfer.data import LabelledRefs
from autotransfer.errors import UserError

from .reader import Sample, read_shard
from .shards import ShardSet, looks_like_shards, resolve

CLASSES_FILE = "classes.txt"
READ_THREADS = 8  # shards are read in parallel: file reads release the GIL


@dataclass(frozen=True)
class ClassList:
    """Names from a ``classes.txt`` (line i names class i) and the file they came from."""

    names: tuple[str, ...]
    path: Path


class WebDatasetSource:
    """Reads ``--dataset`` given as a .tar shard, a folder of shards, a brace pattern or ``wds:PATH``.

    Shards named ``val*`` (or in a ``val/`` sub-folder) form the validation split, the others the
    training split; with no validation shard the core makes a stratified split. Images stay
    encoded bytes, so the core decodes each once, in parallel.
    """

    name = "webdataset"

    def can_load(self, uri: str) -> bool:
        return looks_like_shards(uri)

    def load(self, uri: str) -> LabelledRefs:
        shard_set = resolve(uri)
        samples, splits = read_samples(shard_set)
        if not samples:
            raise UserError(f"no samples in {len(shard_set.shards)} shard(s) of {uri!r} (first "
                            f"{shard_set.shards[0].path}); the tars hold no KEY.jpg/KEY.png members")
        class_names, labels = label_indices(samples, find_classes(shard_set))
        return LabelledRefs(shard_set.name, [s.image for s in samples], np.array(labels), class_names,
                            np.array(splits) if shard_set.has_splits else None)


def read_samples(shard_set: ShardSet) -> tuple[list[Sample], list[str]]:
    """All samples in shard order, and the split of each ("train" for unmarked shards)."""
    workers = max(1, min(READ_THREADS, len(shard_set.shards)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        per_shard = list(pool.map(lambda shard: read_shard(shard.path), shard_set.shards))
    samples: list[Sample] = []
    splits: list[str] = []
    for shard, found in zip(shard_set.shards, per_shard):
        samples += found
        splits += [shard.split or "train"] * len(found)
    return samples, splits


# --------------------------------------------------------------------------- class names

def find_classes(shard_set: ShardSet) -> ClassList | None:
    """The ``classes.txt`` beside the shards; several must agree."""
    found = [read_classes(folder / CLASSES_FILE) for folder in shard_set.folders
             if (folder / CLASSES_FILE).is_file()]
    for other in found[1:]:
        if other.names != found[0].names:
            raise UserError(f"{found[0].path} and {other.path} list different classes; keep one {CLASSES_FILE}")
    return found[0] if found else None


def read_classes(path: Path) -> ClassList:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; it must be UTF-8 text, one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise UserError(f"{path} is empty; write one class name per line (line 1 is class 0)")
    if "" in names:
        raise UserError(f"{path}: line {names.index('') + 1} is empty; write one class name per line")
    seen: set[str] = set()
    for number, name in enumerate(names, start=1):
        if name in seen:
            raise UserError(f"{path}: class {name!r} is listed twice (again on line {number}); class names must be unique")
        seen.add(name)
    return ClassList(tuple(names), path)


def label_indices(samples: list[Sample], classes: ClassList | None) -> tuple[list[str], list[int]]:
    """Class names and each sample's class index, from ``classes.txt`` or from the labels themselves."""
    if classes is not None:
        position = {name: i for i, name in enumerate(classes.names)}
        return list(classes.names), [_listed_index(s, classes, position) for s in samples]
    numbers = sorted({s.label for s in samples if isinstance(s.label, int)})
    names = sorted({s.label for s in samples if isinstance(s.label, str)})
    if numbers and names:
        first_int = next(s for s in samples if isinstance(s.label, int))
        first_str = next(s for s in samples if isinstance(s.label, str))
        raise UserError(f"labels mix class indices ({first_int.where}: {first_int.label}) and class names "
                        f"({first_str.where}: {first_str.label!r}); add a {CLASSES_FILE} beside the shards "
                        "to map indices to names, or use one kind")
    if numbers:
        index = {value: i for i, value in enumerate(numbers)}
        return [str(value) for value in numbers], [index[s.label] for s in samples]
    index = {name: i for i, name in enumerate(names)}
    return names, [index[s.label] for s in samples]


def _listed_index(sample: Sample, classes: ClassList, position: dict[str, int]) -> int:
    count = len(classes.names)
    if isinstance(sample.label, int):
        if sample.label >= count:
            raise UserError(f"{sample.where}: class index {sample.label} is outside {classes.path} "
                            f"({count} classes, 0..{count - 1}); fix the label or add the class")
        return sample.label
    if sample.label not in position:
        raise UserError(f"{sample.where}: class {sample.label!r} is not listed in {classes.path}; "
                        "add it there or fix the label")
    return position[sample.label]
