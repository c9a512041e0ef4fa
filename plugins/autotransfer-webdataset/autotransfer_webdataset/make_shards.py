"""Write a labelled image dataset as WebDataset tar shards: ``KEY.<image>`` + ``KEY.cls`` + ``KEY.json``.

Reads an ImageFolder (``root/<class>/*`` or ``root/train|val|test/<class>/*``, exactly as the core's
folder source reads it) or ``builtin:digits``, and writes ``classes.txt`` plus ``train-NNNNNN.tar``
and ``val-NNNNNN.tar`` (``shard-NNNNNN.tar`` when the input has no split). Image files are copied
byte for byte; arrays and formats the reader does not take are PNG-encoded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from autotransfer.data import BuiltinSource, FolderSource, ImageRef, LabelledRefs
from autotransfer.errors import UserError

from .reader import IMAGE_EXTENSIONS
from .shards import is_shard_name
from .source import CLASSES_FILE

UNSPLIT_PREFIX = "shard"


@dataclass
class ShardSummary:
    """What ``write_shards`` wrote: shard files, samples per split, and inputs it could not use."""

    out: Path
    class_names: list[str]
    shards: list[Path] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        per_split = ", ".join(f"{split} {count}" for split, count in self.counts.items())
        text = (f"wrote {sum(self.counts.values())} samples ({per_split}) of {len(self.class_names)} classes "
                f"in {len(self.shards)} shard(s) to {self.out}")
        return text + (f"; skipped {len(self.skipped)} unreadable file(s), e.g. {self.skipped[0]}" if self.skipped else "")


@dataclass(frozen=True)
class _Encoded:
    extension: str
    data: bytes
    origin: str


def write_shards(source: str | Path, out: str | Path, samples_per_shard: int = 1000, *, upscale: int = 4,
                 shuffle: bool = True, seed: int = 0, overwrite: bool = False) -> ShardSummary:
    """Shard ``source`` into ``out``; samples are shuffled within each split (``seed``) unless told not to.

    ``upscale`` enlarges array images (the 8x8 digits) with nearest-neighbour before PNG encoding.
    """
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if upscale < 1:
        raise UserError(f"--upscale must be at least 1, got {upscale}")
    refs = _load(str(source))
    out = Path(out)
    _prepare_out(out, overwrite)
    (out / CLASSES_FILE).write_text("".join(f"{name}\n" for name in refs.class_names), encoding="utf-8")
    summary = ShardSummary(out, list(refs.class_names))
    rng = np.random.default_rng(seed)
    mtime = int(time.time())
    for prefix, rows in _split_rows(refs):
        order = rng.permutation(rows) if shuffle else rows
        samples = _encoded_samples(refs, order, upscale, source, summary.skipped)
        summary.counts[prefix] = 0
        for number, chunk in enumerate(_chunks(samples, samples_per_shard)):
            path = out / f"{prefix}-{number:06d}.tar"
            _write_tar(path, chunk, start=summary.counts[prefix], mtime=mtime)
            summary.shards.append(path)
            summary.counts[prefix] += len(chunk)
    if not summary.shards:
        raise UserError(f"{source} holds no readable images; nothing was written")
    return summary


# --------------------------------------------------------------------------- input

def _load(source: str) -> LabelledRefs:
    if source.startswith("builtin:"):
        return BuiltinSource().load(source)
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"{source}: no such folder; give an image folder (root/<class>/* or "
                        "root/train|val|test/<class>/*) or builtin:digits")
    return FolderSource().load(source)


def _split_rows(refs: LabelledRefs) -> list[tuple[str, np.ndarray]]:
    if refs.splits is None:
        return [(UNSPLIT_PREFIX, np.arange(len(refs.refs)))]
    return [(split, np.flatnonzero(refs.splits == split)) for split in ("train", "val", "test")
            if (refs.splits == split).any()]


def _encoded_samples(refs: LabelledRefs, rows: Sequence[int], upscale: int, source: str | Path,
                     skipped: list[str]) -> Iterator[tuple[_Encoded, int]]:
    """Encode lazily, so only one shard's worth of images is in memory at a time."""
    for row in rows:
        encoded = encode(refs.refs[row], upscale, origin=_origin(refs.refs[row], source, int(row)))
        if encoded is None:
            skipped.append(str(refs.refs[row]))
        else:
            yield encoded, int(refs.labels[row])


def _origin(ref: ImageRef, source: str | Path, row: int) -> str:
    if isinstance(ref, Path):
        try:
            return ref.relative_to(Path(source)).as_posix()
        except ValueError:
            return str(ref)
    return f"{source}#{row}"


def encode(ref: ImageRef, upscale: int = 1, origin: str = "") -> _Encoded | None:
    """Bytes to store for one image: the file itself when the reader takes its type, else PNG."""
    if isinstance(ref, np.ndarray):
        image = Image.fromarray(ref)
        if upscale > 1:
            image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
        return _Encoded("png", _png(image), origin)
    if isinstance(ref, Path) and ref.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
        return _Encoded(ref.suffix.lower().lstrip("."), ref.read_bytes(), origin)
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref) as image:
            image.load()
            return _Encoded("png", _png(image), origin)
    except Exception:  # not an image PIL can read: reported in the summary, not fatal
        return None


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- output

def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give a new or empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out.iterdir() if p.is_file() and is_shard_name(p.name))
    if old and not overwrite:
        raise UserError(f"{out} already holds {len(old)} shard(s) such as {old[0].name}; "
                        "give a new folder or --overwrite to replace them")
    for path in old:
        path.unlink()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _write_tar(path: Path, samples: list[tuple[_Encoded, int]], start: int, mtime: int) -> None:
    """Write to a temporary name first, so an interrupted run leaves no truncated ``.tar``."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for offset, (encoded, label) in enumerate(samples):
            key = f"{start + offset:06d}"
            _add(archive, f"{key}.{encoded.extension}", encoded.data, mtime)
            _add(archive, f"{key}.cls", f"{label}".encode(), mtime)
            _add(archive, f"{key}.json", json.dumps({"source": encoded.origin}).encode(), mtime)
    os.replace(partial, path)


def _add(archive: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    archive.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Write an image folder or builtin:digits as WebDataset tar shards for autotransfer.")
    parser.add_argument("source", help="image folder (root/<class>/* or root/train|val|test/<class>/*) or builtin:digits")
    parser.add_argument("out", help="output folder for classes.txt and the .tar shards")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar file (default 1000)")
    parser.add_argument("--upscale", type=int, default=4, help="enlarge array images such as the 8x8 digits (default 4)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the input order instead of shuffling per split")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in the output folder")
    args = parser.parse_args(argv)
    try:
        summary = write_shards(args.source, args.out, args.samples_per_shard, upscale=args.upscale,
                               shuffle=not args.no_shuffle, seed=args.seed, overwrite=args.overwrite)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
