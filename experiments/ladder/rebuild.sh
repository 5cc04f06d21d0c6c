#!/usr/bin/env bash
# Rebuild every number and figure of experiments/ladder/README.md from the committed runs: the token ladder
# (runs/<steps>/<role>/s<seed> and, for the 1,500-step rung of moe / hash / dense_*, experiments/regime_large)
# and, once run, the mechanism runs (mechanism/<name>/s<seed>, against the same 1,500-step baselines).
set -euo pipefail
cd "$(dirname "$0")"
R="$(pwd)/../../.venv/bin/testbed-report"
# the token ladder: validation loss per rung, gains paired by seed, Holm over the comparisons with hash,
# the trend per doubling of tokens, ladder.png
$R ../regime_large runs --ladder --out report.md --plots
if [ -d mechanism ]; then
    # each mechanism against the default run (moe) and hash at 1,500 steps, same seeds; the lr sweep's
    # models each at its own rates (val loss table)
    $R ../regime_large mechanism --ladder --reference moe --out mechanism/report.md
fi
