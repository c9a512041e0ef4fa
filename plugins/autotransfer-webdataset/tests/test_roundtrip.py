"""Writing shards and reading them back gives the same images, labels, class names and splits."""

from __future__ import annotations

import json
import runpy
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from wds_helpers import CLASSES, decode, tiny_png, write_tar

from autotransfer.data import FolderSource, decode_image
from autotransfer_webdataset import WebDatasetSource, write_shards
from autotransfer_webdataset.make_shards import main as make_shards_main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"


def test_image_folder_round_trip(image_folder, shard_folder):
    root, pixels = image_folder
    assert (shard_folder / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert sorted(p.name for p in shard_folder.glob("*.tar")) == [
        f"{split}-{n:06d}.tar" for split in ("train", "val") for n in range(3)]

    loaded = WebDatasetSource().load(str(shard_folder))
    expected = FolderSource().load(str(root))  # unshuffled shards keep the folder source's order
    assert loaded.name == "shards"
    assert loaded.class_names == expected.class_names == list(CLASSES)
    assert loaded.labels.tolist() == expected.labels.tolist()
    assert loaded.splits.tolist() == expected.splits.tolist() == ["train"] * 6 + ["val"] * 6
    for data, path in zip(loaded.refs, expected.refs):
        assert isinstance(data, bytes)
        assert data == path.read_bytes()  # files are copied byte for byte
        original = pixels[path.relative_to(root).as_posix()]
        if path.suffix == ".png":
            assert np.array_equal(decode(data), original)  # lossless: the exact pixels
        else:
            assert decode(data).shape == original.shape
            assert np.abs(decode(data).astype(int) - original).mean() < 6  # JPEG: close, not exact
    sizes = {decode(data).shape[:2] for data in loaded.refs}
    assert len(sizes) == 12  # every image has its own size
    assert decode_image(loaded.refs[0], 16).shape == (3, 16, 16)  # what the core does with the bytes


def test_shuffled_shards_hold_the_same_samples(image_folder, tmp_path):
    root, _ = image_folder
    plain = WebDatasetSource().load(str(_shards(root, tmp_path / "plain", shuffle=False)))
    mixed = WebDatasetSource().load(str(_shards(root, tmp_path / "mixed", shuffle=True, seed=3)))

    def pairs(refs, split):
        return sorted((d, int(l)) for d, l, s in zip(refs.refs, refs.labels, refs.splits) if s == split)

    for split in ("train", "val"):
        assert pairs(plain, split) == pairs(mixed, split)  # shuffling stays within a split
    assert plain.refs != mixed.refs


def _shards(root, out, **options) -> Path:
    write_shards(root, out, samples_per_shard=4, **options)
    return out


def test_members_carry_cls_and_source(shard_folder):
    with tarfile.open(shard_folder / "val-000000.tar") as archive:
        names = archive.getnames()
        assert names == ["000000.png", "000000.cls", "000000.json", "000001.jpg", "000001.cls", "000001.json"]
        assert archive.extractfile("000000.cls").read() == b"0"
        assert json.loads(archive.extractfile("000001.json").read()) == {"source": "val/cat/cat1.jpg"}
    assert not list(shard_folder.glob("*.partial"))


def test_digits_are_png_encoded_and_upscaled(tmp_path):
    from sklearn.datasets import load_digits

    from autotransfer.data import BuiltinSource

    summary = write_shards("builtin:digits", tmp_path / "digits", samples_per_shard=1000, upscale=4, shuffle=False)
    assert [p.name for p in summary.shards] == ["train-000000.tar", "train-000001.tar", "test-000000.tar"]
    assert summary.counts == {"train": 1437, "test": 360}  # the built-in digits' fixed test split travels along
    loaded = WebDatasetSource().load(str(tmp_path / "digits"))
    assert sorted(set(loaded.splits.tolist())) == ["test", "train"]  # no val shards: the core carves val from train
    assert loaded.class_names == [str(d) for d in range(10)]
    digits, splits = load_digits(), BuiltinSource().load("builtin:digits").splits
    for split in ("train", "test"):
        assert loaded.labels[loaded.splits == split].tolist() == digits.target[splits == split].tolist()
    first = int(np.flatnonzero(splits == "train")[5])
    expected = np.round(digits.images[first] * (255 / 16)).astype(np.uint8)
    fifth = loaded.refs[int(np.flatnonzero(loaded.splits == "train")[5])]
    assert np.array_equal(decode(fifth), np.kron(expected, np.ones((4, 4), dtype=np.uint8)))


# --------------------------------------------------------------------------- label forms in hand-written shards

def test_text_and_json_labels_are_class_names(tmp_path):
    write_tar(tmp_path / "a.tar", {
        "k1.jpg": tiny_png(1), "k1.txt": b"zebra\n",
        "k2.png": tiny_png(2), "k2.label": b"ant",
        "k3.webp": tiny_png(3), "k3.json": json.dumps({"label": "zebra", "w": 3}).encode(),
        "k4.PNG": tiny_png(4), "k4.json": json.dumps({"label": "bee"}).encode(),
    })
    loaded = WebDatasetSource().load(str(tmp_path / "a.tar"))
    assert loaded.class_names == ["ant", "bee", "zebra"]  # names sorted
    assert loaded.labels.tolist() == [2, 0, 2, 1]
    assert loaded.refs[3] == tiny_png(4)  # upper-case extensions count


def test_integer_labels_without_classes_file_are_named_by_number(tmp_path):
    write_tar(tmp_path / "a.tar", {
        "a.png": tiny_png(), "a.cls": b"10", "b.png": tiny_png(), "b.cls": b" 2\n",
        "c.png": tiny_png(), "c.json": b'{"label": 9}',
    })
    loaded = WebDatasetSource().load(str(tmp_path / "a.tar"))
    assert loaded.class_names == ["2", "9", "10"]  # numeric order, dense indices
    assert loaded.labels.tolist() == [2, 0, 1]


def test_classes_file_maps_indices_and_names(tmp_path):
    (tmp_path / "classes.txt").write_text("bee\nant\nwasp\n\n")
    write_tar(tmp_path / "train-0.tar", {"x.png": tiny_png(), "x.cls": b"2", "y.png": tiny_png(), "y.txt": b"ant"})
    loaded = WebDatasetSource().load(str(tmp_path / "train-0.tar"))
    assert loaded.class_names == ["bee", "ant", "wasp"]  # line i is class i, unused classes kept
    assert loaded.labels.tolist() == [2, 1]


def test_grouping_skips_hidden_and_extra_members_and_takes_the_first_image(tmp_path):
    write_tar(tmp_path / "a.tar", {
        "dir/s1.cls": b"0", "dir/s1.png": tiny_png(10), "dir/s1.mask.png": tiny_png(99), "dir/s1.npy": b"\0" * 9,
        "._s1.png": b"apple double", "README": b"no extension",
        "dir/s2.seg.jpg": tiny_png(20), "dir/s2.cls": b"1",
        "dir/s3.png": tiny_png(30), "dir/s3.cls": b"1",
    })
    loaded = WebDatasetSource().load(str(tmp_path / "a.tar"))
    assert loaded.refs == [tiny_png(10), tiny_png(20), tiny_png(30)]
    assert loaded.labels.tolist() == [0, 1, 1]


# --------------------------------------------------------------------------- the generator script

def test_script_writes_shards_and_refuses_to_mix_with_old_ones(image_folder, tmp_path, capsys, monkeypatch):
    root, _ = image_folder
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(root), str(out), "--samples-per-shard", "4"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exited.value.code == 0
    assert "wrote 12 samples (train 6, val 6) of 3 classes in 4 shard(s)" in capsys.readouterr().out

    assert make_shards_main([str(root), str(out), "--samples-per-shard", "100"]) == 2
    error = capsys.readouterr().err
    assert "already holds 4 shard(s)" in error and "--overwrite" in error and error.count("\n") == 1
    assert make_shards_main([str(root), str(out), "--samples-per-shard", "100", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


@pytest.mark.parametrize("args, message", [
    (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
    (["--upscale", "0"], "--upscale must be at least 1"),
])
def test_script_rejects_bad_numbers(tmp_path, capsys, args, message):
    assert make_shards_main(["builtin:digits", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


def test_script_rejects_a_missing_source(tmp_path, capsys):
    assert make_shards_main([str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "in" / cls).mkdir(parents=True)
        (tmp_path / "in" / cls / "x.png").write_bytes(tiny_png())
    (tmp_path / "in" / "a" / "notes.doc").write_bytes(b"not an image")
    summary = write_shards(tmp_path / "in", tmp_path / "out")
    assert summary.counts == {"shard": 2}
    assert summary.skipped == [str(tmp_path / "in" / "a" / "notes.doc")]
    assert "skipped 1 unreadable file(s)" in summary.describe()
