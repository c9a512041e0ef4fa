#!/usr/bin/env bash
# What CI cannot run, in one go on a GPU machine: the CUDA paths end to end (mixed precision, the
# caches on the GPU, resume, a resume through a warm server, several trials per GPU, predict and export
# of a GPU-trained model), then
# benchmarks/throughput.py and benchmarks/scale.py on CUDA, then the fast test lane with the GPU
# visible (tests that leave --device at auto train on it).
#
#   bash benchmarks/gpu_session.sh OUTDIR [SECONDS]
#
# Needs autotransfer and the MobileNetV1 plugin importable, and ../shared (hymenoptera, weights).
# On a lent machine whose Python lacks optuna (the workplace's device tool): build the wheels here,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl optuna sqlalchemy alembic mako colorlog timm==<ours>
#   .venv/bin/pip wheel --no-deps -w .whl . plugins/autotransfer-mobilenetv1
# copy ../shared/datasets/hymenoptera and ../shared/weights into .gpu/shared (both folders ignored), and
# run there, carrying .whl and .gpu:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   [ -e ../shared ] || ln -s "$PWD/.gpu/shared" ../shared; bash benchmarks/gpu_session.sh "$OUT" 530
# SECONDS (default 540) is the whole session's deadline: every step gets at most what is left, so a
# slow step cuts the later ones short instead of the run losing everything. Each step's output goes to
# OUTDIR/log.txt with its exit status and seconds; the CSVs and a tarball of the run folders' small
# files land in OUTDIR as they are made.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [SECONDS]}
deadline=$(( $(date +%s) + ${2:-540} ))
cd "$(dirname "$0")/.."
mkdir -p "$out"
log="$out/log.txt"
work=${GPU_WORK:-/tmp/autotransfer-gpu}
rm -rf "$work" && mkdir -p "$work"
shared=../shared
export AUTOTRANSFER_MOBILENETV1_WEIGHTS=$shared/weights HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
device=${GPU_DEVICE:-cuda}  # GPU_DEVICE=cpu: a dry run of the script on a machine without one
cli=(python3 -m autotransfer.cli)
hym=$shared/datasets/hymenoptera
mobilenets=mobilenetv1_025_leaky_in1k,mobilenetv1_025_keras_in1k

step() {  # step NAME LIMIT_S COMMAND...: run it with at most LIMIT_S, or what is left before the deadline
  local name=$1 limit=$2 left started rc
  shift 2
  left=$(( deadline - $(date +%s) - 15 ))  # 15 s kept for packing the results
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then
    echo "=== $name: skipped, no time left" | tee -a "$log"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  started=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "=== $name: exit $rc in $(( $(date +%s) - started ))s" | tee -a "$log"
}

step environment 30 bash -c 'nvidia-smi -L; python3 -c "import sys, torch, timm, optuna; print(sys.version.split()[0],
 \"torch\", torch.__version__, \"timm\", timm.__version__, \"optuna\", optuna.__version__, \"cuda\",
 torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
 \"bf16\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())"'

# Issue 16's hymenoptera search, on the GPU (mixed precision, the feature and boundary caches on CUDA).
step search 120 "${cli[@]}" search --dataset "$hym" --backbones "$mobilenets" --trials 12 --epochs 4 \
  --device "$device" --out "$work/hym"
step resume 60 "${cli[@]}" search --dataset "$hym" --backbones "$mobilenets" --trials 14 --epochs 4 \
  --device "$device" --out "$work/hym"
# The same study resumed through a warm server (warm.py): its fork, not the server, initialises CUDA.
export AUTOTRANSFER_WARM_DIR=$work/warm
step warm 90 bash -c "python3 -m autotransfer server start && python3 -m autotransfer search --dataset $hym \
  --backbones $mobilenets --trials 15 --epochs 4 --device $device --out $work/hym; rc=\$?; \
  python3 -m autotransfer server stop; exit \$rc"
# Several trials on one GPU: the same 8 trials (every stage trainable: the plain path) by one worker,
# then by two sharing the GPU; the wall times give trials per hour (docs/distributed.md).
for n in 1 2; do
  step "workers-$n" 90 "${cli[@]}" search --dataset "$hym" --backbones "$mobilenets" --trials 8 --epochs 3 \
    --frozen-stages 0,1 --no-portfolio --workers "$n" --trials-per-gpu "$n" --device "$device" \
    --out "$work/hym-workers-$n"
done
step predict 45 "${cli[@]}" predict --model "$work/hym/best" "$hym/val" --output "$work/preds.csv" --device "$device"
step export 60 "${cli[@]}" export --model "$work/hym/best" --format onnx
step leaderboards 10 bash -c "head -20 $work/hym/leaderboard.csv; head -9 $work/hym-workers-2/leaderboard.csv; \
  head -5 $work/preds.csv; ls -la $work/hym/best"

# throughput.py writes its CSV at its end: the step and cache tables first, then the searches apart.
step throughput 100 python3 benchmarks/throughput.py --device "$device" --sections step,cache \
  --work "$work/throughput" --out "$out/throughput-$device.csv"
step scale 200 python3 benchmarks/scale.py --device "$device" --sizes 5000,20000 --workers-size 20000 \
  --train-s 15 --work "$work/scale" --out "$out/scale-$device.csv"
step throughput-search 120 python3 benchmarks/throughput.py --device "$device" --sections search \
  --search-seeds 0 --work "$work/throughput" --out "$out/throughput-$device-search.csv"
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 12)  # pytest-xdist, where installed
step tests 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" "${parallel[@]}" --maxfail 30 tests plugins

# The run folders' small files (leaderboards, model cards, reports, logs), not weights or images.
(cd "$work" && find . -type f -size -2M ! -name "*.npy" ! -name "*.bin" | tar czf "$out/runs.tgz" -T - 2>/dev/null) \
  || true
echo "=== done at $(date +%T)" | tee -a "$log"
