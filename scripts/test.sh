#!/usr/bin/env bash
# Set up, then run the whole test suite (tests needing ../shared skip when it is absent);
# `--fast` leaves out the tests marked slow (end-to-end runs of the CLI, subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
marks=()
if [ "${1:-}" = "--fast" ]; then  # the fast lane: everything but the end-to-end runs marked slow
  shift
  marks=(-m "not slow")
fi
if [ $# -eq 0 ]; then
  set -- tests plugins
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "${marks[@]}" "$@"
