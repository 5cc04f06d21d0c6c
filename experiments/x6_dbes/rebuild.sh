#!/usr/bin/env bash
# Rebuild every number and figure of experiments/x6_dbes/README.md from the committed runs: runs/
# (conf/experiment/x6.yaml at the CPU scale of conf/experiment/_cpu.yaml; experiments/collect.sh copies a
# grid's finished runs here), experiments/regime's runs at the same scale (the dense baseline and hash), X3's
# oracle runs (same scale), and
# the committed runs of X1, X2, X4 and X8 for the DBES table.
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
PY="$(pwd)/../../.venv/bin/python"
REGIME=../../regime/runs
DBES=spec/routing_specialization/mean,spec/effective_rank/mean,spec/domain_isolation/mean,spec/routing_stiffness/mean,spec/ngram_expertise_n4/mean
mkdir -p report
# the pretrained models with the regime check (dense of equal active parameters and hash, same scale) and
# the oracle reference (X3's oracle runs, same scale)
ORACLE="../../x3_router_types/runs/references/s0-0 ../../x3_router_types/runs/references/s1-0 ../../x3_router_types/runs/references/s2-0"
(cd runs && $R pretrain $REGIME/micro_hash $REGIME/micro $ORACLE --no-committed-baselines \
    --columns val/loss,val/loss/code,spec/utilization/mean,spec/purity/mean,spec/nmi/mean,$DBES \
    --out ../report/pretrain.md --plots --layer-metrics routing_specialization,domain_isolation,purity --curves "")
# post-training on code: the expert path, a random path of the same size, every expert, the whole model
# (root runs/ itself, so that each run knows its sweep; the pretrain row is the starting point)
(cd runs && $R . --no-committed-baselines --out ../report/posttrain.md \
    --columns init/val/loss/code,val/loss/code,gain/val/loss/code,trainable_params,gain_per_mparam/val/loss/code)
# paired over seeds (B - A), each post-training against the expert path
{
    args=()
    for other in random_path all_experts full; do args+=(--compare sweep=path "sweep=$other"); done
    (cd runs && $R . --no-committed-baselines --columns val/loss \
        --compare-metric gain/val/loss/code,gain_per_mparam/val/loss/code "${args[@]}" | grep '^compare')
} | tee report/compare.txt
# the DBES metrics of every pretraining configuration of the committed runs at the scope scale and here
$PY dbes_table.py ../x1_scope/runs ../x2_capacity/runs ../x4_guo_losses/runs ../x8_lbl_value/runs runs \
    | tee report/dbes.md
