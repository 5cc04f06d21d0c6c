#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x4_guo_losses/README.md from the committed runs: runs/
# (conf/experiment/x4.yaml at the scope scale of conf/experiment/_scope.yaml; experiments/collect.sh copies a
# grid's finished runs here) and X1's dense, oracle and hash runs, which share the scale, data and batches
# (the regime baseline and the references).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
X1=../../x1_scope/runs
DOMAINS="code fiction drama formal_math biomedical legal speeches spanish"
SPEC_COLS=spec/utilization/mean,spec/max_violation/mean,spec/routing_variance/mean,spec/expert_overlap/mean,spec/purity/mean,spec/nmi/mean
POST=spec/utilization/mean,spec/max_violation/mean,spec/routing_variance/mean,spec/expert_overlap/mean  # one domain: purity 1, nmi 0
PER_DOMAIN=$(for d in $DOMAINS; do printf 'val/loss/%s,' "$d"; done)
mkdir -p report
# pretraining (4 loss sets, 2 variance weights) with the references: every domain's loss and the routing
(cd runs && $R pretrain variance_weight $X1/dense $X1/references --columns val/loss,${PER_DOMAIN}$SPEC_COLS \
    --no-committed-baselines --out ../report/pretrain.md --plots \
    --layer-metrics routing_variance,expert_overlap,utilization \
    --curves train/spec/routing_variance/mean,train/spec/expert_overlap/mean --curve-x tokens)
# post-training on code: the starting and final code loss, the gain, and the routing on code
(cd runs && $R posttrain posttrain_variance_weight --no-committed-baselines --out ../report/posttrain.md \
    --columns init/val/loss/code,val/loss/code,gain/val/loss/code,$POST)
# paired differences over seeds, B - A, against LBL + z-loss only (with the smallest effect each detects);
# the root is runs/ itself so that each run knows its sweep
BASE="sweep=pretrain;aux_loss=[z_loss]"
ARMS=("sweep=pretrain;aux_loss=[z_loss,orthogonality]" "sweep=pretrain;aux_loss=[z_loss,variance]"
      "sweep=pretrain;aux_loss=[z_loss,orthogonality,variance]"
      "sweep=variance_weight;aux_loss.variance.target=0.01" "sweep=variance_weight;aux_loss.variance.target=0.1")
{
    args=()
    for arm in "${ARMS[@]}"; do args+=(--compare "$BASE" "$arm"); done
    (cd runs && $R . --no-committed-baselines --columns val/loss \
        --compare-metric "val/loss,${PER_DOMAIN}$SPEC_COLS" "${args[@]}" | grep '^compare')
    args=()
    for arm in "${ARMS[@]}"; do
        arm=${arm/sweep=pretrain/sweep=posttrain}
        args+=(--compare "sweep=posttrain;aux_loss=[z_loss]" "${arm/sweep=variance_weight/sweep=posttrain_variance_weight}")
    done
    (cd runs && $R . --no-committed-baselines --columns val/loss \
        --compare-metric gain/val/loss/code,val/loss/code,$POST "${args[@]}" | grep '^compare')
} | tee report/compare.txt
