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
if [ -d mechanism ]; then
    # each mechanism against the default run (moe) and hash at 1,500 steps, same seeds; the lr sweep's
    # models each at its own rates (val loss table)
    $R ../regime_large mechanism --ladder --reference moe --out mechanism/report.md
    # the learning-rate sweep: every configuration against the learned router at its best rate (1e-2), so
    # that hash and dense-active are compared at their own best rates too
    $R ../regime_large mechanism/*_lr* --ladder --reference moe_lr1e-2 --out mechanism/best_rate.md
    # the learned router's gate mass (summed gates per token): logged by the learning-rate runs, and
    # scored by testbed-analyze --summary-only on the LBL 1e-3 runs' checkpoints (analysis/)
    $R mechanism/lbl_1e-3 mechanism/moe_lr* --columns "$GATE_MASS" --out mechanism/gate_mass.md
fi
