#!/usr/bin/env bash
# Rebuild the numbers and figures of X1's first rerun at the 8,192-token-step scope scale
# (experiments/x1_scope/scope_8k/README.md) from the committed runs in runs/. Those runs were made with
# conf/experiment/x1.yaml as of commit 041ab66, whose _scope.yaml was 375 steps of 16 x 128-token sequences
# x 4 accumulated, lr 6e-3; each run's .hydra/config.yaml records it. Kept as a negative result: the
# regime fails there. The current X1 is in ../README.md.
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../../.venv/bin/testbed-report"
COLS=val/loss,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean,spec/domain_isolation/mean
mkdir -p report
(cd runs && $R . --columns $COLS --no-committed-baselines --out ../report/report.md --plots --layer-metrics purity,nmi,utilization)
# paired differences over seeds, LBL with homogeneous batches (balance= and data.batch_composition= absent)
LBL="balance=;data.batch_composition=;router="
for m in spec/purity/mean spec/nmi/mean spec/utilization/mean val/loss; do
    for pair in "sequence global" "micro_batch global" "sequence micro_batch"; do
        set -- $pair
        (cd runs && $R lbl --no-committed-baselines --columns val/loss --compare "balance.scope=$1;$LBL" \
            "balance.scope=$2;$LBL" --compare-metric $m | grep '^compare') || true
    done
done | tee report/compare.txt
# the same for expert bias
for m in spec/purity/mean spec/nmi/mean spec/utilization/mean val/loss; do
    for pair in "sequence global" "micro_batch global"; do
        set -- $pair
        (cd runs && $R eb --no-committed-baselines --columns val/loss --compare "balance.scope=$1;balance=expert_bias" \
            "balance.scope=$2;balance=expert_bias" --compare-metric $m | grep '^compare') || true
    done
done | tee report/compare_eb.txt
