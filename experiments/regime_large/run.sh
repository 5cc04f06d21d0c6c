#!/usr/bin/env bash
# The regime check of the default run on the large mix (data=large, the micro model, 1,500 steps): the
# learned top-2 MoE and its three baselines, seeds 0-4 (SEEDS="0" for one). Skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
for seed in ${SEEDS:-0 1 2 3 4}; do
  for role in moe dense_active dense_total hash; do
    case $role in
      moe) args=() ;;
      dense_active) args=(model=micro_dense) ;;
      dense_total) args=(model=micro_dense_total) ;;
      hash) args=(router=hash balance=none) ;;
    esac
    dir=experiments/regime_large/$role/s$seed
    [ -f "$dir/summary.json" ] && continue
    # optim.lr=3e-3: the rate these runs used (the default run's has been 1e-2 since experiments/ladder's sweep)
    .venv/bin/testbed-train "${args[@]}" optim.lr=3e-3 seed=$seed run_name=$role trainer.progress_bar=false hydra.run.dir=$dir
  done
done
.venv/bin/testbed-report experiments/regime_large --out experiments/regime_large/report.md
