#!/usr/bin/env bash
# Set up, then run a two-phase transfer on the built-in digits dataset: no files, no network.
# Phase 1 pretrains resnet18 on digits 0-4; phase 2 searches on digits 5-9 with that checkpoint
# next to the same architecture at random init, and the leaderboard compares the two.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f runs/demo-source/manifest.json ]; then
  .venv/bin/autotransfer pretrain --dataset builtin:digits:0-4 --backbone resnet18 --no-pretrained \
    --epochs 5 --out runs/demo-source
fi
exec .venv/bin/autotransfer search --dataset builtin:digits:5-9 --backbones resnet18,runs/demo-source \
  --no-pretrained --trials 6 --epochs 3 --out runs/demo "$@"
