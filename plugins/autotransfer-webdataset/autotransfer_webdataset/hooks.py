"""The autotransfer hook implementations of this package (entry-point group ``autotransfer``)."""

from __future__ import annotations

from autotransfer.hookspecs import hookimpl

from .source import WebDatasetSource


@hookimpl
def autotransfer_dataset_sources() -> list:
    return [WebDatasetSource()]
