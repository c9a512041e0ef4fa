"""The built-in plugin: registers the core datasets, backbones and scorers through the public hooks."""

from __future__ import annotations

from .backbones import TimmProvider
from .backbones.checkpoint_provider import CheckpointProvider
from .data import BuiltinSource, CsvSource, FolderSource
from .hookspecs import hookimpl
from .scorers import BUILTIN_SCORERS


@hookimpl
def autotransfer_dataset_sources() -> list:
    return [BuiltinSource(), CsvSource(), FolderSource()]


@hookimpl
def autotransfer_backbone_providers() -> list:
    return [CheckpointProvider(), TimmProvider()]  # checkpoint folders first: they name a timm architecture


@hookimpl
def autotransfer_scorers() -> list:
    return list(BUILTIN_SCORERS)
