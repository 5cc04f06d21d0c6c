#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x3_router_types/README.md from the committed runs: runs/
# (conf/experiment/x3.yaml's sweeps sigmoid_eb, expert_choice and references at the CPU scale of
# conf/experiment/_cpu.yaml; experiments/collect.sh copies a grid's finished runs here) and the regime
# experiment's runs of X3's other sweeps, which are the same configurations at the same scale: top-k softmax
# with renormalize false (regime micro) and true (regime micro_renorm), and the dense baselines (regime
# micro). Their hash runs are bit-identical to X3's (checked for seeds 0-2), so X3's are used.
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
REGIME=../../regime/runs
SPEC_COLS=spec/utilization/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean,spec/routing_specialization/mean,spec/domain_isolation/mean,spec/effective_rank/mean
mkdir -p report
(cd runs && $R . $REGIME/micro $REGIME/micro_renorm --no-committed-baselines --columns val/loss,$SPEC_COLS \
    --out ../report/report.md --plots --layer-metrics purity,nmi,reference_precision \
    --curves train/spec/purity/mean --curve-x tokens)
# paired over seeds (B - A): every learned router against the oracle (B = oracle) and against hash (A = hash),
# and the routers against top-k softmax (renormalize false)
TOPK="model=micro;router.renormalize="
LEARNED=("$TOPK" "router.renormalize=true" "router=sigmoid" "router=expert_choice")
{
    args=()
    for r in "${LEARNED[@]}"; do args+=(--compare "$r" "router=oracle" --compare "router=hash" "$r"); done
    for r in "${LEARNED[@]:1}"; do args+=(--compare "$TOPK" "$r"); done
    (cd runs && $R . $REGIME/micro $REGIME/micro_renorm --no-committed-baselines --columns val/loss \
        --compare-metric val/loss,$SPEC_COLS "${args[@]}" | grep '^compare')
} | tee report/compare.txt
