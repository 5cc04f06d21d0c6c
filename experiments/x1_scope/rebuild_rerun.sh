#!/usr/bin/env bash
# Rebuild the numbers and figures of the X1 rerun (issue 14; experiments/x1_scope/README.md, "Rerun")
# from the committed runs in runs/ (conf/experiment/x1.yaml; finish the grid with
# `testbed-experiment x1 --jobs 2 --out experiments/x1_scope/runs`, which skips finished runs).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
COLS=val/loss,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean,spec/domain_isolation/mean
mkdir -p rerun
(cd runs && $R . --columns $COLS --no-committed-baselines --out ../rerun/report.md --plots --layer-metrics purity,nmi,utilization)
# paired differences over seeds, LBL with homogeneous batches (balance= and data.batch_composition= absent)
LBL="balance=;data.batch_composition=;router="
for m in spec/purity/mean spec/nmi/mean spec/utilization/mean val/loss; do
    for pair in "sequence global" "micro_batch global" "sequence micro_batch"; do
        set -- $pair
        (cd runs && $R lbl --no-committed-baselines --columns val/loss --compare "balance.scope=$1;$LBL" \
            "balance.scope=$2;$LBL" --compare-metric $m | grep '^compare') || true
    done
done | tee rerun/compare.txt
# the same for expert bias
for m in spec/purity/mean spec/nmi/mean spec/utilization/mean val/loss; do
    for pair in "sequence global" "micro_batch global"; do
        set -- $pair
        (cd runs && $R eb --no-committed-baselines --columns val/loss --compare "balance.scope=$1;balance=expert_bias" \
            "balance.scope=$2;balance=expert_bias" --compare-metric $m | grep '^compare') || true
    done
done | tee rerun/compare_eb.txt
