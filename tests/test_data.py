"""Dataset sources, decoding, preparation (in memory and streamed), transforms and batching.

Everything here runs on small images written to tmp_path, so the whole file takes seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import autotransfer.data as data
from autotransfer.data import (BuiltinSource, CsvSource, FolderSource, ImageSet, LabelledRefs, StreamedView,
                               decode_image, eval_transform, normalise, prepare, train_transform)
from autotransfer.errors import UserError

SIZE = 16
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- helpers

def _noise(seed: int, shape=(SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def _save(path: Path, seed: int, shape=(SIZE, SIZE)) -> Path:
    """A lossless random RGB image: every file is distinct, so decoded tensors identify it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(seed, shape)).save(path)
    return path


def _class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, list[Path]]:
    files = {}
    for c, (name, count) in enumerate(counts.items()):
        files[name] = [_save(root / name / f"{name}_{i:03d}.png", seed + 1000 * c + i) for i in range(count)]
    return files


def _tensor_keys(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def _all_batches(image_set: ImageSet, batch_size: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(image_set.batches(batch_size, **kwargs))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _skip_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "autotransfer.data" and "unreadable" in r.getMessage()]


# --------------------------------------------------------------------------- FolderSource

@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_folder_source_with_split_dirs(tmp_path, val_name):
    _class_folders(tmp_path / "train", {"ants": 3, "bees": 4})
    _class_folders(tmp_path / val_name, {"ants": 2, "bees": 1}, seed=50_000)

    refs = FolderSource().load(str(tmp_path))

    assert refs.class_names == ["ants", "bees"]
    assert len(refs.refs) == 10
    assert sorted(refs.splits.tolist()) == ["train"] * 7 + ["val"] * 3
    for ref, label, split in zip(refs.refs, refs.labels, refs.splits):
        assert ref.parent.name == refs.class_names[label]
        assert {"train": "train", val_name: "val"}[ref.parent.parent.name] == split

    prepared = prepare(refs, SIZE, val_fraction=0.5, seed=0)  # the folders' split wins over val_fraction
    assert (len(prepared.train), len(prepared.val)) == (7, 3)
    assert torch.bincount(prepared.val.labels).tolist() == [2, 1]
    expected_val = torch.stack([decode_image(r, SIZE) for r, s in zip(refs.refs, refs.splits) if s == "val"])
    assert _tensor_keys(prepared.val.images) == _tensor_keys(expected_val)
    assert prepared.skipped == []
    assert prepared.num_classes == 2


def test_folder_source_union_of_class_names_across_splits(tmp_path):
    _class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _class_folders(tmp_path / "val", {"b": 1, "a": 1}, seed=99)
    refs = FolderSource().load(str(tmp_path))
    assert refs.class_names == ["a", "b"]
    assert refs.name == tmp_path.name


def test_folder_source_plain_classes_stratified_seeded_split(tmp_path):
    counts = {"a": 10, "b": 20, "c": 30}
    _class_folders(tmp_path, counts)
    refs = FolderSource().load(str(tmp_path))
    assert refs.splits is None
    assert refs.class_names == ["a", "b", "c"]

    first = prepare(refs, SIZE, val_fraction=0.2, seed=1)
    assert (len(first.train), len(first.val)) == (48, 12)
    # Stratified: each class keeps its share of the validation split.
    assert torch.bincount(first.val.labels, minlength=3).tolist() == [2, 4, 6]
    assert torch.bincount(first.train.labels, minlength=3).tolist() == [8, 16, 24]
    # Train and val are disjoint and together hold every image.
    train_keys, val_keys = _tensor_keys(first.train.images), _tensor_keys(first.val.images)
    assert not train_keys & val_keys
    assert len(train_keys | val_keys) == 60

    again = prepare(refs, SIZE, val_fraction=0.2, seed=1)
    assert torch.equal(again.val.images, first.val.images)
    assert torch.equal(again.val.labels, first.val.labels)
    assert torch.equal(again.train.images, first.train.images)

    other = prepare(refs, SIZE, val_fraction=0.2, seed=2)
    assert torch.bincount(other.val.labels, minlength=3).tolist() == [2, 4, 6]
    assert _tensor_keys(other.val.images) != val_keys


def test_stratified_split_gives_every_class_a_val_image(tmp_path):
    # ceil(0.1 * 6) = 1 val image would leave two classes unvalidated; the split takes one per class.
    _class_folders(tmp_path, {"a": 2, "b": 2, "c": 2})
    prepared = prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.1, seed=0)
    assert torch.bincount(prepared.val.labels, minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(prepared.train.labels, minlength=3).tolist() == [1, 1, 1]


# --------------------------------------------------------------------------- CsvSource

def _images_for_csv(root: Path) -> list[tuple[str, str]]:
    rows = []
    for i in range(8):
        label = "cat" if i % 2 else "dog"
        _save(root / "imgs" / f"{label}{i}.png", 300 + i)
        rows.append((f"imgs/{label}{i}.png", label))
    return rows


def test_csv_source_without_split(tmp_path):
    rows = _images_for_csv(tmp_path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l in rows))

    source = CsvSource()
    assert source.can_load(str(manifest))
    refs = source.load(str(manifest))

    assert refs.name == "manifest"
    assert refs.class_names == ["cat", "dog"]
    assert refs.splits is None
    assert [Path(r) for r in refs.refs] == [tmp_path / p for p, _ in rows]  # relative to the CSV
    assert all(Path(r).is_file() for r in refs.refs)
    assert refs.labels.tolist() == [refs.class_names.index(l) for _, l in rows]

    prepared = prepare(refs, SIZE, val_fraction=0.25, seed=0)
    assert (len(prepared.train), len(prepared.val)) == (6, 2)
    assert torch.bincount(prepared.val.labels).tolist() == [1, 1]


def test_csv_source_paths_relative_to_csv_not_cwd(tmp_path, monkeypatch):
    rows = _images_for_csv(tmp_path / "data")
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{l}\n" for p, l in rows))
    monkeypatch.chdir(tmp_path)
    refs = CsvSource().load("data/list.csv")
    prepared = prepare(refs, SIZE, val_fraction=0.25, seed=0)
    assert prepared.skipped == []
    assert len(prepared.train) + len(prepared.val) == 8


def test_csv_source_with_split_column(tmp_path):
    rows = _images_for_csv(tmp_path)
    splits = ["train", "TRAIN", "train", "valid", "train", "Validation", "train", "val"]
    manifest = tmp_path / "m.csv"
    # BOM and padded header names are tolerated.
    manifest.write_text("\ufeff path , label , split \n" + "".join(f"{p}, {l} ,{s}\n" for (p, l), s in zip(rows, splits)),
                        encoding="utf-8")
    refs = CsvSource().load(str(manifest))
    assert refs.splits.tolist() == ["train"] * 3 + ["val", "train", "val", "train", "val"]

    prepared = prepare(refs, SIZE, val_fraction=0.9, seed=0)  # given splits override val_fraction
    assert (len(prepared.train), len(prepared.val)) == (5, 3)
    expected_val = torch.stack([decode_image(tmp_path / rows[i][0], SIZE) for i in (3, 5, 7)])
    assert torch.equal(prepared.val.images, expected_val)
    assert prepared.val.labels.tolist() == [refs.class_names.index(rows[i][1]) for i in (3, 5, 7)]


@pytest.mark.parametrize("header, missing", [("file,label", "path"), ("path,class", "label"),
                                             ("path", "label"), ("name,kind", "path, label")])
def test_csv_source_missing_column(tmp_path, header, missing):
    manifest = tmp_path / "bad.csv"
    manifest.write_text(header + "\nx.png,a\n")
    with pytest.raises(UserError, match=f"lacks column\\(s\\) {missing} "):
        CsvSource().load(str(manifest))


def test_csv_source_empty_file_names_both_columns(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("")
    with pytest.raises(UserError, match="path, label"):
        CsvSource().load(str(manifest))


def test_csv_source_bad_split_values(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\na.png,x,train\nb.png,y,test\nc.png,y,holdout\nd.png,x,eval\n")
    with pytest.raises(UserError, match="unknown split value\\(s\\) 'eval', 'holdout'") as info:
        CsvSource().load(str(manifest))
    assert "train, val or test" in str(info.value)


def test_csv_source_header_only(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(UserError, match="no rows"):
        CsvSource().load(str(manifest))


# --------------------------------------------------------------------------- BuiltinSource

def test_builtin_digits():
    source = BuiltinSource()
    assert source.can_load("builtin:digits")
    refs = source.load("builtin:digits")
    assert len(refs.refs) == 1797
    assert refs.class_names == [str(i) for i in range(10)]
    assert sorted(np.unique(refs.labels).tolist()) == list(range(10))
    assert all(isinstance(r, np.ndarray) and r.dtype == np.uint8 and r.shape == (8, 8) for r in refs.refs[:20])
    assert max(int(r.max()) for r in refs.refs) == 255

    prepared = prepare(refs, 8, val_fraction=0.2, seed=0)
    assert prepared.num_classes == 10
    assert len(prepared.train) + len(prepared.val) + len(prepared.test) == 1797
    assert len(prepared.test) == 360  # the fixed carve: 20% of 1797, stratified
    assert len(prepared.val) == 288  # ceil(0.2 * 1437), carved from the rest by --seed
    assert prepared.train.images.shape == (1149, 3, 8, 8) and prepared.train.images.dtype == torch.uint8
    # Greyscale: the three channels are identical.
    assert torch.equal(prepared.train.images[:, 0], prepared.train.images[:, 2])
    assert prepared.skipped == []


@pytest.mark.parametrize("uri", ["builtin:mnist", "builtin:", "builtin:Digits"])
def test_builtin_unknown(uri):
    with pytest.raises(UserError, match=f"unknown built-in dataset {uri!r}"):
        BuiltinSource().load(uri)


# --------------------------------------------------------------------------- image modes

def _base_rgb() -> Image.Image:
    return Image.fromarray(_noise(7))


def _write_mode(path: Path, mode: str) -> Path:
    """Write one image of `mode`; return the path. Raises pytest.skip when PIL cannot write it."""
    rgb = _base_rgb()
    if mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    elif mode == "P-transparent":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        image.save(path, transparency=int(np.asarray(image)[0, 0]))
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path.with_suffix(".tif"))
        return path.with_suffix(".tif")
    elif mode == "CMYK-jpeg":
        rgb.convert("CMYK").save(path.with_suffix(".jpg"), quality=95)
        return path.with_suffix(".jpg")
    elif mode == "RGBA":
        alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
        alpha[:, : SIZE // 2] = 0  # left half fully transparent
        image = rgb.copy()
        image.putalpha(Image.fromarray(alpha))
        image.save(path)
    elif mode == "LA":
        image = rgb.convert("LA")
        image.save(path)
    elif mode == "I;16":
        grey = np.asarray(rgb.convert("L")).astype(np.uint16) * 257  # 0..255 -> 0..65535
        image = Image.fromarray(grey)
        if image.mode != "I;16":
            image = Image.fromarray(grey, mode="I;16")
        try:
            image.save(path)
        except OSError:
            pytest.skip("this PIL cannot write 16-bit PNG")
    else:
        rgb.convert(mode).save(path)
    return path


MODES = ["L", "P", "P-transparent", "RGBA", "CMYK", "CMYK-jpeg", "LA", "I;16", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_decode_image_modes_become_uint8_rgb(tmp_path, mode):
    path = _write_mode(tmp_path / "img.png", mode)
    for size in (SIZE, 8, 24):
        tensor = decode_image(path, size)
        assert tensor.shape == (3, size, size)
        assert tensor.dtype == torch.uint8
    tensor = decode_image(path, SIZE)
    rgb = torch.from_numpy(_noise(7)).permute(2, 0, 1)
    grey = torch.from_numpy(np.asarray(_base_rgb().convert("L")).copy())
    if mode in ("L", "LA", "I;16"):
        # Grey stays grey, with its 8-bit values (16-bit data is scaled, not clipped to white).
        for channel in tensor:
            assert (channel.int() - grey.int()).abs().max() <= 1
    elif mode == "CMYK":
        assert torch.equal(tensor, rgb)
    elif mode == "CMYK-jpeg":
        assert (tensor.float() - rgb.float()).abs().mean() < 40
    elif mode == "RGBA":
        assert (tensor[:, :, : SIZE // 2] == 255).all()  # transparent -> white background
        assert torch.equal(tensor[:, :, SIZE // 2:], rgb[:, :, SIZE // 2:])
    elif mode == "P-transparent":
        assert (tensor[:, 0, 0] == 255).all()
    elif mode == "P":
        assert (tensor.float() - rgb.float()).abs().mean() < 30  # adaptive palette: close to the original
    elif mode == "1":
        assert set(tensor.unique().tolist()) <= {0, 255}


def test_decode_image_non_square_short_side_and_centre_crop(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 200  # the centre 20x20 square is bright, the side bands dark
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    tensor = decode_image(path, 20)  # short side already 20: a pure centre crop
    assert tensor.shape == (3, 20, 20)
    assert (tensor == 200).all()
    small = decode_image(path, 10)
    assert small.shape == (3, 10, 10)
    assert (small[:, :, 2:8] == 200).all()  # the interior; the edges blend with the cropped bands
    assert torch.equal(decode_image(array, 10), small)  # arrays and files decode alike


@pytest.mark.parametrize("memory_budget", [None, 0])
def test_prepare_decodes_every_mode(tmp_path, memory_budget):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for mode in MODES:
            _write_mode(tmp_path / name / f"{mode.replace(';', '')}.png", mode)
    refs = FolderSource().load(str(tmp_path))
    assert len(refs.refs) == 2 * len(MODES)
    prepared = prepare(refs, SIZE, val_fraction=0.25, seed=0, memory_budget=memory_budget)
    assert prepared.skipped == []
    images, labels = _all_batches(prepared.train, 4, shuffle=False)
    assert images.shape == (len(prepared.train), 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert len(prepared.train) + len(prepared.val) == 2 * len(MODES)
    expected = _tensor_keys(torch.stack([decode_image(r, SIZE) for r in refs.refs]))
    assert _tensor_keys(images) <= expected


# --------------------------------------------------------------------------- unreadable files

def _placeholder_gif(path: Path) -> Path:
    """Like hymenoptera's imageNotFound.gif: a small palette GIF with text on it."""
    image = Image.new("P", (40, 30), color=0)
    image.putpalette([255, 255, 255, 200, 0, 0] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(image).text((2, 8), "N/A", fill=1)
    image.save(path, transparency=0)
    return path


def _dataset_with_bad_files(root: Path) -> list[Path]:
    _class_folders(root, {"ants": 3, "bees": 3})
    (root / "ants" / "notes.txt").write_text("not an image\n")
    good_jpeg = root / "bees" / "whole.jpg"
    Image.fromarray(_noise(11, (64, 64))).save(good_jpeg, quality=90)
    payload = good_jpeg.read_bytes()
    good_jpeg.unlink()
    (root / "bees" / "cut.jpg").write_bytes(payload[: len(payload) // 2])
    (root / "bees" / "empty.png").write_bytes(b"")
    _placeholder_gif(root / "ants" / "imageNotFound.gif")
    return [root / "ants" / "notes.txt", root / "bees" / "cut.jpg", root / "bees" / "empty.png"]


@pytest.mark.parametrize("memory_budget", [None, 0])
def test_unreadable_files_skipped_with_one_warning(tmp_path, caplog, memory_budget):
    bad = _dataset_with_bad_files(tmp_path)
    refs = FolderSource().load(str(tmp_path))
    assert len(refs.refs) == 10

    with caplog.at_level(logging.WARNING, logger="autotransfer.data"):
        prepared = prepare(refs, SIZE, val_fraction=0.3, seed=0, memory_budget=memory_budget)

    records = _skip_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "skipped 3 " in message
    for path in bad:
        assert path.name in message
    assert sorted(prepared.skipped) == sorted(str(p) for p in bad)
    assert "imageNotFound.gif" not in message
    assert len(prepared.train) + len(prepared.val) == 7  # 6 PNGs + the placeholder GIF

    # Every kept image really decodes, also when the streamed path decodes them in workers.
    images = torch.cat([_all_batches(prepared.train, 3, shuffle=False)[0],
                        _all_batches(prepared.val, 3, shuffle=False)[0]])
    assert images.shape == (7, 3, SIZE, SIZE)
    gif = decode_image(tmp_path / "ants" / "imageNotFound.gif", SIZE)
    assert gif.numpy().tobytes() in _tensor_keys(images)


def test_skip_warning_names_only_the_first_three(tmp_path, caplog):
    _class_folders(tmp_path, {"a": 3, "b": 3})
    for i in range(5):
        (tmp_path / "a" / f"junk{i}.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="autotransfer.data"):
        prepared = prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.3, seed=0)
    records = _skip_records(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "skipped 5 " in message
    assert all(f"junk{i}.txt" in message for i in range(3))
    assert "junk3.txt" not in message and "junk4.txt" not in message
    assert message.endswith(", ...")
    assert len(prepared.skipped) == 5


def test_no_warning_when_all_readable(tmp_path, caplog):
    _class_folders(tmp_path, {"a": 3, "b": 3})
    with caplog.at_level(logging.WARNING, logger="autotransfer.data"):
        prepared = prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.3, seed=0)
    assert _skip_records(caplog) == []
    assert prepared.skipped == []


# --------------------------------------------------------------------------- errors

def test_error_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no class folders"):
        FolderSource().load(str(tmp_path))


def test_error_class_folders_without_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="no files found"):
        FolderSource().load(str(tmp_path))


def test_error_no_readable_images(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("hello")
        (tmp_path / name / "data.csv").write_text("1,2\n")
    refs = FolderSource().load(str(tmp_path))
    with pytest.raises(UserError, match=r"no readable images \(4 files tried\)"):
        prepare(refs, SIZE, val_fraction=0.2, seed=0)
    with pytest.raises(UserError, match="no readable images"):
        prepare(refs, SIZE, val_fraction=0.2, seed=0, memory_budget=0)


def test_error_empty_refs():
    with pytest.raises(UserError, match="holds no images"):
        prepare(LabelledRefs("x", [], np.array([]), ["a", "b"]), SIZE, val_fraction=0.2, seed=0)


def test_error_single_class_plain(tmp_path):
    _class_folders(tmp_path, {"only": 4})
    with pytest.raises(UserError, match=r"single class \('only'\)") as info:
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.25, seed=0)
    assert f"dataset {tmp_path.name!r}" in str(info.value)  # names the dataset, not a placeholder


def test_error_single_class_with_split_dirs(tmp_path):
    _class_folders(tmp_path / "train", {"only": 3})
    _class_folders(tmp_path / "val", {"only": 1}, seed=77)
    with pytest.raises(UserError, match=r"single class \('only'\)"):
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.25, seed=0)


def test_error_single_readable_class(tmp_path):
    # Two class folders, but every file of the second is unreadable: still only one class.
    _class_folders(tmp_path, {"a": 4})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"")
    (tmp_path / "b" / "y.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"single class \('a'\)"):
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.25, seed=0)


def test_error_class_only_in_val(tmp_path):
    _class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _class_folders(tmp_path / "val", {"a": 1, "b": 1, "zebra": 2}, seed=500)
    refs = FolderSource().load(str(tmp_path))
    assert refs.class_names == ["a", "b", "zebra"]
    with pytest.raises(UserError, match="zebra .*no training images"):
        prepare(refs, SIZE, val_fraction=0.2, seed=0)


def test_error_split_dirs_without_readable_val(tmp_path):
    _class_folders(tmp_path / "train", {"a": 2, "b": 2})
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a" / "broken.png").write_bytes(b"")
    with pytest.raises(UserError, match="no validation images"):
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.2, seed=0)


def test_error_class_with_single_image_needs_split(tmp_path):
    _class_folders(tmp_path, {"common": 5, "rare": 1})
    with pytest.raises(UserError, match="class 'rare' has a single readable image"):
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.2, seed=0)


def test_single_image_class_is_fine_with_given_splits(tmp_path):
    _class_folders(tmp_path / "train", {"common": 3, "rare": 1})
    _class_folders(tmp_path / "val", {"common": 1}, seed=900)
    prepared = prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.2, seed=0)
    assert (len(prepared.train), len(prepared.val)) == (4, 1)


@pytest.mark.parametrize("val_fraction", [0.7, 0.95])
def test_error_val_fraction_leaves_too_few_training_images(tmp_path, val_fraction):
    _class_folders(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2})
    with pytest.raises(UserError, match="--val-fraction"):
        prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=val_fraction, seed=0)


# --------------------------------------------------------------------------- streamed fallback

def test_streamed_fallback_matches_in_memory(tmp_path, caplog):
    _class_folders(tmp_path / "train", {"a": 4, "b": 3}, seed=1)
    _class_folders(tmp_path / "val", {"a": 2, "b": 2}, seed=2000)
    # Non-square files of various sizes, so decoding really resizes and crops.
    _save(tmp_path / "train" / "a" / "wide.png", 42, shape=(20, 33))
    _save(tmp_path / "train" / "b" / "tall.png", 43, shape=(40, 17))
    refs = FolderSource().load(str(tmp_path))

    cached = prepare(refs, SIZE, val_fraction=0.2, seed=0)
    with caplog.at_level(logging.WARNING, logger="autotransfer.data"):
        streamed = prepare(refs, SIZE, val_fraction=0.2, seed=0, memory_budget=0)
    assert any("cache budget" in r.getMessage() for r in caplog.records)

    assert cached.train.in_memory and cached.val.in_memory
    assert not streamed.train.in_memory and not streamed.val.in_memory
    assert isinstance(streamed.train, StreamedView)
    assert streamed.skipped == cached.skipped == []

    for split in ("train", "val"):
        mem_set, str_set = getattr(cached, split), getattr(streamed, split)
        assert len(mem_set) == len(str_set)
        mem_batches = list(mem_set.batches(3, shuffle=False))
        str_batches = list(str_set.batches(3, shuffle=False))
        assert [len(b[1]) for b in mem_batches] == [len(b[1]) for b in str_batches]
        for (mi, ml), (si, sl) in zip(mem_batches, str_batches):
            assert si.dtype == torch.uint8 and sl.dtype == torch.int64
            assert torch.equal(mi, si)
            assert torch.equal(ml, sl)

        small_mem, small_str = mem_set.at_size(10), str_set.at_size(10)
        assert small_mem.in_memory and not small_str.in_memory
        assert mem_set.at_size(10) is small_mem  # cached
        mem_images, mem_labels = _all_batches(small_mem, 4, shuffle=False)
        str_images, str_labels = _all_batches(small_str, 4, shuffle=False)
        assert mem_images.shape == (len(mem_set), 3, 10, 10)
        assert torch.equal(mem_labels, str_labels)
        assert (mem_images.int() - str_images.int()).abs().max() <= 1
        assert mem_set.at_size(SIZE) is mem_set and str_set.at_size(SIZE) is str_set


def test_streamed_shuffled_batches_cover_items_and_drop_single(tmp_path):
    _class_folders(tmp_path / "train", {"a": 3, "b": 2}, seed=1)
    _class_folders(tmp_path / "val", {"a": 1, "b": 1}, seed=2000)
    streamed = prepare(FolderSource().load(str(tmp_path)), SIZE, val_fraction=0.2, seed=0, memory_budget=0)
    sizes = [len(b[1]) for b in streamed.train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert sizes == [4]  # 5 = 4 + a final batch of one, dropped
    images, _ = _all_batches(streamed.train, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(_tensor_keys(images)) == 5


# --------------------------------------------------------------------------- transforms

def test_eval_transform_centre_crop_and_normalise():
    images = torch.arange(2 * 3 * 7 * 7, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 7, 7)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    out = eval_transform(images, 4, mean, std)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    crop = images[:, :, 1:5, 1:5].double() / 255.0  # offset (7 - 4) // 2 = 1
    expected = (crop - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # One value by hand: image 0, channel 1, crop (0, 0) is source pixel (1, 1) = 49 + 8 = 57.
    assert images[0, 1, 1, 1].item() == 57
    assert out[0, 1, 0, 0].item() == pytest.approx((57 / 255 - 0.25) / 0.25, abs=1e-5)


def test_eval_transform_known_values():
    images = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    images[:, :, 1:3, 1:3] = 255
    out = eval_transform(images, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert torch.allclose(out, torch.ones((1, 3, 2, 2)))
    out = eval_transform(images, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out[0, 0, 0, 0].item() == pytest.approx(-1.0)
    assert out[0, 0, 1, 1].item() == pytest.approx(1.0)


def test_eval_transform_same_size_is_plain_normalise():
    images = torch.from_numpy(_noise(3)).permute(2, 0, 1)[None]
    assert torch.equal(eval_transform(images, SIZE, MEAN, STD), normalise(images, MEAN, STD))


def test_train_transform_shape_dtype_and_determinism():
    images = torch.stack([torch.from_numpy(_noise(i, (24, 24))).permute(2, 0, 1) for i in range(6)])
    out = train_transform(images, 16, MEAN, STD, generator=torch.Generator().manual_seed(3))
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    again = train_transform(images, 16, MEAN, STD, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = train_transform(images, 16, MEAN, STD, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)
    # Values stay within the normalised range of uint8 inputs (bilinear never overshoots).
    low = normalise(torch.zeros((1, 3, 1, 1), dtype=torch.uint8), MEAN, STD)
    high = normalise(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), MEAN, STD)
    assert (out >= low - 1e-4).all() and (out <= high + 1e-4).all()


def test_train_transform_pinned_scale_is_identity_up_to_flip(monkeypatch):
    monkeypatch.setattr(data.transforms, "TRAIN_SCALE", (1.0, 1.0))
    monkeypatch.setattr(data.transforms, "TRAIN_RATIO", (1.0, 1.0))
    images = torch.stack([torch.from_numpy(_noise(i, (12, 12))).permute(2, 0, 1) for i in range(16)])
    out = train_transform(images, 12, MEAN, STD, generator=torch.Generator().manual_seed(0))
    plain = normalise(images, MEAN, STD)
    mirrored = normalise(images.flip(-1), MEAN, STD)
    flips = []
    for i in range(len(images)):
        same = (out[i] - plain[i]).abs().max().item() < 1e-3
        flipped = (out[i] - mirrored[i]).abs().max().item() < 1e-3
        assert same or flipped, f"image {i} is neither the input nor its mirror"
        flips.append(flipped)
    assert any(flips) and not all(flips)  # both cases occur for this seed


def test_train_transform_default_scale_changes_images():
    images = torch.stack([torch.from_numpy(_noise(i, (12, 12))).permute(2, 0, 1) for i in range(8)])
    out = train_transform(images, 12, MEAN, STD, generator=torch.Generator().manual_seed(0))
    plain, mirrored = normalise(images, MEAN, STD), normalise(images.flip(-1), MEAN, STD)
    changed = [(out[i] - plain[i]).abs().max() > 1e-2 and (out[i] - mirrored[i]).abs().max() > 1e-2
               for i in range(8)]
    assert any(changed)


# --------------------------------------------------------------------------- batching

def _image_set(n: int) -> ImageSet:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return ImageSet(torch.arange(n), images=images, decode_size=2)


def test_batches_drop_final_training_batch_of_one():
    image_set = _image_set(5)
    batches = list(image_set.batches(2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in batches] == [2, 2]
    for images, labels in batches:
        assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images stay paired with labels


def test_batches_cover_all_items_otherwise():
    image_set = _image_set(5)
    ordered = list(image_set.batches(2, shuffle=False))
    assert [len(labels) for _, labels in ordered] == [2, 2, 1]  # evaluation keeps the single last item
    assert torch.cat([labels for _, labels in ordered]).tolist() == [0, 1, 2, 3, 4]

    shuffled = list(image_set.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in shuffled] == [3, 2]
    labels = torch.cat([labels for _, labels in shuffled])
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4]
    for images, batch_labels in shuffled:
        assert torch.equal(images[:, 0, 0, 0].long(), batch_labels)

    exact = list(image_set.batches(5, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert len(exact) == 1 and sorted(exact[0][1].tolist()) == [0, 1, 2, 3, 4]


def test_batches_shuffle_is_seeded():
    image_set = _image_set(20)
    a = [l.tolist() for _, l in image_set.batches(4, shuffle=True, generator=torch.Generator().manual_seed(5))]
    b = [l.tolist() for _, l in image_set.batches(4, shuffle=True, generator=torch.Generator().manual_seed(5))]
    c = [l.tolist() for _, l in image_set.batches(4, shuffle=True, generator=torch.Generator().manual_seed(6))]
    assert a == b and a != c


def test_batches_move_to_device():
    image_set = _image_set(4)
    images, labels = next(image_set.batches(4, shuffle=False, device=torch.device("cpu")))
    assert images.device.type == "cpu" and labels.tolist() == [0, 1, 2, 3]
    assert image_set.to(torch.device("cpu")) is image_set
