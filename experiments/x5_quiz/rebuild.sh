#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x5_quiz/README.md from the committed runs: runs/
# (conf/experiment/x5.yaml at the CPU scale of conf/experiment/_cpu.yaml, each run with the quiz evaluation
# of testbed-quiz eval --positions answer in quiz/; experiments/collect.sh copies them here) and the regime
# experiment's dense and hash runs at the same scale (the regime baselines; every X5 model has the active
# parameters of micro_dense).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
REGIME=../../regime/runs
DENSE="$REGIME/micro/s0-0 $REGIME/micro/s1-0 $REGIME/micro/s2-0 $REGIME/micro/s0-2 $REGIME/micro/s1-2 $REGIME/micro/s2-2"
QUIZ=quiz/accuracy,quiz/accuracy_norm,quiz/dead_experts,quiz/gate_entropy,quiz/expert_accuracy_spread,quiz/expert_accuracy_range
mkdir -p report
(cd runs && $R . $DENSE $REGIME/micro_hash --no-committed-baselines \
    --columns val/loss,spec/utilization/mean,spec/gate_entropy/mean,$QUIZ --out ../report/report.md --plots \
    --layer-metrics quiz/gate_entropy,quiz/dead_experts,quiz/expert_accuracy_spread,gate_entropy --curves "")
# per checkpoint: one row per run
(cd runs && $R . --no-committed-baselines --per-run --columns quiz/accuracy,quiz/dead_experts,quiz/gate_entropy,quiz/expert_accuracy_spread \
    --out ../report/per_run.md > /dev/null)
# paired over seeds (B - A): sigmoid + expert bias, the OLMoE shape and the oracle against top-k softmax
{
    (cd runs && $R . --no-committed-baselines --columns val/loss --compare-metric val/loss,$QUIZ \
        --compare sweep=topk sweep=sigmoid_eb --compare sweep=topk sweep=olmoe_shape --compare sweep=topk sweep=oracle | grep '^compare')
} | tee report/compare.txt
