#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x1_scope/README.md from the committed runs in runs/
# (conf/experiment/x1.yaml at the scope scale of conf/experiment/_scope.yaml; collect.sh copies a grid's
# finished runs here with their testbed-analyze results).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
COLS=val/loss,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean,spec/domain_isolation/mean
mkdir -p report
# every configuration: table, regime check, frontier, per-layer plots, p(expert | domain) heatmaps (seed 0),
# specialization over training (purity of the training batches, every 25 steps)
(cd runs && $R . --columns $COLS --no-committed-baselines --out ../report/report.md --plots \
    --layer-metrics purity,nmi,utilization --curves train/spec/purity/mean,train/spec/utilization/mean \
    --curve-x tokens)
# Sinkhorn and BA scored both ways: plain top-k (summary.json, as every router is validated) and their
# training-time balanced routing (analysis/, testbed-analyze router.eval_balanced=true)
BAL=analysis/val/loss,analysis/spec/utilization/mean,analysis/spec/max_violation/mean,analysis/spec/purity/mean,analysis/spec/nmi/mean
(cd runs && $R sinkhorn ba dense --no-committed-baselines --columns val/loss,spec/utilization/mean,spec/purity/mean,$BAL \
    --out ../report/balanced.md)
# paired differences over seeds (B - A), with the smallest effect each detects at 80% power
compare() {  # compare <dir> <metric> <A> <B>
    (cd runs && $R $1 --no-committed-baselines --columns val/loss --compare "$3" "$4" --compare-metric "$2" \
        | grep '^compare' | sed "s/^compare/[$1] compare/") || true
}
{
    HOMO="data.batch_composition=;router="
    for m in spec/purity/mean spec/nmi/mean spec/utilization/mean val/loss; do
        for pair in "sequence global" "micro_batch global" "sequence micro_batch"; do
            set -- $pair
            compare lbl $m "balance.scope=$1;$HOMO" "balance.scope=$2;$HOMO"
            compare eb $m "balance.scope=$1;balance=expert_bias" "balance.scope=$2;balance=expert_bias"
            compare sinkhorn $m "router.scope=$1" "router.scope=$2"
        done
        compare ba $m "router.scope=sequence" "router.scope=micro_batch"
        # the control: mixed micro-batches, where each micro-batch already holds every domain
        compare lbl_mixed $m "balance.scope=micro_batch" "balance.scope=global"
        # batch composition at equal scope: mixed - homogeneous micro-batches (LBL at 0.1)
        compare "lbl lbl_mixed" $m "balance.scope=micro_batch;data.batch_composition=" "balance.scope=micro_batch;data.batch_composition=mixed"
        compare "lbl lbl_mixed" $m "balance.scope=global;data.batch_composition=" "balance.scope=global;data.batch_composition=mixed"
        # method at equal scope: EB - LBL at global scope
        compare "lbl eb" $m "balance.scope=global;balance=;data.batch_composition=" "balance.scope=global;balance=expert_bias"
    done
} | tee report/compare.txt
# Holm's correction. The family of the experiment: every paired test above (compare.txt, 56 tests); and the
# paper's one question, named before the runs: global - micro_batch purity for each method (LBL, EB,
# Sinkhorn, and LBL with mixed batches: 4 tests)
$R --holm report/compare.txt --out report/compare_holm.txt | tail -1
grep -E '^\[(lbl|eb|sinkhorn|lbl_mixed)\] compare spec/purity/mean: B \((balance|router)\.scope=global.* - A \((balance|router)\.scope=micro_batch' \
    report/compare.txt > report/primary.txt
$R --holm report/primary.txt --out report/primary_holm.txt | tail -1
