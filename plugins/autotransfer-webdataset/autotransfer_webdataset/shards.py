"""Which shard files a ``--dataset`` string names, and which split each shard holds.

Everything here looks at names only (no tar is opened), so ``can_load`` stays cheap.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autotransfer.errors import UserError

SCHEME = "wds:"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}
# A split prefix must be followed by a non-letter, so "valley-0.tar" is not a validation shard.
_SPLIT_PREFIX = re.compile(r"^(training|train|validation|valid|val|test)(?![a-z])", re.IGNORECASE)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """One tar file and the split its name or folder marks (None: unmarked)."""

    path: Path
    split: str | None


@dataclass(frozen=True)
class ShardSet:
    """The shards a ``--dataset`` string names, with the folders that may hold ``classes.txt``."""

    name: str
    shards: tuple[Shard, ...]
    folders: tuple[Path, ...]

    @property
    def has_splits(self) -> bool:
        """Val or test shards: the source then gives every sample its split (unmarked ones are train)."""
        return any(shard.split in ("val", "test") for shard in self.shards)


# --------------------------------------------------------------------------- names

def is_shard_name(name: str) -> bool:
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(SHARD_SUFFIXES)


def split_of_name(name: str) -> str | None:
    """``val-000000.tar`` -> "val", ``train_3.tar`` -> "train", ``shard-0.tar`` -> None."""
    match = _SPLIT_PREFIX.match(name)
    return SPLIT_FOLDERS[match.group(1).lower()] if match else None


def split_of_path(path: Path) -> str | None:
    """The split a shard's name marks, else the split its folder (``val/``, ``train/``, ...) marks."""
    return split_of_name(path.name) or SPLIT_FOLDERS.get(path.parent.name.lower())


def strip_scheme(uri: str) -> tuple[str, bool]:
    """The path part of ``uri`` and whether the explicit ``wds:`` scheme was given."""
    if uri.lower().startswith(SCHEME):
        return uri[len(SCHEME):], True
    return uri, False


def shard_stem(path: Path) -> str:
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------- brace patterns

def has_braces(pattern: str) -> bool:
    """Whether ``pattern`` holds a ``{a..b}`` range or ``{x,y}`` list to expand."""
    return any(".." in body or "," in body for body in _BRACE.findall(pattern))


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..003}`` ranges (zero padding kept) and ``{a,b}`` lists, as WebDataset does."""
    for match in _BRACE.finditer(pattern):
        options = _brace_options(match.group(1), pattern)
        if options is None:
            continue
        head, tail = pattern[: match.start()], pattern[match.end():]
        return [expanded for option in options for expanded in expand_braces(head + option + tail)]
    return [pattern]


def _brace_options(body: str, pattern: str) -> list[str] | None:
    if ".." in body:
        found = _RANGE.match(body)
        if not found:
            raise UserError(f"--dataset {pattern!r}: brace range {{{body}}} must be two integers such as "
                            "{000000..000099}")
        first, last = found.group(1), found.group(2)
        width = max(len(first), len(last)) if _padded(first) or _padded(last) else 0
        low, high = int(first), int(last)
        step = 1 if high >= low else -1
        return [f"{value:0{width}d}" for value in range(low, high + step, step)]
    if "," in body:
        return body.split(",")
    return None


def _padded(number: str) -> bool:
    digits = number.lstrip("-")
    return len(digits) > 1 and digits.startswith("0")


# --------------------------------------------------------------------------- resolving a --dataset string

def looks_like_shards(uri: str) -> bool:
    """Cheap test used by ``can_load``: names and folder listings only, never file contents."""
    path_text, explicit = strip_scheme(uri)
    if explicit:
        return True
    if has_braces(path_text):
        return is_shard_name(Path(path_text).name)
    path = Path(path_text)
    if path.is_file():
        return is_shard_name(path.name)
    if path.is_dir():
        return _shard_folder_layout(path) is not None
    return False


def resolve(uri: str) -> ShardSet:
    """The shards named by ``uri``; raises UserError when it names none."""
    path_text, _ = strip_scheme(uri)
    if has_braces(path_text):
        return _resolve_pattern(path_text)
    path = Path(path_text)
    if path.is_file():
        if not is_shard_name(path.name):
            raise UserError(f"{path} is not a tar shard (expected a name ending in {', '.join(SHARD_SUFFIXES)})")
        return ShardSet(shard_stem(path), (Shard(path, split_of_path(path)),), (path.parent,))
    if path.is_dir():
        return _resolve_folder(path)
    raise UserError(f"--dataset {uri!r}: no such file or folder; give a .tar shard, a folder of shards "
                    "or a pattern such as shards/train-{000000..000009}.tar")


def _resolve_pattern(pattern: str) -> ShardSet:
    names = expand_braces(pattern)
    paths = [Path(name) for name in names]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        raise UserError(f"--dataset pattern {pattern!r} matches no file ({len(paths)} names expanded, "
                        f"first {paths[0]}); check the folder and the shard numbers")
    if missing:
        raise UserError(f"--dataset pattern {pattern!r}: {len(missing)} of {len(paths)} shards are missing, "
                        f"first {missing[0]}; fix the range or restore the shards")
    bad = [p for p in paths if not is_shard_name(p.name)]
    if bad:
        raise UserError(f"--dataset pattern {pattern!r} names {bad[0]}, which is not a .tar shard")
    shards = tuple(Shard(p, split_of_path(p)) for p in paths)
    folders = tuple(dict.fromkeys(p.parent for p in paths))
    base = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths]))
    return ShardSet(base.name or "shards", shards, folders)


def _resolve_folder(root: Path) -> ShardSet:
    layout = _shard_folder_layout(root, strict=False)
    if not layout:
        raise UserError(f"no .tar shards in {root} (nor in its train/ or val/ sub-folders); give the folder "
                        "holding the shards, e.g. the output of scripts/make_shards.py")
    shards = tuple(layout)
    folders = tuple(dict.fromkeys([root, *(s.path.parent for s in shards)]))
    return ShardSet(root.resolve().name, shards, folders)


def _shard_folder_layout(root: Path, strict: bool = True) -> list[Shard] | None:
    """Shards directly in ``root`` and in its split sub-folders, in name order.

    With ``strict`` (the ``can_load`` test) any other sub-folder, or a split sub-folder that
    itself holds folders, means an image-folder layout: return None and leave it to the
    built-in folder source. Without it those folders are ignored.
    """
    shards: list[Shard] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            is_split = entry.name.lower() in SPLIT_FOLDERS
            inner = _split_folder_shards(entry, strict) if is_split else None
            if inner is None:
                if strict:
                    return None
                continue
            shards += inner
        elif is_shard_name(entry.name):
            shards.append(Shard(entry, split_of_path(entry)))
    return shards or None


def _split_folder_shards(folder: Path, strict: bool) -> list[Shard] | None:
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and strict:
            return None  # train/<class>/ : an image folder
        if entry.is_file() and is_shard_name(entry.name):
            found.append(Shard(entry, split_of_path(entry)))
    return found
