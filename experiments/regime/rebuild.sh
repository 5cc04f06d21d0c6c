#!/usr/bin/env bash
# Rebuild every table and figure of experiments/regime/README.md from the committed runs (runs/, screen/).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
COLS=val/loss,spec/utilization/mean,spec/gate_entropy/mean,spec/purity/mean,spec/nmi/mean,spec/routing_change/mean
# screen: tiny at 600 steps and micro at 1,500 steps, one seed each
$R screen --columns $COLS --no-committed-baselines --per-run --out screen/report.md
$R screen --columns val/loss --no-committed-baselines --out screen/regime.md
# micro: 1,500 steps, 3 seeds (dense-active, learned, dense-total, hash, learned with renormalized gates)
(cd runs && $R micro micro_hash micro_renorm --columns $COLS --no-committed-baselines \
    --curve-table val/loss,spec/routing_change/mean --compare "model=micro" "router.renormalize=true" \
    --compare "model=micro" "router=hash" --out ../micro/report.md --plots --curves val/loss,spec/routing_change/mean \
    --curve-x tokens --layer-metrics purity)
# tiny: 2,000 steps, seed 0 (dense-active, learned, learned with renormalized gates, hash)
(cd runs && $R tiny tiny_renorm tiny_hash --columns $COLS --no-committed-baselines \
    --curve-table val/loss,spec/routing_change/mean --out ../tiny/report.md --plots --curves val/loss,spec/routing_change/mean --curve-x tokens --layer-metrics purity)
