#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x2_capacity/README.md from the committed runs: runs/
# (conf/experiment/x2.yaml at the scope scale of conf/experiment/_scope.yaml; experiments/collect.sh copies
# a grid's finished runs here) and X1's dense, oracle and hash runs, which share the scale, data and batches
# (the regime baseline and the references).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
X1=../../x1_scope/runs
COLS=val/loss,spec/drop_rate/mean,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean
mkdir -p report
(cd runs && $R . $X1/dense $X1/references --columns $COLS --no-committed-baselines --out ../report/report.md \
    --plots --layer-metrics purity,nmi,drop_rate --curves train/spec/purity/mean,train/spec/drop_rate/mean \
    --curve-x tokens)
# paired differences over seeds (B - A: capacity factor cf minus dropless), with the smallest effect each
# detects at 80% power
{
    for m in spec/purity/mean spec/nmi/mean spec/reference_precision/mean spec/utilization/mean val/loss; do
        for cf in 1.0 1.25 2.0; do
            (cd runs && $R . --no-committed-baselines --columns val/loss --compare-metric $m \
                --compare "model.moe.capacity_factor=null" "model.moe.capacity_factor=$cf" | grep '^compare') || true
        done
    done
} | tee report/compare.txt
