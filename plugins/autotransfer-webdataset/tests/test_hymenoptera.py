"""The real hymenoptera ImageFolder (../shared beside the checkout) survives sharding: same images per split.

Skipped when ../shared/datasets/hymenoptera is absent.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from autotransfer_webdataset import WebDatasetSource, write_shards

SHARED = Path(__file__).resolve().parents[3].parent / "shared"  # the repository's ../shared
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} is absent (no ../shared beside the checkout)"),
]


def _folder_counts() -> dict[tuple[str, str], int]:
    return {(split.name, cls.name): sum(1 for f in cls.iterdir() if f.is_file() and not f.name.startswith("."))
            for split in HYMENOPTERA.iterdir() if split.is_dir()
            for cls in split.iterdir() if cls.is_dir()}


def test_hymenoptera_shards_hold_every_image(tmp_path):
    summary = write_shards(HYMENOPTERA, tmp_path / "shards", samples_per_shard=100)
    assert summary.skipped == []
    refs = WebDatasetSource().load(str(tmp_path / "shards"))
    expected = _folder_counts()
    assert refs.class_names == sorted({cls for _, cls in expected})
    found = Counter((split, refs.class_names[label]) for split, label in zip(refs.splits.tolist(), refs.labels))
    assert dict(found) == expected
    assert summary.counts == {split: sum(n for (s, _), n in expected.items() if s == split) for split in ("train", "val")}
    total_bytes = sum(f.stat().st_size for f in HYMENOPTERA.rglob("*") if f.is_file() and not f.name.startswith("."))
    assert sum(len(data) for data in refs.refs) == total_bytes  # every file, byte for byte
