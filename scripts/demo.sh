#!/usr/bin/env bash
# Set up, then run a small search on the built-in digits dataset: no files, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/autotransfer search --dataset builtin:digits --backbones resnet18,mobilenetv3_small_100 \
  --no-pretrained --trials 6 --epochs 3 --out runs/demo "$@"
