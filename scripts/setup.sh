#!/usr/bin/env bash
# Create .venv (if needed) and install autotransfer with the torch pair that installs offline here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
versions="import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('autotransfer', 'torch', 'torchvision', 'timm', 'optuna')), sep=', ')"
if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.14.1' or m.version('torchvision') != '0.29.1')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    2> >(grep -v "is ignored: it is neither" >&2)
fi
# The editable installs are redone only when what they read changed: the stamp holds a hash of the
# project's and the plugins' pyproject.toml files and of this script (delete .venv/.setup-stamp to force).
stamp=$(cat pyproject.toml plugins/*/pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import autotransfer" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]" \
    2> >(grep -v "is ignored: it is neither" >&2)
  for plugin in plugins/*/pyproject.toml; do  # the example plugin packages, so their tests run too
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e "$(dirname "$plugin")" \
      2> >(grep -v "is ignored: it is neither" >&2)
  done
  echo "$stamp" > .venv/.setup-stamp
fi
.venv/bin/python -c "$versions"  # read from the installed metadata: nothing heavy is imported
