#!/usr/bin/env bash
# Copy the finished runs of an X1 grid (testbed-experiment x1 --jobs 2 --out DIR) into runs/: summary.json,
# metrics.csv, .hydra/{config,overrides}.yaml, and testbed-analyze's analysis.json, scored on the same
# validation set from the run's last checkpoint:
# - Sinkhorn and BA (all seeds): with their training-time balanced routing (router.eval_balanced=true),
#   the "analysis/" columns of the README (their summary.json holds the plain top-k evaluation);
# - every other configuration (seed 0): as trained, for the p(expert | domain) heatmaps.
# Runs already collected are skipped, so this can follow a grid that finishes over several sittings.
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$(dirname "$0")"
ANALYZE="$(pwd)/../../.venv/bin/testbed-analyze"
find "$SRC" -name summary.json | sort | while read -r summary; do
    run=$(dirname "$summary")
    rel=${run#"$SRC"/}
    grep -q '"status": "finished"' "$summary" || continue
    dest=runs/$rel
    [ -f "$dest/summary.json" ] && continue
    overrides=$(cat "$run/.hydra/overrides.yaml")
    seed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['seed'])" "$summary")
    if grep -qE "router=(sinkhorn|balanced_assignment)" <<< "$overrides"; then
        OMP_NUM_THREADS=1 "$ANALYZE" "$run" router.eval_balanced=true --out "$run/analysis" > /dev/null
    elif [ "$seed" = 0 ] && ! grep -q "model=micro_dense" <<< "$overrides"; then
        OMP_NUM_THREADS=1 "$ANALYZE" "$run" --out "$run/analysis" > /dev/null
    fi
    mkdir -p "$dest/.hydra"
    cp "$run/summary.json" "$run/metrics.csv" "$dest/"
    cp "$run/.hydra/config.yaml" "$run/.hydra/overrides.yaml" "$dest/.hydra/"
    if [ -f "$run/analysis/analysis.json" ]; then
        mkdir -p "$dest/analysis" && cp "$run/analysis/analysis.json" "$dest/analysis/"
    fi
    echo "collected $rel"
done
