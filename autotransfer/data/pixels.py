"""The decoded-image cache on disk: a dataset's uint8 pixels at one decode size, decoded once per
machine and memory-mapped by every process that reads them (reruns, resumes, workers, `rank`,
`pretrain`, bench cells).

An entry is a folder `<cache>/<key>/` with `pixels.u8` (the readable images, N x 3 x S x S, raw
uint8) and `entry.json` (format, decoder, size, which refs were unreadable, byte count, CRC-32).
The key hashes everything the pixels depend on: each ref (a file's path, size and mtime; an
in-memory image's bytes), the decode size and the decoder's version. An edited, added or removed
file therefore gives another key: a stale entry is never found, only left for `rm -r` (the
entries are named in the `entry.json` of each).

Invariants: an entry is written once, into a staging folder renamed into place, under a lock on
the key, so processes that start together decode once and the others wait for it and read it.
Readers map the file copy-on-write (never writing it), so N processes share one copy in the page
cache. An entry whose size, CRC-32 or description does not match is removed and rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .decode import ImageRef, try_decode

log = logging.getLogger(__package__)

FORMAT = 1
DECODER = "pil-rgb-fit-bicubic-draft/1"  # bump when decode.decode_image changes the pixels it makes
PIXELS, ENTRY = "pixels.u8", "entry.json"
CHUNK = 256  # images decoded, written and checked at a time
ENV = "AUTOTRANSFER_DATA_CACHE"  # a machine-wide folder a team can share (else <out>/data-cache)


@dataclass(frozen=True)
class Decoded:
    """The readable images of some refs, in their order (memory-mapped), and which refs they are."""

    pixels: torch.Tensor  # (ok.sum(), 3, S, S) uint8
    ok: np.ndarray  # bool per ref
    key: str
    built: bool  # decoded by this call (False: read from the cache)


def default_folder(out: Path) -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else Path(out) / "data-cache"


def key_of(refs: Sequence[ImageRef], decode_size: int) -> str:
    """What the pixels depend on, hashed: every ref's identity, the size and the decoder."""
    digest = hashlib.sha256(f"{FORMAT}|{DECODER}|{decode_size}|{len(refs)}".encode())
    for ref in refs:
        if isinstance(ref, (bytes, bytearray)):
            digest.update(b"b" + hashlib.sha1(ref).digest())
        elif isinstance(ref, np.ndarray):
            digest.update(f"a{ref.shape}{ref.dtype}".encode() + hashlib.sha1(np.ascontiguousarray(ref)).digest())
        else:
            path = Path(ref)
            try:
                stat = path.stat()
                digest.update(f"f{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except OSError:  # unreadable now: it decodes as unreadable, and its reappearance changes the key
                digest.update(f"m{path}".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class PixelCache:
    """Entries under `folder`; `open_or_build` is the one door."""

    folder: Path

    def open_or_build(self, refs: Sequence[ImageRef], decode_size: int,
                      say: Callable[[str], None] = lambda message: None, what: str = "the dataset") -> Decoded:
        """The pixels of `refs` at `decode_size`: mapped from the entry when there is a sound one, else
        decoded once into it (by this process, or by another that holds the key's lock) and mapped."""
        key = key_of(refs, decode_size)
        found = self._open(key, len(refs), decode_size)
        if found is not None:
            say(f"reading {len(refs)} images of {what} at {decode_size} px from the data cache {self.folder}")
            return found
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / f".{key}.lock"):
            found = self._open(key, len(refs), decode_size)  # another process built it while this one waited
            if found is not None:
                say(f"reading {len(refs)} images of {what} at {decode_size} px from the data cache {self.folder}")
                return found
            say(f"decoding {len(refs)} images of {what} at {decode_size} px into the data cache {self.folder}")
            self._build(key, refs, decode_size)
        found = self._open(key, len(refs), decode_size)
        if found is None:
            raise RuntimeError(f"the data cache entry {self.folder / key} just written does not read back")
        return Decoded(found.pixels, found.ok, key, built=True)

    def derived(self, base: Decoded, order: np.ndarray, decode_size: int) -> tuple[str, torch.Tensor]:
        """`base.pixels[order]` as an entry of its own (built by copying, not decoding), so a reordering
        (splits carved from train) is shared by every process too; returns its key and pixels."""
        tag = hashlib.sha256(np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest()[:16]
        key = f"{base.key}-{tag}"
        found = self._open(key, len(order), decode_size)
        if found is None:
            with _locked(self.folder / f".{key}.lock"):
                found = self._open(key, len(order), decode_size)
                if found is None:
                    chunks = (base.pixels[torch.as_tensor(order[start:start + CHUNK])].numpy()
                              for start in range(0, len(order), CHUNK))
                    self._write(key, decode_size, np.ones(len(order), dtype=bool), chunks, derived_from=base.key)
                    found = self._open(key, len(order), decode_size)
        if found is None:
            raise RuntimeError(f"the data cache entry {self.folder / key} just written does not read back")
        return key, found.pixels

    # -- entries
    def _build(self, key: str, refs: Sequence[ImageRef], decode_size: int) -> None:
        """Decode a chunk at a time, each kept only until it is written: the file holds the pixels, not
        this process's memory."""
        ok = np.zeros(len(refs), dtype=bool)

        def chunks() -> Iterator[np.ndarray]:
            with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
                for start in range(0, len(refs), CHUNK):
                    chunk = list(pool.map(lambda r: try_decode(r, decode_size), refs[start:start + CHUNK]))
                    ok[start:start + len(chunk)] = [t is not None for t in chunk]
                    good = [t.numpy() for t in chunk if t is not None]
                    if good:
                        yield np.stack(good)
        self._write(key, decode_size, ok, chunks())

    def _write(self, key: str, decode_size: int, ok: np.ndarray, chunks: Iterable[np.ndarray],
               derived_from: str | None = None) -> None:
        """Write an entry into a staging folder, then rename it into place: the pixels chunk by chunk
        (`ok` is final once `chunks` is exhausted), then the description with the CRC-32."""
        final = self.folder / key
        staging = self.folder / f".{key}-{os.getpid()}.writing"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            crc = written = 0
            with (staging / PIXELS).open("wb") as handle:
                for chunk in chunks:
                    data = np.ascontiguousarray(chunk, dtype=np.uint8)
                    crc = zlib.crc32(memoryview(data).cast("B"), crc)
                    handle.write(data.tobytes())
                    written += data.nbytes
            count = int(ok.sum())
            if written != count * 3 * decode_size * decode_size:
                raise RuntimeError(f"data cache entry {key}: wrote {written} bytes for {count} images")
            entry = {"format": FORMAT, "decoder": DECODER, "decode_size": decode_size, "refs": len(ok),
                     "unreadable": np.flatnonzero(~ok).tolist(), "images": count, "bytes": written,
                     "crc32": crc, "derived_from": derived_from}
            (staging / ENTRY).write_text(json.dumps(entry) + "\n")
            if final.exists():  # a damaged entry _open refused: replaced whole
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _open(self, key: str, refs: int, decode_size: int) -> Decoded | None:
        """The entry, mapped and verified; None when absent. A damaged one is removed (and rebuilt)."""
        folder = self.folder / key
        if not (folder / ENTRY).is_file():
            return None
        problem = None
        try:
            entry = json.loads((folder / ENTRY).read_text())
            expected = {"format": FORMAT, "decoder": DECODER, "decode_size": decode_size, "refs": refs}
            if any(entry.get(name) != value for name, value in expected.items()):
                problem = "its description does not match"
            elif (folder / PIXELS).stat().st_size != entry["bytes"]:
                problem = f"pixels.u8 holds {(folder / PIXELS).stat().st_size} bytes, not {entry['bytes']}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        if problem is None:
            ok = np.ones(refs, dtype=bool)
            ok[entry["unreadable"]] = False
            shape = (entry["images"], 3, decode_size, decode_size)
            if shape[0]:
                mapped = np.memmap(folder / PIXELS, dtype=np.uint8, mode="c", shape=shape)
                if _crc(mapped) != entry["crc32"]:
                    problem = "its CRC-32 does not match"
                else:
                    return Decoded(torch.from_numpy(mapped), ok, key, built=False)
            else:
                return Decoded(torch.empty(shape, dtype=torch.uint8), ok, key, built=False)
        log.warning("data cache entry %s is damaged (%s); it is removed and rebuilt", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _crc(mapped: np.ndarray) -> int:
    crc = 0
    for start in range(0, len(mapped), CHUNK):
        crc = zlib.crc32(memoryview(np.ascontiguousarray(mapped[start:start + CHUNK])).cast("B"), crc)
    return crc


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
