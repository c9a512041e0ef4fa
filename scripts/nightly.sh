#!/usr/bin/env bash
# The nightly benchmark: run the CPU suite (appending to benchmarks/results/nightly-cpu.csv; a rerun
# the same night resumes), then rebuild the report with leaderboards, history and regression flags.
# Schedule it with cron or CI; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${AUTOTRANSFER:-.venv/bin/autotransfer}
status=0
"$BIN" bench run benchmarks/suites/nightly-cpu.toml --results benchmarks/results --work runs/bench "$@" || status=$?
"$BIN" bench report --results benchmarks/results --suite nightly-cpu --out benchmarks/results/report.html
exit "$status"
