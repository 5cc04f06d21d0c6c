#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x7_scale/README.md from the committed runs (runs/).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
COLS=val/loss,spec/utilization/mean,spec/max_violation/mean,spec/purity/mean,spec/nmi/mean,spec/reference_precision/mean,spec/domain_isolation/mean
(cd runs && $R micro_batch global dense_active hash --columns $COLS --no-committed-baselines \
    --curve-table val/loss --curve-x tokens \
    --out ../report/report.md --plots --curves val/loss --layer-metrics purity,nmi,utilization)
# paired differences global - micro_batch over seeds 0-2 (learned routers only: router= excludes hash), then
# each learned scope - hash on val/loss (the regime table's gain over hash, with its p)
{
    for m in $(echo $COLS | tr , ' '); do
        (cd runs && $R micro_batch global --no-committed-baselines --columns val/loss \
            --compare "balance.scope=micro_batch;router=" "balance.scope=global;router=" --compare-metric $m | grep '^compare')
    done
    for scope in micro_batch global; do
        (cd runs && $R micro_batch global hash --no-committed-baselines --columns val/loss \
            --compare "router=hash" "balance.scope=$scope;router=" --compare-metric val/loss | grep '^compare')
    done
} | tee report/compare.txt
# Holm's correction over the 9 paired tests of compare.txt (the README's family)
$R --holm report/compare.txt --out report/compare_holm.txt | tail -1
