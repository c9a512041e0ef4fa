"""Read one WebDataset tar shard into samples: encoded image bytes plus a raw label.

A sample is the group of members sharing a key: the member name up to the first dot of its
base name (``a/000123.left.jpg`` has key ``a/000123`` and extension ``left.jpg``), as in the
``webdataset`` library. Only the members needed (the first image, the label files) are read.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from autotransfer.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "gif")
LABEL_EXTENSIONS = ("cls", "label", "txt", "json")  # in the order they are looked at
LABEL_HINT = "add KEY.cls (class index as text), KEY.txt or KEY.label (class name) or KEY.json with a \"label\" key"

Label = int | str


@dataclass
class Sample:
    """One sample as read: where it came from, its image and its label (index or class name)."""

    shard: Path
    key: str
    image: bytes
    label: Label

    @property
    def where(self) -> str:
        return f"sample {self.key!r} in {self.shard}"


@dataclass
class _Group:
    """Members of one key collected while streaming through the tar."""

    image: bytes | None = None
    labels: dict[str, bytes] = field(default_factory=dict)
    extensions: list[str] = field(default_factory=list)


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``); None for names without extension."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:  # hidden files such as macOS ._* and bare names
        return None
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def is_image_extension(extension: str) -> bool:
    return extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def read_shard(path: Path) -> list[Sample]:
    """Every sample of one shard, in tar order; UserError names the shard or sample at fault."""
    try:
        groups = _read_groups(path)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read shard {path}: {type(exc).__name__}: {exc}; the file is not a tar archive "
                        "or is truncated, re-create or re-download it") from None
    except OSError as exc:
        raise UserError(f"cannot read shard {path}: {exc.strerror or exc}; check that it exists and is readable") from None
    return [_sample(path, key, group) for key, group in groups.items()]


def _read_groups(path: Path) -> dict[str, _Group]:
    groups: dict[str, _Group] = {}
    with tarfile.open(path, mode="r|*") as archive:  # streaming: read in order, no index of members
        for member in archive:
            if not member.isfile():
                continue
            parts = split_member_name(member.name)
            if parts is None:
                continue
            key, extension = parts
            group = groups.setdefault(key, _Group())
            group.extensions.append(extension)
            if is_image_extension(extension) and group.image is None:
                group.image = _read_member(archive, member)
            elif extension in LABEL_EXTENSIONS and extension not in group.labels:
                group.labels[extension] = _read_member(archive, member)
    return groups


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # regular files always have data
    return handle.read()


def _sample(path: Path, key: str, group: _Group) -> Sample:
    where = f"sample {key!r} in {path}"
    members = ", ".join(f".{e}" for e in group.extensions)
    if group.image is None:
        raise UserError(f"{where} has no image (members: {members}); each sample needs one "
                        f"{'/'.join('.' + e for e in IMAGE_EXTENSIONS)} member")
    return Sample(path, key, group.image, parse_label(group.labels, where, members))


# --------------------------------------------------------------------------- labels

def parse_label(labels: dict[str, bytes], where: str, members: str = "") -> Label:
    """The label of a sample: an int from ``.cls`` or ``.json``, a class name from text or ``.json``."""
    if "cls" in labels:
        return _class_index(_text(labels["cls"], where, "cls"), where, ".cls")
    for extension in ("label", "txt"):
        if extension in labels:
            return _class_name(_text(labels[extension], where, extension), where, f".{extension}")
    if "json" in labels:
        return _json_label(labels["json"], where)
    raise UserError(f"{where} has no label (members: {members}); {LABEL_HINT}")


def _text(data: bytes, where: str, extension: str) -> str:
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UserError(f"{where}: .{extension} is not UTF-8 text; write the label as plain text") from None


def _class_index(text: str, where: str, origin: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}: label {text!r} in {origin} is not an integer; write the class index "
                        "(0, 1, ...) or put the class name in a .txt member instead") from None
    return _non_negative(value, where, origin)


def _non_negative(value: int, where: str, origin: str) -> int:
    if value < 0:
        raise UserError(f"{where}: label {value} in {origin} is negative; class indices start at 0")
    return value


def _class_name(text: str, where: str, origin: str) -> str:
    if not text:
        raise UserError(f"{where}: {origin} is empty; write the class name in it")
    return text


def _json_label(data: bytes, where: str) -> Label:
    try:
        record = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{where}: .json is not valid JSON ({exc}); fix the member or add a .cls label") from None
    if not isinstance(record, dict) or "label" not in record:
        raise UserError(f"{where} has no label: its .json has no \"label\" key; {LABEL_HINT}")
    value = record["label"]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: .json label {value!r} is not an integer or a class name; "
                        "use a class index (3) or a name (\"cat\")")
    if isinstance(value, int):
        return _non_negative(value, where, ".json")
    return _class_name(value.strip(), where, ".json label")
