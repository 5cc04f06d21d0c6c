#!/usr/bin/env bash
# Copy the finished runs of a grid (testbed-experiment <name> --jobs 2 --out GRID) into an experiment's
# runs/ folder: summary.json, metrics.csv, .hydra/{config,overrides}.yaml, and testbed-analyze's
# analysis.json, scored on the run's own validation set from its last checkpoint, and testbed-quiz eval's
# quiz.json and quiz.md where a quiz was evaluated:
# - Sinkhorn and BA (every seed): with their training-time balanced routing (router.eval_balanced=true),
#   the reports' "analysis/" columns (their summary.json holds the plain top-k evaluation);
# - every other MoE configuration (seed 0): as trained, for the p(expert | domain) heatmaps.
# Runs already collected are skipped, so this can follow a grid that finishes over several sittings.
#
#   experiments/collect.sh GRID EXPERIMENT_DIR      e.g. experiments/collect.sh /tmp/x2 experiments/x2_capacity
set -euo pipefail
SRC=$(cd "$1" && pwd)
DEST=$(cd "$2" && pwd)/runs
ANALYZE="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/testbed-analyze"
find "$SRC" -name summary.json | sort | while read -r summary; do
    run=$(dirname "$summary")
    rel=${run#"$SRC"/}
    grep -q '"status": "finished"' "$summary" || continue
    dest=$DEST/$rel
    [ -f "$dest/summary.json" ] && continue
    overrides=$(cat "$run/.hydra/overrides.yaml")
    seed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['seed'])" "$summary")
    if grep -qE "router=(sinkhorn|balanced_assignment)" <<< "$overrides"; then
        OMP_NUM_THREADS=1 "$ANALYZE" "$run" router.eval_balanced=true --out "$run/analysis" > /dev/null
    elif [ "$seed" = 0 ] && ! grep -q "_dense" <<< "$overrides"; then
        OMP_NUM_THREADS=1 "$ANALYZE" "$run" --out "$run/analysis" > /dev/null
    fi
    mkdir -p "$dest/.hydra"
    cp "$run/summary.json" "$run/metrics.csv" "$dest/"
    cp "$run/.hydra/config.yaml" "$run/.hydra/overrides.yaml" "$dest/.hydra/"
    if [ -f "$run/quiz/quiz.json" ]; then  # testbed-quiz eval's results (X5): the reports' "quiz/" columns
        mkdir -p "$dest/quiz" && cp "$run/quiz/quiz.json" "$run/quiz/quiz.md" "$dest/quiz/"
    fi
    if [ -f "$run/analysis/analysis.json" ]; then
        mkdir -p "$dest/analysis" && cp "$run/analysis/analysis.json" "$dest/analysis/"
    fi
    echo "collected $rel"
done
