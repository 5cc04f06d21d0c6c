#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x8_lbl_value/README.md from the committed runs: runs/
# (conf/experiment/x8.yaml: LBL coefficient 0, 1e-3, 1e-2 at micro-batch scope, the scope scale) and X1's
# LBL runs (coefficient 0.1 at sequence, micro-batch and global scope, the same scale and batches).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
PY="$(pwd)/../../.venv/bin/python"
X1=../../x1_scope/runs
COLS=spec/lbl_value/mean,train/aux/load_balance,spec/max_violation/mean,spec/utilization/mean,spec/load_entropy/mean,val/loss,spec/purity/mean
mkdir -p report
# within one scope (micro-batch): coefficient 0 (logged only), 1e-3, 1e-2, and X1's 0.1
MB="$X1/lbl/s0-1 $X1/lbl/s1-1 $X1/lbl/s2-1"  # X1's LBL at micro-batch scope (sweep index 1)
(cd runs && $R . $MB $X1/dense $X1/references --columns $COLS \
    --no-committed-baselines --out ../report/within.md --plots --curves train/aux/load_balance --curve-x tokens)
# across scopes at coefficient 0.1 (X1's LBL runs)
(cd runs && $R $X1/lbl --columns $COLS --no-committed-baselines --out ../report/across.md)
# rank correlations of the LBL value (at the run's scope, and on the validation set) with balance
{
    echo "## within one scope (micro_batch; coefficient 0, 1e-3, 1e-2, 0.1)"
    (cd runs && $PY ../correlation.py . $MB)
    echo "## across scopes (coefficient 0.1; sequence, micro_batch, global)"
    (cd runs && $PY ../correlation.py $X1/lbl)
} | tee report/correlation.txt
# across scopes, paired by seed (B - A = global - sequence): the training-time LBL value against balance
{
    for m in train/aux/load_balance spec/max_violation/mean spec/utilization/mean spec/lbl_value/mean; do
        (cd runs && $R $X1/lbl --no-committed-baselines --columns val/loss --compare-metric $m \
            --compare "balance.scope=sequence" "balance.scope=global" | grep '^compare') || true
    done
} | tee report/compare.txt
