#!/usr/bin/env bash
# Rebuild every number and figure of experiments/ladder/README.md from the committed runs: the token ladder
# (runs/<steps>/<role>/s<seed> and, for the 1,500-step rung of moe / hash / dense_*, experiments/regime_large)
# and, once run, the mechanism runs (mechanism/<name>/s<seed>, against the same 1,500-step baselines).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
GATE_MASS="analysis/spec/gate_mass/mean,spec/gate_mass/mean,val/loss"
# the token ladder: validation loss per rung, gains paired by seed, Holm over the comparisons with hash,
# the trend per doubling of tokens, ladder.png
# (the renormalised-gates router's 1,500-step runs are the mechanism runs of the same configuration)
$R ../regime_large runs mechanism/renorm --ladder --out report.md --plots
# the same comparisons on the whole validation split: the final checkpoints rescored by rescore.sh
# (analysis/analysis.json beside each MoE run of the 3,000- and 6,000-step rungs)
$R runs --ladder --ladder-metric analysis/val/loss --out rescored.md
# ... and each configuration against the default run (renormalised gates vs the default gates)
$R runs --ladder --ladder-metric analysis/val/loss --reference moe --out rescored_vs_default.md
# the token ladder at lr 1e-2, every micro model's best rate at 1,500 steps (run.sh ROLES="moe_lr1e-2
# hash_lr1e-2 dense_active_lr1e-2"; the 1,500-step runs are the mechanism runs' learning-rate sweep): against
# hash and dense-active at the same rate, on the 36 validation documents and on the whole split
if [ -d runs_lr ]; then
    LR="--reference hash_lr1e-2 --ladder-baselines dense_active_lr1e-2"
    $R mechanism/moe_lr1e-2 mechanism/hash_lr1e-2 mechanism/dense_active_lr1e-2 runs_lr --ladder $LR \
        --out lr_ladder.md --plots --ladder-figure lr_ladder.png
    $R runs_lr --ladder --ladder-metric analysis/val/loss $LR --out lr_rescored.md
    # the 12,000-step rung (24.6M tokens) reads some domains' training tokens more than once: the plain
    # report's regime check and epochs per repeated domain
    if [ -d runs_lr/12000 ]; then
        $R runs_lr/12000 --out lr_repeat.md
    fi
    # the learned router's gate mass up the ladder (logged at the end of each run; analysis/: whole split)
    $R mechanism/moe_lr1e-2 runs_lr/*/moe_lr1e-2 --columns "$GATE_MASS" --out lr_gate_mass.md
fi
if [ -d mechanism ]; then
    # each mechanism against the default run (moe) and hash at 1,500 steps, same seeds; the lr sweep's
    # models each at its own rates (val loss table)
    $R ../regime_large mechanism --ladder --reference moe --out mechanism/report.md
    # the learning-rate sweep: every configuration against the learned router at its best rate (1e-2), so
    # that hash and dense-active are compared at their own best rates too
    # (the 16-expert models; fine64 and hash64 at 1e-2 are compared in fine_lr.md)
    $R ../regime_large mechanism/{moe,hash,dense_active,dense_total,renorm}_lr* --ladder --reference moe_lr1e-2 \
        --out mechanism/best_rate.md
    # fine-grained experts (fine64: top-8 of 64 experts of hidden 16, equal active and total parameters)
    # against their own hash baseline (hash64), with the default run and hash of 16 experts beside them
    # (fine64_renorm: with renormalised gates)
    $R ../regime_large mechanism/fine64 mechanism/fine64_renorm mechanism/hash64 --ladder --reference hash64 \
        --ladder-baselines hash,dense_active,dense_total,fine64 --out mechanism/fine.md
    # renormalised gates with 64 experts against renormalised gates with 16
    $R ../regime_large mechanism/renorm mechanism/fine64 mechanism/fine64_renorm --ladder --reference renorm \
        --out mechanism/fine_renorm.md
    # ... and both at the micro models' best rate, 1e-2, beside the default router, hash and dense-active at
    # that rate (16 experts)
    $R mechanism/{moe,hash,dense_active,fine64,hash64}_lr1e-2 --ladder --reference hash64_lr1e-2 \
        --ladder-baselines moe_lr1e-2,hash_lr1e-2,dense_active_lr1e-2 --out mechanism/fine_lr.md
    # the learned router's gate mass (summed gates per token): logged by the learning-rate and fine64 runs,
    # and scored by testbed-analyze --summary-only on the LBL 1e-3 runs' checkpoints (analysis/)
    $R mechanism/lbl_1e-3 mechanism/moe_lr* mechanism/fine64 mechanism/fine64_lr1e-2 --columns "$GATE_MASS" \
        --out mechanism/gate_mass.md
fi
# the token ladder at tiny (run_tiny.sh): the default router, hash and dense-active at 3,000 steps, with the
# scale ladder's tiny grid (1,500 steps, all six configurations) as the first rung
$R scale/tiny/runs tiny --ladder --ladder-baselines dense_active --out tiny/report.md --plots
if [ -d scale/micro/runs ]; then
    # the scale ladder (make experiment NAME=scale_micro / scale_tiny, collected into scale/<size>/runs):
    # each size's table and regime check, then the ranking of the six configurations at micro against
    # tiny (val loss and purity): Spearman's rho over seeds, with and without the dense model, and each
    # configuration minus the default router (top-2 + LBL at micro-batch scope), paired by seed, at both
    for size in scale/*/runs; do
        $R "$size" --out "$(dirname "$size")/report.md"
    done
    if [ -d scale/tiny/runs ]; then
        $R --rank scale/micro/runs scale/tiny/runs --rank-reference lbl_micro_batch \
            --out scale/rank_micro_tiny.md --plots
    fi
fi
