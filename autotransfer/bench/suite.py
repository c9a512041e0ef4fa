"""Benchmark suite files (TOML): what to run, on what, with which budget.

A suite is read and checked completely before anything trains, so a typo fails in a second with
one line naming the bad key instead of an hour into a nightly run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RANDOM_WEIGHTS
from ..errors import UserError

METHODS = ("autotransfer", "autotransfer-prerank", "random", "linear-probe", "seed-recipe")
SUITE_KEYS = {"name", "datasets", "backbones", "methods", "seeds", "budget", "image_size", "image_sizes", "plugins", "env",
              "methods_options", "pretrained", "val_fraction", "val_as_test"}
BUDGET_KEYS = {"trials", "timeout_s", "epochs"}
# Per-method knobs a suite may set under [methods_options.<method>]; everything else is shared.
METHOD_OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "autotransfer": {},
    "autotransfer-prerank": {"scorer": str},
    "random": {},
    "linear-probe": {"C": list},
    "seed-recipe": {"lr": (int, float), "optimizer": str, "frozen_stages": (int, str), "head": str},
}


@dataclass(frozen=True)
class Budget:
    """The same for every method, so the leaderboard compares like with like."""

    trials: int
    timeout_s: float | None
    epochs: int


@dataclass
class Suite:
    name: str
    path: Path
    datasets: list[str]  # as written in the file: the store's `dataset` column, portable across machines
    backbones: list[str]
    weights: dict[str, str]
    methods: list[str]
    seeds: list[int]
    budget: Budget
    image_size: int | None = None
    image_sizes: dict[str, int] = field(default_factory=dict)  # per dataset (as written), over image_size
    plugins: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    methods_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrained: bool = True
    val_fraction: float = 0.2
    val_as_test: tuple[str, ...] = ()  # datasets (as written) whose val split is the test: methods carve val from train

    @property
    def folder(self) -> Path:
        return self.path.parent

    def resolve_dataset(self, spec: str) -> str | None:
        """A --dataset string for this machine; paths are relative to the suite file. None: missing."""
        if spec.startswith("builtin:") or _has_scheme(spec):
            return spec
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else (self.folder / path).resolve()
        return str(path) if path.exists() else None

    def image_size_for(self, dataset: str) -> int | None:
        return self.image_sizes.get(dataset, self.image_size)

    def options(self, method: str) -> dict[str, Any]:
        return dict(self.methods_options.get(method, {}))


def _has_scheme(spec: str) -> bool:
    """`wds:...`-style plugin URIs pass through untouched (but not Windows drive letters)."""
    head, sep, _ = spec.partition(":")
    return bool(sep) and len(head) > 1 and head.replace("-", "").replace("_", "").isalnum()


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; every error is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    return parse_suite(data, path.resolve())


def parse_suite(data: dict[str, Any], path: Path) -> Suite:
    where = path.name
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SUITE_KEYS))}")
    for key in ("name", "datasets", "backbones", "methods", "seeds", "budget"):
        if key not in data:
            raise UserError(f"{where}: missing key {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise UserError(f"{where}: 'name' must be a non-empty string without spaces or slashes, got {name!r}")
    folder = path.parent
    backbones, weights = _backbones(where, data["backbones"], folder)
    methods = _string_list(where, "methods", data["methods"])
    for method in methods:
        if method not in METHODS:
            raise UserError(f"{where}: 'methods': unknown method {method!r}; choose from {', '.join(METHODS)}")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        raise UserError(f"{where}: 'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    return Suite(
        name=name, path=path, datasets=_string_list(where, "datasets", data["datasets"]), backbones=backbones,
        weights=weights, methods=list(dict.fromkeys(methods)), seeds=list(dict.fromkeys(seeds)),
        budget=_budget(where, data["budget"]), image_size=_image_size(where, "image_size", data.get("image_size")),
        image_sizes=_image_sizes(where, data.get("image_sizes", {}), data["datasets"]),
        plugins=tuple(_string_list(where, "plugins", data.get("plugins", []), allow_empty=True)),
        env=_env(where, data.get("env", {}), folder), methods_options=_methods_options(where, data.get("methods_options", {})),
        pretrained=_bool(where, "pretrained", data.get("pretrained", True)),
        val_fraction=_val_fraction(where, data.get("val_fraction", 0.2)),
        val_as_test=_val_as_test(where, data.get("val_as_test", []), data["datasets"]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_list(where: str, key: str, value: Any, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (not value and not allow_empty):
        raise UserError(f"{where}: {key!r} must be a non-empty list of strings, got {value!r}")
    return list(value)


def _bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _backbones(where: str, value: Any, folder: Path) -> tuple[list[str], dict[str, str]]:
    """Items are names, or one-entry tables `{ name = "random" | "path/to/weights" }`."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'backbones' must be a non-empty list of names or {{ name = weights }} tables")
    names, weights = [], {}
    for item in value:
        if isinstance(item, str) and item:
            names.append(item)
        elif isinstance(item, dict) and len(item) == 1 and all(isinstance(v, str) and v for v in item.values()):
            (name, spec), = item.items()
            names.append(name)
            weights[name] = spec if spec == RANDOM_WEIGHTS else _suite_path(spec, folder)
        else:
            raise UserError(f"{where}: 'backbones': bad item {item!r}; write \"name\" or {{ name = \"random\" }}")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: 'backbones' lists a backbone twice")
    return names, weights


def _suite_path(value: str, folder: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def _budget(where: str, value: Any) -> Budget:
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'budget' must be a table {{ trials = N, epochs = E, timeout_s = S }}")
    unknown = sorted(set(value) - BUDGET_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key 'budget.{unknown[0]}'; allowed: {', '.join(sorted(BUDGET_KEYS))}")
    for key in ("trials", "epochs"):
        if key not in value:
            raise UserError(f"{where}: missing key 'budget.{key}'")
        if not _is_int(value[key]) or value[key] <= 0:
            raise UserError(f"{where}: 'budget.{key}' must be a positive integer, got {value[key]!r}")
    timeout = value.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise UserError(f"{where}: 'budget.timeout_s' must be a positive number of seconds, got {timeout!r}")
    return Budget(trials=value["trials"], timeout_s=None if timeout is None else float(timeout), epochs=value["epochs"])


def _image_size(where: str, key: str, value: Any) -> int | None:
    if value is not None and (not _is_int(value) or value <= 0):
        raise UserError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _image_sizes(where: str, value: Any, datasets: list[str]) -> dict[str, int]:
    """`image_sizes = { "builtin:digits" = 32 }`: a crop size per dataset, keyed as written in `datasets`."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'image_sizes' must be a table of \"dataset\" = size")
    for dataset, size in value.items():
        if dataset not in datasets:
            raise UserError(f"{where}: 'image_sizes' names {dataset!r}, which is not in 'datasets'")
        _image_size(where, f"image_sizes.{dataset}", size)
    return dict(value)


def _val_as_test(where: str, value: Any, datasets: list[str]) -> tuple[str, ...]:
    """`val_as_test = ["../data/hymenoptera"]`: for data that ships only train/val, the methods see train
    only (carving their val from it) and the shipped val split is the test no method sees."""
    names = _string_list(where, "val_as_test", value, allow_empty=True)
    for dataset in names:
        if dataset not in datasets:
            raise UserError(f"{where}: 'val_as_test' names {dataset!r}, which is not in 'datasets'")
    return tuple(names)


def _val_fraction(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"{where}: 'val_fraction' must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def _env(where: str, value: Any, folder: Path) -> dict[str, str]:
    """Values starting with ./ or ../ are paths relative to the suite file; others are kept verbatim."""
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
        raise UserError(f"{where}: 'env' must be a table of NAME = \"value\"")
    env = {}
    for name, raw in value.items():
        text = str(raw)
        env[name] = _suite_path(text, folder) if text.startswith(("./", "../")) else text
    return env


def _methods_options(where: str, value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: 'methods_options' must be a table of [methods_options.<method>] tables")
    options: dict[str, dict[str, Any]] = {}
    for method, table in value.items():
        if method not in METHOD_OPTIONS:
            raise UserError(f"{where}: 'methods_options': unknown method {method!r}; choose from {', '.join(METHODS)}")
        if not isinstance(table, dict):
            raise UserError(f"{where}: 'methods_options.{method}' must be a table")
        allowed = METHOD_OPTIONS[method]
        for key, item in table.items():
            if key not in allowed:
                names = ", ".join(allowed) or "none"
                raise UserError(f"{where}: unknown key 'methods_options.{method}.{key}'; allowed: {names}")
            if isinstance(item, bool) or not isinstance(item, allowed[key]):
                raise UserError(f"{where}: 'methods_options.{method}.{key}' has the wrong type: {item!r}")
        options[method] = dict(table)
    return options
