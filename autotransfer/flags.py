"""Command-line flags declared once, on the dataclass field each one sets.

A field carries its flag in its metadata (`field(default=..., metadata=flag("--epochs", "epochs per
trial", type=int))`). `add_flags` builds the argparse arguments from the fields, each help line ending
with the field's real default, and `given` turns a parsed namespace back into the fields the user gave,
converted. So a new flag is its field (plus the code that uses the value), and the parser, the help,
the explicit-flag dict a resumed study is checked against (search.merge_config) and the defaults
cannot drift apart.

Invariant: a flag's destination is its field's name, and a flag the user did not give is absent from
the namespace (`argparse.SUPPRESS`), so `given` is exactly what was typed and the dataclass itself
supplies every default.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

FLAG = "autotransfer_flag"  # the metadata key
ACTIONS = ("value", "toggle", "negate", "switch", "append")


@dataclass(frozen=True)
class Flag:
    """How one field is set from the command line.

    `type` converts the text while argparse parses (a bad value is argparse's one-line error);
    `convert(flag_name, value)` runs afterwards and raises `UserError` with a message naming the flag.
    `action`: value (one value), toggle (`--x`/`--no-x`), negate (`--no-x` sets False), switch
    (`--x` sets True), append (repeatable, a list). `default_text` replaces the default shown in the
    help ("" shows none); by default the field's own default is shown, unless it is None."""

    name: str
    help: str
    type: Callable[[str], Any] | None = None
    convert: Callable[[str, Any], Any] | None = None
    action: str = "value"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown flag action {self.action!r}; one of {', '.join(ACTIONS)}")


def flag(name: str, help: str, **options: Any) -> dict[str, Flag]:
    """The metadata of a field set by `name` (see `Flag`)."""
    return {FLAG: Flag(name, help, **options)}


def flags_of(cls: type, names: Iterable[str] | None = None) -> list[tuple[dataclasses.Field, Flag]]:
    """The flagged fields of a dataclass, in field order (only `names`, when given)."""
    wanted = None if names is None else set(names)
    found = [(f, f.metadata[FLAG]) for f in dataclasses.fields(cls) if FLAG in f.metadata]
    if wanted is not None:
        unknown = wanted - {f.name for f, _ in found}
        if unknown:
            raise KeyError(f"{cls.__name__} has no flagged field {', '.join(sorted(unknown))}")
        found = [(f, spec) for f, spec in found if f.name in wanted]
    return found


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def shown(value: Any) -> str:
    """A default as a user would type it: lists comma-joined, ranges LOW:HIGH, switches on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ":".join(shown(v) for v in value)
    if isinstance(value, list):
        return ",".join(shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def help_text(field: dataclasses.Field, spec: Flag) -> str:
    if spec.default_text is not None:
        text = spec.default_text
    elif spec.action in ("negate", "switch", "append"):
        text = ""
    else:
        default = default_of(field)
        text = "" if default is None else shown(default)
    return f"{spec.help} (default {text})" if text else spec.help


def add_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None, *,
              required: Iterable[str] = ()) -> None:
    """Add the flags of `cls`'s fields (only `names`, when given) to `parser`; `required` ones must be given."""
    must = set(required)
    for field, spec in flags_of(cls, names):
        options: dict[str, Any] = {"dest": field.name, "help": help_text(field, spec)}
        if spec.action == "toggle":
            options["action"] = argparse.BooleanOptionalAction
        elif spec.action == "negate":
            options["action"] = "store_false"
        elif spec.action == "switch":
            options["action"] = "store_true"
        elif spec.action == "append":
            options["action"] = "append"
        if spec.type is not None:
            options["type"] = spec.type
        if spec.metavar is not None:
            options["metavar"] = spec.metavar
        if spec.choices is not None:
            options["choices"] = spec.choices
        if field.name in must:
            options["required"] = True
        else:
            options["default"] = argparse.SUPPRESS
        parser.add_argument(spec.name, **options)


def given(cls: type, values: dict[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """The flagged fields present in a parsed namespace's `values`, each through its `convert`."""
    found = {}
    for field, spec in flags_of(cls, names):
        if field.name in values:
            value = values[field.name]
            found[field.name] = spec.convert(spec.name, value) if spec.convert is not None else value
    return found
