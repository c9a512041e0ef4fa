"""Hook specifications: the contract between autotransfer and its plugins.

Built-in datasets and backbones register through these very hooks, so an outside package
can do anything a built-in does. Implement a hook with ``@autotransfer.hookimpl``.
"""

from __future__ import annotations

import pluggy

PROJECT = "autotransfer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def autotransfer_dataset_sources() -> list:
    """Return dataset sources this plugin can read.

    Called once when the plugin manager is built. Each source is an object with
    ``name: str`` (shown by ``autotransfer plugins``), ``can_load(uri: str) -> bool`` and
    ``load(uri: str) -> autotransfer.data.LabelledRefs``. The first source whose
    ``can_load`` accepts ``--dataset`` reads it, plugins before built-ins.
    """


@hookspec
def autotransfer_backbone_providers() -> list:
    """Return backbone providers this plugin serves.

    Called once when the plugin manager is built. Each provider is an object with
    ``name: str``, ``matches(model_name: str) -> bool``,
    ``describe(model_name) -> autotransfer.backbones.BackboneInfo`` (cheap: no weights) and
    ``create(model_name, weights: autotransfer.backbones.WeightsRequest) ->
    autotransfer.backbones.Backbone``. A provider that matches exact names is consulted
    before pattern providers such as the timm one.
    """
