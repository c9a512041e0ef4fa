"""Bad input stops with one UserError line that names the file or sample and says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wds_helpers import tiny_png, write_tar

from autotransfer.errors import UserError
from autotransfer_webdataset import WebDatasetSource


def _good(key: str = "a", label: bytes = b"0") -> dict[str, bytes]:
    return {f"{key}.png": tiny_png(), f"{key}.cls": label}


def corrupt_tar(tmp: Path) -> str:
    (tmp / "train-0.tar").write_bytes(b"this is not a tar archive" * 40)
    return str(tmp / "train-0.tar")


def truncated_tar(tmp: Path) -> str:
    path = write_tar(tmp / "train-0.tar", {"a.png": tiny_png(size=64), "a.cls": b"0"})
    path.write_bytes(path.read_bytes()[:700])
    return str(path)


def empty_file(tmp: Path) -> str:
    (tmp / "train-0.tar").write_bytes(b"")
    return str(tmp)


def without_image(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {**_good("a"), "b.cls": b"1", "b.json": b"{}"}))


def without_label(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {**_good("a"), "b.jpg": tiny_png(), "b.npy": b"x"}))


def json_without_label(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {"b.png": tiny_png(), "b.json": json.dumps({"caption": "x"}).encode()}))


def label_not_integer(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {**_good("a"), **_good("b", b"cat")}))


def negative_label(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", _good("b", b"-1")))


def json_label_float(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {"b.png": tiny_png(), "b.json": b'{"label": 1.5}'}))


def cls_outside_classes_file(tmp: Path) -> str:
    (tmp / "classes.txt").write_text("ant\nbee\n")
    write_tar(tmp / "train-0.tar", {**_good("a"), **_good("b", b"2")})
    return str(tmp)


def name_not_in_classes_file(tmp: Path) -> str:
    (tmp / "classes.txt").write_text("ant\nbee\n")
    write_tar(tmp / "train-0.tar", {**_good("a"), "b.png": tiny_png(), "b.txt": b"wasp"})
    return str(tmp)


def duplicate_class(tmp: Path) -> str:
    (tmp / "classes.txt").write_text("ant\nbee\nant\n")
    write_tar(tmp / "train-0.tar", _good("a"))
    return str(tmp)


def mixed_label_kinds(tmp: Path) -> str:
    return str(write_tar(tmp / "s.tar", {**_good("a"), "b.png": tiny_png(), "b.txt": b"bee"}))


def no_samples(tmp: Path) -> str:
    write_tar(tmp / "train-0.tar", {})
    write_tar(tmp / "train-1.tar", {".hidden.png": tiny_png(), "no_extension": b"x"})  # members that are skipped
    return str(tmp)


def pattern_matches_nothing(tmp: Path) -> str:
    return str(tmp / "train-{000000..000003}.tar")


def pattern_partly_missing(tmp: Path) -> str:
    write_tar(tmp / "train-000000.tar", _good())
    return str(tmp / "train-{000000..000003}.tar")


def pattern_bad_range(tmp: Path) -> str:
    return str(tmp / "train-{a..c}.tar")


def scheme_missing_path(tmp: Path) -> str:
    return f"wds:{tmp / 'nowhere'}"


def scheme_folder_without_shards(tmp: Path) -> str:
    (tmp / "cat").mkdir()
    return f"wds:{tmp}"


CASES = {
    corrupt_tar: ("cannot read shard", "train-0.tar", "not a tar archive"),
    truncated_tar: ("cannot read shard", "train-0.tar", "truncated"),
    empty_file: ("cannot read shard", "train-0.tar", "empty file"),
    without_image: ("sample 'b'", "s.tar", "has no image", ".cls, .json", ".png"),
    without_label: ("sample 'b'", "s.tar", "has no label", "KEY.cls"),
    json_without_label: ("sample 'b'", "no \"label\" key"),
    label_not_integer: ("sample 'b'", "s.tar", "'cat'", "not an integer", ".txt"),
    negative_label: ("sample 'b'", "negative"),
    json_label_float: ("sample 'b'", "1.5", "not an integer or a class name"),
    cls_outside_classes_file: ("sample 'b'", "train-0.tar", "class index 2 is outside", "classes.txt", "0..1"),
    name_not_in_classes_file: ("sample 'b'", "'wasp'", "not listed in", "classes.txt"),
    duplicate_class: ("classes.txt", "'ant' is listed twice", "line 3"),
    mixed_label_kinds: ("mix class indices", "sample 'a'", "sample 'b'", "classes.txt"),
    no_samples: ("no samples in 2 shard(s)", "train-0.tar"),
    pattern_matches_nothing: ("matches no file", "train-{000000..000003}.tar", "train-000000.tar"),
    pattern_partly_missing: ("3 of 4 shards are missing", "train-000001.tar"),
    pattern_bad_range: ("{a..c}", "must be two integers"),
    scheme_missing_path: ("no such file or folder", "nowhere"),
    scheme_folder_without_shards: ("no .tar shards in",),
}


@pytest.mark.parametrize("make", CASES, ids=[f.__name__ for f in CASES])
def test_bad_input_raises_one_line_user_error(tmp_path, make):
    uri = make(tmp_path)
    source = WebDatasetSource()
    assert source.can_load(uri)  # the plugin claims it, so the message is its own
    with pytest.raises(UserError) as raised:
        source.load(uri)
    message = str(raised.value)
    assert "\n" not in message
    for part in CASES[make]:
        assert part in message, (part, message)


def test_unreadable_shard(tmp_path, monkeypatch):
    """Permissions cannot be tested as root, so the open fails the way an unreadable file's would."""
    from autotransfer_webdataset import reader

    path = write_tar(tmp_path / "train-0.tar", _good())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(reader.tarfile, "open", refuse)
    with pytest.raises(UserError, match=r"cannot read shard .*train-0.tar: Permission denied; check that it "):
        WebDatasetSource().load(str(path))


def test_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    from autotransfer.cli import main

    uri = corrupt_tar(tmp_path)
    code = main(["search", "--dataset", uri, "--backbones", "resnet18", "--no-pretrained", "--trials", "1",
                 "--out", str(tmp_path / "run"), "--quiet", "--plugin", "autotransfer_webdataset.hooks"])
    assert code == 2
    error = capsys.readouterr().err
    assert "cannot read shard" in error and "train-0.tar" in error and error.count("\n") == 1
