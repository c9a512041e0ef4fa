#!/usr/bin/env bash
# Create .venv (if needed) and install autotransfer with the torch pair that installs offline here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    2> >(grep -v "is ignored: it is neither" >&2)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]" \
  2> >(grep -v "is ignored: it is neither" >&2)
for plugin in plugins/*/pyproject.toml; do  # the example plugin packages, so their tests run too
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e "$(dirname "$plugin")" \
    2> >(grep -v "is ignored: it is neither" >&2)
done
.venv/bin/python -c "import autotransfer, torch, timm, optuna; print(f'autotransfer {autotransfer.__version__}: torch {torch.__version__}, timm {timm.__version__}, optuna {optuna.__version__}')"
