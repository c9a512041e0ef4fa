"""The autotransfer hook implementations of this package (entry-point group ``autotransfer``)."""

from __future__ import annotations

from autotransfer.hookspecs import hookimpl

from .provider import MobileNetV1Provider


@hookimpl
def autotransfer_backbone_providers() -> list:
    return [MobileNetV1Provider()]
