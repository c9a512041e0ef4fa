"""Every accepted ``--dataset`` form, and what ``can_load`` must leave to the built-in sources."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter

import pytest
from wds_helpers import CLASSES, tiny_png, write_tar

from autotransfer_webdataset import WebDatasetSource
from autotransfer_webdataset.shards import expand_braces, split_of_name

SOURCE = WebDatasetSource()


def _splits(refs) -> dict[str, int] | None:
    return None if refs.splits is None else dict(Counter(refs.splits.tolist()))


def test_folder(shard_folder):
    assert SOURCE.can_load(str(shard_folder))
    refs = SOURCE.load(str(shard_folder))
    assert _splits(refs) == {"train": 6, "val": 6}
    assert refs.class_names == list(CLASSES)


def test_single_tar_file(shard_folder):
    path = shard_folder / "val-000001.tar"
    assert SOURCE.can_load(str(path))
    refs = SOURCE.load(str(path))
    assert len(refs.refs) == 2 and refs.name == "val-000001"
    assert refs.class_names == list(CLASSES)  # classes.txt beside the tar
    assert _splits(refs) == {"val": 2}  # marked val by name; the core then asks for training images


def test_brace_pattern_of_train_shards_leaves_the_split_to_the_core(shard_folder):
    pattern = str(shard_folder / "train-{000000..000002}.tar")
    assert SOURCE.can_load(pattern)
    refs = SOURCE.load(pattern)
    assert len(refs.refs) == 6 and refs.splits is None
    assert sorted(Counter(refs.labels.tolist()).values()) == [2, 2, 2]


def test_brace_list_pattern_marks_val_shards(shard_folder):
    refs = SOURCE.load(str(shard_folder / "{train,val}-{000000..000001}.tar"))
    assert _splits(refs) == {"train": 4, "val": 4}
    assert refs.name == "shards"


def test_brace_pattern_over_folders(shard_folder, tmp_path):
    for part in ("a", "b"):
        (tmp_path / "data" / part).mkdir(parents=True)
        shutil.copy(shard_folder / "train-000000.tar", tmp_path / "data" / part / "train-0.tar")
    refs = SOURCE.load(str(tmp_path / "data" / "{a,b}" / "train-{0..0}.tar"))
    assert len(refs.refs) == 4 and refs.name == "data" and refs.class_names == ["0"]  # no classes.txt there


@pytest.mark.parametrize("form", ["folder", "tar", "pattern"])
def test_wds_scheme(shard_folder, form):
    target = {"folder": shard_folder, "tar": shard_folder / "train-000000.tar",
              "pattern": shard_folder / "val-{000000..000002}.tar"}[form]
    uri = f"wds:{target}"
    assert SOURCE.can_load(uri)
    assert len(SOURCE.load(uri).refs) == {"folder": 12, "tar": 2, "pattern": 6}[form]


def test_split_subfolders_and_a_shared_classes_file(shard_folder, tmp_path):
    root = tmp_path / "by_folder"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for n, shard in enumerate(sorted(shard_folder.glob(f"{split}-*.tar"))):
            shutil.copy(shard, root / split / f"part{n}.tar")  # names do not say the split; folders do
    shutil.copy(shard_folder / "classes.txt", root / "classes.txt")
    assert SOURCE.can_load(str(root))
    refs = SOURCE.load(str(root))
    assert _splits(refs) == {"train": 6, "val": 6} and refs.class_names == list(CLASSES)


def test_a_pattern_or_file_in_a_val_folder_is_validation_data(shard_folder, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        shutil.copy(shard_folder / f"{split}-000000.tar", tmp_path / split / "part-0.tar")
    refs = SOURCE.load(str(tmp_path / "{train,val}" / "part-{0..0}.tar"))
    assert refs.splits.tolist() == ["train", "train", "val", "val"]
    assert _splits(SOURCE.load(str(tmp_path / "val" / "part-0.tar"))) == {"val": 2}


def test_gzipped_shards(shard_folder, tmp_path):
    target = tmp_path / "gz"
    target.mkdir()
    for shard in shard_folder.glob("*.tar"):
        (target / f"{shard.name}.gz").write_bytes(gzip.compress(shard.read_bytes()))
    assert SOURCE.can_load(str(target))
    assert _splits(SOURCE.load(str(target))) == {"train": 6, "val": 6}


def test_unmarked_shards_are_training_data_when_val_shards_exist(tmp_path):
    write_tar(tmp_path / "data-0.tar", {"a.png": tiny_png(1), "a.cls": b"0", "b.png": tiny_png(2), "b.cls": b"1"})
    write_tar(tmp_path / "validation-0.tar", {"c.png": tiny_png(3), "c.cls": b"1"})
    refs = SOURCE.load(str(tmp_path))
    assert refs.splits.tolist() == ["train", "train", "val"]


# --------------------------------------------------------------------------- what is not ours

def test_image_folders_csv_files_and_other_inputs_are_not_claimed(image_folder, tmp_path):
    root, _ = image_folder
    flat = root / "train"  # root/<class>/* layout
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\ntrain/cat/cat0.png,cat\n")
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("hello")
    (tmp_path / "empty").mkdir()
    (flat / "stray.tar").write_bytes(b"")  # a tar beside class folders is still an image folder
    for uri in (root, flat, csv, not_tar, tmp_path / "empty", tmp_path / "missing.tar", "builtin:digits",
                tmp_path / "missing-{0..3}.csv"):
        assert not SOURCE.can_load(str(uri)), uri


def test_the_registry_routes_each_form_to_its_source(image_folder, shard_folder, tmp_path):
    from autotransfer.plugins import registries

    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nx.png,a\n")
    regs = registries(("autotransfer_webdataset.hooks",))
    assert regs.dataset_source(str(image_folder[0])).name == "folder"
    assert regs.dataset_source(str(csv)).name == "csv"
    assert regs.dataset_source("builtin:digits").name == "builtin"
    for uri in (shard_folder, shard_folder / "train-000000.tar", shard_folder / "train-{000000..000001}.tar",
                f"wds:{shard_folder}"):
        assert regs.dataset_source(str(uri)).name == "webdataset"


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("pattern, expected", [
    ("s-{000..002}.tar", ["s-000.tar", "s-001.tar", "s-002.tar"]),
    ("s-{8..11}.tar", ["s-8.tar", "s-9.tar", "s-10.tar", "s-11.tar"]),
    ("s-{2..0}.tar", ["s-2.tar", "s-1.tar", "s-0.tar"]),
    ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
    ("plain.tar", ["plain.tar"]),
    ("odd{name}.tar", ["odd{name}.tar"]),
])
def test_expand_braces(pattern, expected):
    assert expand_braces(pattern) == expected


@pytest.mark.parametrize("name, split", [
    ("train-000000.tar", "train"), ("training_3.tar", "train"), ("val-0.tar", "val"), ("valid.tar", "val"),
    ("validation-000001.tar.gz", "val"), ("VAL_0.tar", "val"), ("valley-0.tar", None), ("trainset.tar", None),
    ("shard-000000.tar", None),
])
def test_split_of_name(name, split):
    assert split_of_name(name) == split
