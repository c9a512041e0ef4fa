"""Nightly benchmark leaderboards: run suites of methods into an append-only store, report on it."""
