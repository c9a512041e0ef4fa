"""The decoded-image cache on disk (autotransfer/data/pixels.py): built once, read by reruns and by
processes that start together, rebuilt when stale or damaged, and the splits it gives equal to the
in-process decode's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

from autotransfer.data import FolderSource, PixelCache, decode_image, prepare
from autotransfer.data.pixels import ENTRY, PIXELS, key_of

SIZE = 16


def _save(path: Path, seed: int, shape=(20, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def _files(root: Path, count: int = 12) -> list[Path]:
    return [_save(root / f"img_{i:03d}.png", i) for i in range(count)]


def _entry(cache: PixelCache, key: str) -> Path:
    return cache.folder / key


def test_a_rerun_reads_the_entry_and_the_pixels_are_the_decoder_s(tmp_path):
    refs = _files(tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    refs.insert(3, tmp_path / "images" / "broken.png")
    cache = PixelCache(tmp_path / "cache")
    said: list[str] = []

    first = cache.open_or_build(refs, SIZE, say=said.append, what="pics")
    assert first.built and first.ok.tolist() == [i != 3 for i in range(len(refs))]
    assert said == [f"decoding {len(refs)} images of pics at {SIZE} px into the data cache {cache.folder}"]
    expected = torch.stack([decode_image(r, SIZE) for i, r in enumerate(refs) if i != 3])
    assert torch.equal(first.pixels, expected)

    again = cache.open_or_build(refs, SIZE, say=said.append, what="pics")
    assert not again.built and again.key == first.key and torch.equal(again.pixels, expected)
    assert said[-1].startswith(f"reading {len(refs)} images of pics")
    entry = json.loads((_entry(cache, first.key) / ENTRY).read_text())
    assert entry["unreadable"] == [3] and entry["images"] == len(refs) - 1

    assert cache.open_or_build(refs, SIZE + 2).key != first.key  # another decode size, another entry


def test_an_edited_added_or_removed_file_gives_another_key(tmp_path):
    refs = _files(tmp_path / "images", 4)
    base = key_of(refs, SIZE)
    assert key_of(list(refs), SIZE) == base
    _save(refs[1], 99)  # rewritten: another size or mtime
    os.utime(refs[1], ns=(1, 1))
    assert key_of(refs, SIZE) != base
    edited = key_of(refs, SIZE)
    assert key_of(refs[:-1], SIZE) != edited and key_of(refs + [_save(tmp_path / "x.png", 5)], SIZE) != edited

    cache = PixelCache(tmp_path / "cache")
    before = cache.open_or_build(refs, SIZE)
    _save(refs[0], 1234)
    os.utime(refs[0], ns=(2, 2))
    after = cache.open_or_build(refs, SIZE)
    assert after.built and after.key != before.key
    assert torch.equal(after.pixels[0], decode_image(refs[0], SIZE))  # never the stale pixels


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "description"])
def test_a_damaged_entry_is_rebuilt_never_read(tmp_path, damage, caplog):
    refs = _files(tmp_path / "images")
    cache = PixelCache(tmp_path / "cache")
    good = cache.open_or_build(refs, SIZE)
    expected = good.pixels.clone()
    del good
    pixels = _entry(cache, key_of(refs, SIZE)) / PIXELS
    if damage == "truncated":
        with pixels.open("r+b") as handle:
            handle.truncate(pixels.stat().st_size - 100)
    elif damage == "flipped byte":
        data = bytearray(pixels.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the CRC-32 sees it
        pixels.write_bytes(bytes(data))
    else:
        entry_file = _entry(cache, key_of(refs, SIZE)) / ENTRY
        entry_file.write_text(entry_file.read_text()[:-10])
    with caplog.at_level(logging.WARNING, logger="autotransfer.data"):
        again = cache.open_or_build(refs, SIZE)
    assert again.built and torch.equal(again.pixels, expected)
    assert any("is damaged" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)


_BUILD = """
import sys
from pathlib import Path
from autotransfer.data import PixelCache
refs = sorted(Path(sys.argv[1]).glob("*.png"))
print(PixelCache(Path(sys.argv[2])).open_or_build(refs, 16).built)
"""


@pytest.mark.slow
def test_processes_that_start_together_decode_once(tmp_path):
    images = tmp_path / "images"
    _files(images, 300)  # more than one chunk, so the build takes a while
    runs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(images), str(tmp_path / "cache")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sorted(out.strip() for out, _ in outputs) == ["False", "False", "True"]
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [
        key_of(sorted(images.glob("*.png")), 16)]  # no staging folder left behind


@pytest.mark.parametrize("layout", ["train and val folders", "val carved from train", "train, val and test"])
def test_prepare_with_the_cache_gives_the_splits_of_the_in_process_decode(tmp_path, layout):
    root = tmp_path / "data"
    seed = 0
    for split in {"train and val folders": ["train", "val"], "val carved from train": [None],
                  "train, val and test": ["train", "val", "test"]}[layout]:
        for name in ("a", "b"):
            for i in range(6 if split in (None, "train") else 2):
                seed += 1
                _save((root / split if split else root) / name / f"{i}.png", seed)
    source = FolderSource().load(str(root))
    plain = prepare(source, SIZE, val_fraction=0.3, seed=0)
    cache = PixelCache(tmp_path / "cache")
    cached = prepare(source, SIZE, val_fraction=0.3, seed=0, cache=cache)
    again = prepare(source, SIZE, val_fraction=0.3, seed=0, cache=cache)
    for data in (cached, again):
        for split in ("train", "val", "test"):
            mine, theirs = getattr(data, split), getattr(plain, split)
            if theirs is None:
                assert mine is None
                continue
            assert torch.equal(mine.images, theirs.images) and torch.equal(mine.labels, theirs.labels)
    entries = sorted(p.name for p in cache.folder.iterdir() if not p.name.startswith("."))
    assert len(entries) == (2 if layout == "val carved from train" else 1)  # a split-ordered copy when carved


@pytest.mark.slow
def test_search_reads_the_cache_on_a_rerun_and_no_data_cache_writes_none(tmp_path):
    args = ["search", "--dataset", "builtin:digits:0-2", "--backbones", "test_resnet", "--no-pretrained",
            "--image-size", "16", "--epochs", "1", "--no-portfolio", "--trials", "1"]
    first = run_cli(*args, "--out", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    assert "into the data cache" in first.stderr and (tmp_path / "one" / "data-cache").is_dir()
    shared = run_cli(*args, "--out", str(tmp_path / "two"), "--data-cache", str(tmp_path / "one" / "data-cache"))
    assert shared.returncode == 0, shared.stderr
    assert "from the data cache" in shared.stderr and "into the data cache" not in shared.stderr
    off = run_cli(*args, "--out", str(tmp_path / "three"), "--no-data-cache")
    assert off.returncode == 0, off.stderr
    assert "data cache" not in off.stderr and not (tmp_path / "three" / "data-cache").exists()
