"""Helpers for testing plugins against the real machinery (see docs/plugins.md, "Testing a plugin")."""

from __future__ import annotations

from importlib import metadata


def is_installed(distribution: str) -> bool:
    """Whether a package is installed (so its entry point can be tested), e.g. "autotransfer-knn"."""
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def reset_registries() -> None:
    """Forget the plugin managers and registries built so far in this process.

    They are built once per set of --plugin values; a test that changes AUTOTRANSFER_PLUGINS or
    installs a plugin mid-run calls this so the next lookup loads plugins afresh.
    """
    from .plugins import plugin_manager, registries

    plugin_manager.cache_clear()
    registries.cache_clear()
