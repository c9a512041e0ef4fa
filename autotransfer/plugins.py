"""Plugin discovery and the per-kind registries built from the hooks."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from .errors import UserError

if TYPE_CHECKING:  # the protocols each kind's items follow (not imported at run time: start-up stays light)
    from .backbones import BackboneProvider
    from .data import DatasetSource
    from .scorers import Scorer

ENV_VAR = "AUTOTRANSFER_PLUGINS"
BUILTIN_MODULES = ("autotransfer.builtin",)
HOOKS = {"autotransfer_dataset_sources": "datasets", "autotransfer_backbone_providers": "backbones",
         "autotransfer_scorers": "scorers"}
REQUIRED = {"autotransfer_dataset_sources": ("can_load", "load"),  # the protocols' methods (tested)
            "autotransfer_backbone_providers": ("matches", "describe", "create"),
            "autotransfer_scorers": ("requires", "__call__")}
LIFECYCLE_HOOKS = ("autotransfer_trial_started", "autotransfer_epoch_ended", "autotransfer_trial_finished")


@dataclass(frozen=True)
class Registries:
    datasets: list[DatasetSource]
    backbones: list[BackboneProvider]
    scorers: list[Scorer]

    def dataset_source(self, uri: str) -> DatasetSource:
        for source in self.datasets:
            if source.can_load(uri):
                return source
        from pathlib import Path

        if not uri.startswith("builtin:") and not Path(uri).exists():
            raise UserError(f"--dataset {uri!r}: no such file or folder; give an image folder, "
                            "a CSV manifest (path,label[,split]), builtin:digits, or a form a loaded plugin reads")
        raise UserError(f"no dataset source reads {uri!r}; give an image folder, a CSV manifest "
                        "(path,label[,split]), builtin:digits, or a form a plugin reads (see `autotransfer plugins`; "
                        "load one with --plugin)")

    def backbone_provider(self, name: str) -> BackboneProvider | None:
        for provider in self.backbones:
            if provider.matches(name):
                return provider
        return None

    def scorer(self, name: str) -> Scorer:
        for scorer in self.scorers:
            if scorer.name == name:
                return scorer
        import difflib

        known = [s.name for s in self.scorers]
        close = difflib.get_close_matches(name, known, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown scorer {name!r}{hint}; registered: {', '.join(known) or 'none'}")


def _import_plugin(spec: str) -> Any:
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            module_spec = importlib.util.spec_from_file_location(f"autotransfer_plugin_{path.stem}", path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(f"no such file {spec}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except Exception as exc:  # a broken plugin must not crash the CLI with a traceback
        raise UserError(f"plugin {spec!r} failed to import: {type(exc).__name__}: {_one_line(exc)}") from None


@lru_cache(maxsize=8)
def plugin_manager(extra: tuple[str, ...] = ()) -> pluggy.PluginManager:
    """Built-ins, then installed entry points, then AUTOTRANSFER_PLUGINS, then --plugin."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.distributions = {}  # plugin name -> "<project> <version>" for the installed ones
    for name in BUILTIN_MODULES:
        pm.register(importlib.import_module(name), name=name)
    for entry_point in _entry_points():
        if pm.has_plugin(entry_point.name) or pm.is_blocked(entry_point.name):
            continue
        dist = entry_point.dist
        package = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an installed package"
        try:
            plugin = entry_point.load()
        except Exception as exc:
            raise UserError(f"plugin {entry_point.name!r} (installed by {package}) failed to import: "
                            f"{type(exc).__name__}: {_one_line(exc)}; fix or uninstall that package") from None
        _register(pm, plugin, entry_point.name)
        pm.distributions[entry_point.name] = package
    env_specs = [s for s in os.environ.get(ENV_VAR, "").split(",") if s.strip()]
    for spec in [*env_specs, *extra]:
        spec = spec.strip()
        if pm.has_plugin(spec):
            continue
        module = _import_plugin(spec)
        if not pm.is_registered(module):  # already loaded as an installed entry point
            _register(pm, module, spec)
    return pm


def _entry_points() -> list[Any]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=hookspecs.PROJECT), key=lambda ep: ep.name)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except Exception as exc:  # e.g. a hookimpl whose arguments do not match its hookspec
        raise UserError(f"plugin {name!r} failed to register: {type(exc).__name__}: {_one_line(exc)}") from None


def _check_item(item: Any, hook_name: str, plugin_name: str) -> None:
    missing = [attr for attr in ("name", *REQUIRED[hook_name]) if not hasattr(item, attr)]
    if missing or not isinstance(item.name, str):
        raise UserError(f"plugin {plugin_name!r} returned {type(item).__name__} from {hook_name}, which lacks "
                        f"{', '.join(missing) or 'a str name'}; see docs/plugins.md for what the hook returns")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:400]


def _collect(pm: pluggy.PluginManager, hook_name: str) -> list[Any]:
    hook = getattr(pm.hook, hook_name)
    items: list[Any] = []
    owners: dict[str, str] = {}
    for impl in reversed(hook.get_hookimpls()):  # pluggy calls last-registered first
        try:
            provided = impl.function() or []
        except Exception as exc:
            raise UserError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {_one_line(exc)}") from None
        for item in provided:
            _check_item(item, hook_name, impl.plugin_name)
            if item.name in owners:
                raise UserError(
                    f"{hook_name}: {item.name!r} is registered by both {owners[item.name]!r} "
                    f"and {impl.plugin_name!r}; uninstall or rename one")
            owners[item.name] = impl.plugin_name
            items.append((impl.plugin_name in BUILTIN_MODULES, item))
    # Plugins before built-ins so a plugin can serve a name the built-in pattern would match.
    return [item for _, item in sorted(items, key=lambda pair: pair[0])]


@lru_cache(maxsize=8)
def registries(extra: tuple[str, ...] = ()) -> Registries:
    pm = plugin_manager(extra)
    found = Registries(
        datasets=_collect(pm, "autotransfer_dataset_sources"),
        backbones=_collect(pm, "autotransfer_backbone_providers"),
        scorers=_collect(pm, "autotransfer_scorers"),
    )
    for provider in found.backbones:  # providers that build on others (checkpoints) get the registry
        if hasattr(provider, "bind"):
            provider.bind(found)
    return found


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin as `autotransfer plugins` shows it."""

    name: str
    origin: str  # "<distribution> <version>", "built-in, autotransfer <version>" or how it was loaded
    registers: dict[str, list[str]]


def describe_plugins(extra: tuple[str, ...] = ()) -> list[PluginInfo]:
    """Every loaded plugin, with its version and what it registers (checked like a run would)."""
    from importlib.metadata import PackageNotFoundError, version

    pm = plugin_manager(extra)
    registries(extra)  # a broken or clashing plugin fails here exactly as it would in a search
    found = []
    for name, plugin in pm.list_name_plugin():
        if name in pm.distributions:
            origin = pm.distributions[name]
        elif name in BUILTIN_MODULES:
            try:
                origin = f"built-in, {hookspecs.PROJECT} {version(hookspecs.PROJECT)}"
            except PackageNotFoundError:
                origin = "built-in"
        else:
            origin = "loaded by --plugin or AUTOTRANSFER_PLUGINS, not an installed package"
        registers = {}
        for hook, kind in HOOKS.items():
            impl = getattr(plugin, hook, None)
            if impl is not None:
                registers[kind] = [_label(item) for item in impl()]
        callbacks = [hook.removeprefix("autotransfer_") for hook in LIFECYCLE_HOOKS if hasattr(plugin, hook)]
        if callbacks:
            registers["callbacks"] = callbacks
        found.append(PluginInfo(name, origin, registers))
    return found


def _label(item: Any) -> str:
    names = getattr(item, "names", None) or getattr(item, "datasets", None)
    return f"{item.name} ({', '.join(names)})" if names else item.name
