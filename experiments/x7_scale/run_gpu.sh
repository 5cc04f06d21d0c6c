#!/usr/bin/env bash
# X7 on a lent GPU (the device tool; 15 minutes of device time in all), or any CUDA machine:
#   experiments/x7_scale/run_gpu.sh DEADLINE_S [testbed-experiment args...]
# Installs the carried wheels (.whl/, benchmarks/fetch_gpu_wheels.sh) when Hydra is missing, runs the X7 grid
# as 12 packed processes on the one GPU, stops them at DEADLINE_S (SIGTERM: each run saves a checkpoint and
# a summary with status "interrupted"), and packs every run's small outputs (summary.json, metrics.csv,
# .hydra/config.yaml + overrides.yaml, report.*) into $OUT/x7_runs.tgz, which the device tool brings back.
# Unpack it into experiments/x7_scale/ (runs/<sweep>/s<seed>/<job>/) and run rebuild.sh.
set -u
PY=${PY:-python3}
cd "$(dirname "$0")/../.."
DEADLINE=${1:-240}; shift || true
DEST=${OUT:-/tmp/x7_out}; mkdir -p "$DEST"
if ! "$PY" -c "import hydra" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; "$PY" -c "import torch; print(torch.__version__)") \
    > "$DEST/env.txt" 2>&1
RUNS=${X7_RUNS:-/tmp/x7_runs}; rm -rf "$RUNS"; mkdir -p "$RUNS"; start=$(date +%s)
timeout -k 30 "$DEADLINE" "$PY" -m testbed.experiment x7 --jobs 12 --out "$RUNS/runs" "$@" > "$DEST/x7.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$DEST/x7.log"
(cd "$RUNS" && find runs \( -name summary.json -o -name metrics.csv -o -path '*/.hydra/config.yaml' -o -path '*/.hydra/overrides.yaml' \
    -o -name 'report.*' \) -print0 | tar czf "$DEST/x7_runs.tgz" --null -T -)
tail -40 "$DEST/x7.log"
