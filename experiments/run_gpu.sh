#!/usr/bin/env bash
# Any experiment grid on a lent GPU (the device tool; 15 minutes of device time in all) or any CUDA machine:
#   experiments/run_gpu.sh NAME DEADLINE_S [JOBS] [testbed-experiment overrides...]
# Installs the carried wheels (.whl/, benchmarks/fetch_gpu_wheels.sh) when Hydra is missing, runs the grid
# as JOBS (default 12) packed processes on the one GPU, stops them at DEADLINE_S (SIGTERM: each run saves a
# checkpoint and a summary with status "interrupted", which testbed-report lists and never reports), and
# packs every run's small outputs (summary.json, metrics.csv, .hydra/config.yaml + overrides.yaml, report.*)
# into $OUT/<NAME>_runs.tgz, which the device tool brings back. Unpack it in the experiment's folder
# (runs/<sweep>/s<seed>/<job>/) and rebuild its report. Runs already in $RUNS/runs are skipped (resume).
# A CPU grid (x1-x6, x8) trains on the GPU with the override trainer=gpu (bf16, compiled; the experiment's
# own trainer keys such as max_steps still apply); add trainer.precision=32-true trainer.compile=false to
# match runs of the same grid made on CPU, and never mix CPU and GPU runs in one table without saying so.
#   e.g. device tool: run(command="experiments/run_gpu.sh x2 470 12 trainer=gpu", carry=[".whl"])
set -u
PY=${PY:-python3}
cd "$(dirname "$0")/.."
NAME=$1; shift
DEADLINE=${1:-240}; shift || true
JOBS=${1:-12}; shift || true
DEST=${OUT:-/tmp/${NAME}_out}; mkdir -p "$DEST"
if ! "$PY" -c "import hydra" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; "$PY" -c "import torch; print(torch.__version__)") \
    > "$DEST/env.txt" 2>&1
RUNS=${RUNS:-/tmp/${NAME}_runs}; mkdir -p "$RUNS"; start=$(date +%s)
timeout -k 30 "$DEADLINE" "$PY" -m testbed.experiment "$NAME" --jobs "$JOBS" --out "$RUNS/runs" "$@" > "$DEST/$NAME.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$DEST/$NAME.log"
(cd "$RUNS" && find runs \( -name summary.json -o -name metrics.csv -o -path '*/.hydra/config.yaml' -o -path '*/.hydra/overrides.yaml' \
    -o -name 'report.*' \) -print0 | tar czf "$DEST/${NAME}_runs.tgz" --null -T -)
tail -40 "$DEST/$NAME.log"
