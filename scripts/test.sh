#!/usr/bin/env bash
# Set up, then run the whole test suite (tests needing ../shared skip when it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- tests plugins
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
