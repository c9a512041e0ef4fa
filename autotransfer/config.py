"""Search configuration: one dataclass, stored in the Optuna study so any worker can rebuild it."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .flags import flag
from .record import CONFIG_KEY

DEFAULT_BACKBONES = ("resnet18.a1_in1k", "efficientnet_b0.ra_in1k", "mobilenetv3_large_100.ra_in1k")
HEADS = ("linear", "mlp")
HEAD_HIDDEN = (128, 256, 512)
OPTIMIZERS = ("adam", "rmsprop", "adamw", "sgd")
DEFAULT_OPTIMIZERS = ("adam", "rmsprop")
PRUNERS = ("median", "hyperband", "none")
HEAD_INITS = ("random", "probe")  # a linear head on trainable stages starts at random or from the probe (LP-FT)
FEATURES = ("final", "stages")  # what a fully frozen trial's head reads: the last stage, or every stage (multilevel.py)
PROBE_C_CV = "cv"  # a probe's L2 strength chosen by cross-validation on train (probe.py), the opening's and the baseline's
PROBE_CS = (PROBE_C_CV, "0.001", "0.003", "0.01", "0.03", "0.1", "0.3", "1.0")  # --probe-c: CV, or a fixed C to try
CPU_IMAGE_SIZE_CAP = 224  # ImageNet's size: keeps 288-384 px models affordable on CPU (benchmarks/image_size.py)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 2048  # --image-size bounds; backbones may need more (checked in Search.prepare)
CONFIG_ATTR = CONFIG_KEY  # the study attribute (record.py)

# Fields that may change between runs of one study: they steer the run (budget, memory, speed),
# not what a trial trains on.
DEFAULT_HEARTBEAT_S = 30
RUN_FIELDS = frozenset({"trials", "timeout", "cache_memory", "compile"})


DATASET_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(?![\\/])")  # builtin:..., wds:...; not C:\...


def normalise_dataset(text: str) -> str:
    """A --dataset as stored: a path written one way (`../x/`, `../x` and `../x/.` are one folder: shell
    completion adds the slash), a source URI (`builtin:digits`, `wds:...`) as given."""
    text = text.strip()
    if not text or DATASET_SCHEME.match(text):
        return text
    return os.path.normpath(text)


def _dataset(name: str, text: str) -> str:
    return normalise_dataset(text)


def _int_list(text: str) -> list[int]:
    return [int(value) for value in parse_list(text)]


def _range(name: str, text: str) -> tuple[float, float]:
    return parse_range(name, text)


def _weights(name: str, items: list[str]) -> dict[str, str]:
    return parse_weights(items)


def _size(name: str, text: str) -> int:
    return parse_size(name, text)


@dataclass
class SearchConfig:
    """Everything that defines a search; the run-only knobs (device, output, quiet) live elsewhere.
    Each field that a flag sets declares it here (flags.py): the parser and its help are made from them."""

    dataset: str = field(metadata=flag(
        "--dataset", "image folder, CSV manifest (path,label[,split]) or builtin:digits", convert=_dataset))
    backbones: list[str] = field(default_factory=lambda: list(DEFAULT_BACKBONES), metadata=flag(
        "--backbones", "comma list of timm/plugin backbones", type=lambda text: parse_list(text)))
    pretrained: bool = field(default=True, metadata=flag(
        "--no-pretrained", "random init (marked on the leaderboard)", action="negate"))
    weights: dict[str, str] = field(default_factory=dict, metadata=flag(
        "--weights", "weights for one backbone: a .safetensors/.pth file, a pretrain checkpoint folder, or "
        "'random' for random init (repeatable)", action="append", metavar="NAME=PATH", convert=_weights))
    frozen_stages: str = field(default="0-all", metadata=flag(
        "--frozen-stages", "range LOW-HIGH or list, 'all' = whole backbone"))
    heads: list[str] = field(default_factory=lambda: list(HEADS), metadata=flag(
        "--heads", f"comma list of {','.join(HEADS)}", type=lambda text: parse_list(text)))
    head_hidden: list[int] = field(default_factory=lambda: list(HEAD_HIDDEN), metadata=flag(
        "--head-hidden", "comma list of mlp widths", type=_int_list))
    head_dropout: tuple[float, float] = field(default=(0.0, 0.5), metadata=flag(
        "--head-dropout", "LOW:HIGH or a value", convert=_range))
    lr: tuple[float, float] = field(default=(1e-5, 1e-1), metadata=flag(
        "--lr", "LOW:HIGH log-uniform, or a value", convert=_range))
    optimizers: list[str] = field(default_factory=lambda: list(DEFAULT_OPTIMIZERS), metadata=flag(
        "--optimizers", f"comma list of {','.join(OPTIMIZERS)}", type=lambda text: parse_list(text)))
    head_inits: list[str] = field(default_factory=lambda: list(HEAD_INITS), metadata=flag(
        "--head-init", f"comma list of {','.join(HEAD_INITS)}: how a linear head on trainable stages starts; "
        "probe = the converged logistic-regression probe of the frozen backbone (LP-FT)",
        type=lambda text: parse_list(text)))
    features: list[str] = field(default_factory=lambda: list(FEATURES), metadata=flag(
        "--features", f"comma list of {','.join(FEATURES)}: what the head of a fully frozen trial reads; "
        "stages = the pooled output of every stage beside the final features (Head2Toe-style)",
        type=lambda text: parse_list(text)))
    probe_cs: list[str] = field(default_factory=lambda: list(PROBE_CS), metadata=flag(  # "cv", or fixed values
        "--probe-c", f"comma list of the L2 strengths C a fully frozen trial's probe may use: {PROBE_C_CV} = chosen "
        "by cross-validation on train (the opening's probes and the benchmark's linear probe), a number = that "
        "C, so the sampler can try it on the cached features", type=lambda text: parse_list(text)))
    portfolio: bool = field(default=True, metadata=flag(  # a new study opens with the recipes known to work
        "--portfolio", "open a new study with the recipes known to work: the linear probes (final and stage "
        "features) of every pretrained backbone, then a full fine-tune and LP-FT of the best-probed one; the "
        "sampler takes over after them", action="toggle"))
    epochs: int = field(default=5, metadata=flag("--epochs", "epochs per trial", type=int))
    batch_size: int = field(default=32, metadata=flag("--batch-size", "images per step", type=int))
    label_smoothing: float = field(default=0.0, metadata=flag(
        "--label-smoothing", "label smoothing of the trained heads' cross-entropy, 0 to below 1 (the probe's "
        "logistic regression is not smoothed)", type=float))
    image_size: int | None = field(default=None, metadata=flag(
        "--image-size", "crop size", type=int,
        default_text=f"the backbone's pretrained size, at most {CPU_IMAGE_SIZE_CAP} on CPU"))
    val_fraction: float = field(default=0.2, metadata=flag(
        "--val-fraction", "validation share when the data has no split", type=float))
    val_as_test: bool = field(default=False, metadata=flag(  # the dataset's val split is held out as test
        "--val-as-test", "hold the dataset's val split out as the test split and carve val from train (for "
        "data that ships only train/ and val/)", action="switch"))
    seed: int = field(default=0, metadata=flag("--seed", "seeds the split, the sampler and every trial", type=int))
    pruner: str = field(default="median", metadata=flag("--pruner", "how trials are pruned", choices=PRUNERS))
    trials: int | None = field(default=20, metadata=flag(
        "--trials", "finished trials wanted in the study", type=int))
    timeout: float | None = field(default=None, metadata=flag(
        "--timeout", "search seconds, counted over all runs of the study", type=float))
    prerank: str | None = field(default=None, metadata=flag(  # scorer that ranks the backbones before training
        "--prerank", "score the backbones first (e.g. logme) and search only the best", metavar="SCORER"))
    top_k: int | None = field(default=None, metadata=flag(
        "--top-k", "backbones kept by --prerank", type=int, default_text="half, rounded up"))
    cache: bool = field(default=True, metadata=flag(  # frozen stages from caches
        "--cache", "train frozen stages from caches: pooled features when the whole backbone is frozen, "
        "boundary activations of --cache-views augmented views when part of it is (--no-cache runs every "
        "trial's whole model every epoch)", action="toggle"))
    cache_views: int = field(default=2, metadata=flag(
        "--cache-views", "augmented views per image cached at the freeze boundary", type=int))
    cache_memory: int | None = field(default=None, metadata=flag(  # byte budget of the boundary cache
        "--cache-memory", "memory for the boundary cache, e.g. 2GB or 512MiB; a trial that needs more trains "
        "the plain way", metavar="SIZE", convert=_size, default_text="2 GiB or a quarter of RAM, whichever is less"))
    compile: bool = field(default=False, metadata=flag(
        "--compile", "torch.compile the trained module", action="toggle"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("head_dropout", "lr"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def validate(self) -> "SearchConfig":
        """Check every value; the messages name the bad value and the flag that fixes it."""
        self.dataset = normalise_dataset(self.dataset)
        if not self.backbones:
            raise UserError("--backbones is empty; give at least one timm model name")
        _check_subset("--heads", self.heads, HEADS)
        _check_subset("--optimizers", self.optimizers, OPTIMIZERS)
        _check_subset("--head-init", self.head_inits, HEAD_INITS)
        _check_subset("--features", self.features, FEATURES)
        self.probe_cs = parse_probe_cs(self.probe_cs)
        if self.pruner not in PRUNERS:
            raise UserError(f"unknown pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        _check_positive("--epochs", self.epochs)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--cache-views", self.cache_views)
        if self.cache_memory is not None:
            _check_positive("--cache-memory", self.cache_memory)
        if self.image_size is not None:
            _check_positive("--image-size", self.image_size)
            if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
                raise UserError(f"--image-size {self.image_size} is outside {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} px; give "
                                "a crop size such as 224, or leave it out to use each backbone's pretrained size")
        if self.trials is not None:
            _check_positive("--trials", self.trials)
        if self.timeout is not None and not self.timeout > 0:
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.trials is None and self.timeout is None:
            raise UserError("no budget: give --trials N and/or --timeout SECONDS")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        low, high = self.lr
        if not (0 < low <= high and math.isfinite(high)):
            raise UserError(f"--lr range must satisfy 0 < low <= high, got {low}:{high}")
        low, high = self.head_dropout
        if not 0 <= low <= high < 1:
            raise UserError(f"--head-dropout must satisfy 0 <= low <= high < 1, got {low}:{high}")
        for width in self.head_hidden:
            _check_positive("--head-hidden", width)
        parse_frozen_spec(self.frozen_stages)
        if self.top_k is not None and self.prerank is None:
            raise UserError("--top-k needs --prerank SCORER (e.g. --prerank logme --top-k 2)")
        if self.prerank is not None:
            if self.top_k is None:
                self.top_k = max(1, math.ceil(len(self.backbones) / 2))
            if not 1 <= self.top_k <= len(self.backbones):
                raise UserError(f"--top-k must lie in 1..{len(self.backbones)} (the number of --backbones), "
                                f"got {self.top_k}")
        unknown = sorted(set(self.weights) - set(self.backbones))
        if unknown:
            raise UserError(
                f"--weights names {', '.join(unknown)}, which is not in --backbones; "
                "use the exact backbone name on both")
        return self

    def conflicts_with(self, stored: "SearchConfig") -> list[str]:
        """Names of search-defining fields whose values differ from the stored study's."""
        mine, theirs = self.to_dict(), stored.to_dict()
        mine["dataset"], theirs["dataset"] = normalise_dataset(mine["dataset"]), normalise_dataset(theirs["dataset"])
        return [k for k in mine if k not in RUN_FIELDS and _normalise(mine[k]) != _normalise(theirs[k])]


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _check_subset(flag: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values:
        raise UserError(f"{flag} is empty; choose from {', '.join(allowed)}")
    for value in values:
        if value not in allowed:
            raise UserError(f"{flag}: unknown value {value!r}; choose from {', '.join(allowed)}")


def parse_probe_cs(values: list[str]) -> list[str]:
    """`--probe-c` values, each "cv" or a positive number, written one way ("1e-2" and "0.01" are one C)."""
    if not values:
        raise UserError(f"--probe-c is empty; give {PROBE_C_CV} and/or positive numbers such as 0.01,0.1")
    parsed = []
    for value in values:
        text = str(value).strip().lower()
        if text == PROBE_C_CV:
            parsed.append(PROBE_C_CV)
            continue
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if not (math.isfinite(number) and number > 0):
            raise UserError(f"--probe-c: {value!r} is neither {PROBE_C_CV!r} nor a positive number; "
                            "give e.g. cv,0.01,0.1")
        parsed.append(repr(number))
    return list(dict.fromkeys(parsed))


def probe_c_value(choice: str) -> float | None:
    """A `--probe-c` choice as the C to fit with; None for cross-validation."""
    return None if choice == PROBE_C_CV else float(choice)


def _check_positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def parse_frozen_spec(spec: str) -> tuple[str, list[str]]:
    """Parse `--frozen-stages`: a range `LOW-HIGH` or a comma list; `all` means every stage.

    Returns ("range", [low, high]) or ("choice", tokens), tokens kept as strings so the
    Optuna distribution is the same for every backbone.
    """
    text = spec.replace(" ", "").lower()
    tokens = [t for t in text.split(",") if t]
    if len(tokens) == 1 and "-" in tokens[0]:
        low, _, high = tokens[0].partition("-")
        if not (_is_stage(low) and _is_stage(high)) or low == "all":
            raise UserError(f"--frozen-stages: bad range {spec!r}; write e.g. 0-all, 0-3 or 0,2,all")
        if high != "all" and int(high) < int(low):
            raise UserError(f"--frozen-stages: range {spec!r} is empty; write LOW-HIGH with LOW <= HIGH")
        return "range", [low, high]
    if not tokens or not all(_is_stage(t) for t in tokens):
        raise UserError(f"--frozen-stages: bad value {spec!r}; write e.g. 0-all, 0-3 or 0,2,all")
    return "choice", list(dict.fromkeys(tokens))


def _is_stage(token: str) -> bool:
    return token == "all" or token.isdigit()


def resolve_stage(token: str, num_stages: int) -> int:
    """Map a frozen-stages token to a count within 0..num_stages."""
    return num_stages if token == "all" else min(int(token), num_stages)


def parse_range(flag: str, text: str, cast=float) -> tuple[Any, Any]:
    """Parse `LOW:HIGH` (or a single value) for a numeric flag."""
    try:
        parts = [cast(p) for p in text.split(":")]
    except ValueError:
        raise UserError(f"{flag}: cannot read {text!r} as a number or LOW:HIGH range") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise UserError(f"{flag}: {text!r} is not LOW:HIGH")
    return parts[0], parts[1]


SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(flag: str, text: str) -> int:
    """A byte count: `2GB` (10^9), `512MiB` (2^20), `1.5G` (bare letters are binary) or plain bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise UserError(f"{flag}: cannot read {text!r} as a size; write e.g. 2GB, 512MiB or a number of bytes")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise UserError(f"{flag} must be a positive size, got {text!r}; write e.g. 2GB or 512MiB")
    return size


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


RANDOM_WEIGHTS = "random"  # --weights NAME=random: random init for that backbone only


def parse_weights(items: list[str]) -> dict[str, str]:
    """Parse repeated `--weights NAME=PATH` / `NAME=random` options."""
    weights: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--weights expects NAME=PATH, got {item!r}")
        weights[name.strip()] = path.strip()
    return weights


@dataclass
class PretrainConfig:
    """What `autotransfer pretrain` trains; each field a flag sets declares it here (flags.py)."""

    dataset: str = field(metadata=flag("--dataset", "source dataset (same forms as search)"))
    backbone: str = field(metadata=flag("--backbone", "timm or plugin backbone name"))
    out: Path = field(metadata=flag(
        "--out", "new checkpoint folder; use it as --backbones DIR or --weights NAME=DIR", type=Path))
    pretrained: bool = field(default=True, metadata=flag(  # start from the backbone's own pretrained weights
        "--no-pretrained", "start from random init instead of the backbone's pretrained weights", action="negate"))
    weights: str | None = field(default=None, metadata=flag(  # or from this file / checkpoint folder
        "--weights", "start from this state dict or checkpoint folder", metavar="PATH"))
    epochs: int = field(default=10, metadata=flag("--epochs", "epochs on the source data", type=int))
    lr: float = field(default=1e-3, metadata=flag("--lr", "learning rate", type=float))
    optimizer: str = field(default="adam", metadata=flag("--optimizer", f"one of {','.join(OPTIMIZERS)}"))
    batch_size: int = field(default=64, metadata=flag("--batch-size", "images per step", type=int))
    image_size: int | None = field(default=None, metadata=flag("--image-size", "crop size", type=int,
                                                               default_text="as in search"))
    val_fraction: float = field(default=0.1, metadata=flag(
        "--val-fraction", "held out to report source accuracy", type=float))
    seed: int = field(default=0, metadata=flag("--seed", "seeds the split, the head and the order", type=int))
    device: str = "auto"

    def as_search(self) -> SearchConfig:
        """The data, backbone and weights settings as a search would hold them, for `prepare_search`."""
        return SearchConfig(dataset=self.dataset, backbones=[self.backbone], pretrained=self.pretrained,
                            weights={self.backbone: self.weights} if self.weights else {},
                            batch_size=self.batch_size, image_size=self.image_size, val_fraction=self.val_fraction,
                            seed=self.seed).validate()

    def validate(self) -> "PretrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        for name, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{name} must be a positive integer, got {value}")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size must be a positive integer, got {self.image_size}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must lie strictly between 0 and 1, got {self.val_fraction}")
        from .backbones.checkpoints import is_checkpoint

        out = Path(self.out)
        if is_checkpoint(out):
            raise UserError(f"{out} already holds a checkpoint; choose another --out (or delete it to replace it)")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out} exists and is not an empty folder; choose a new folder")
        return self
