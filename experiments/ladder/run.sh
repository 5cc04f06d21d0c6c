#!/usr/bin/env bash
# The token ladder (experiments/ladder/README.md): separate runs, each with its own cosine schedule, at
# 750 / 1,500 / 3,000 / 6,000 optimizer steps of 16 x 128 tokens on the large mix (data=large, the micro
# model), for six configurations: the learned top-2 router with load balance 0.01 (`moe`, the default run),
# top-2 with auxiliary-loss-free expert bias (`eb`), Sinkhorn (`sinkhorn`), token-id hashing (`hash`) and
# the dense models of equal active and equal total parameters. Seeds 0-4 at 750 and 1,500 steps, 0-2 at
# 3,000 and 6,000 (RUNGS="12000" adds a longer rung). `renorm` (ROLES=renorm, not in the default list): the
# learned router with renormalised gates, the mechanism runs' winner, rerun up the ladder; its 1,500-step
# runs are mechanism/renorm's. `<role>_lr<rate>` (ROLES="moe_lr1e-2 hash_lr1e-2 dense_active_lr1e-2"): the
# role at learning rate <rate> instead of 3e-3 (every other role's, stated in its command), in runs_lr/; its
# 1,500-step runs are the mechanism runs' learning-rate sweep, mechanism/<role>_lr<rate>. The 1,500-step
# runs of moe/hash/dense_* are experiments/regime_large's (same configuration); this script adds their
# seeds 3 and 4 there.
#
# Resumable: a run whose summary.json says finished (or failed) is skipped, an interrupted one resumes from
# its last.ckpt.
# JOBS single-threaded processes at once (default 2). RUNGS / ROLES / SEEDS narrow the grid, e.g.
#   RUNGS="1500 3000" ROLES="moe hash" experiments/ladder/run.sh
# DRY=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/ladder/grid.sh
seeds_for() { case $1 in 750|1500) echo "0 1 2 3 4" ;; *) echo "0 1 2" ;; esac; }
commands() {
  for rung in ${RUNGS:-750 1500 3000 6000}; do
    for seed in ${SEEDS:-$(seeds_for "$rung")}; do
      for role in ${ROLES:-moe hash eb sinkhorn dense_active dense_total}; do
        base=${role%_lr*}  # the role without its learning-rate suffix
        lr="optim.lr=3e-3"  # the rate of every role without a suffix (pinned: the default run's is 1e-2)
        [ "$base" != "$role" ] && lr="optim.lr=${role##*_lr}"
        case $base in
          moe) args="" ;;
          eb) args="balance=expert_bias" ;;
          sinkhorn) args="router=sinkhorn balance=none" ;;
          hash) args="router=hash balance=none" ;;
          dense_active) args="model=micro_dense" ;;
          dense_total) args="model=micro_dense_total" ;;
          renorm) args="router.renormalize=true" ;;
          *) echo "unknown role $role (moe hash eb sinkhorn dense_active dense_total renorm," \
               "each with an optional _lr<rate>)" >&2; exit 2 ;;
        esac
        args="$args $lr"
        if [ "$rung" = 1500 ] && [ "$base" != "$role" ]; then
          dir=experiments/ladder/mechanism/$role/s$seed  # the learning-rate sweep's run
          steps=""
        elif [ "$rung" = 1500 ] && [ "$role" = renorm ]; then
          dir=experiments/ladder/mechanism/renorm/s$seed  # the mechanism run of the same configuration
          steps=""
        elif [ "$rung" = 1500 ] && [ "$role" != eb ] && [ "$role" != sinkhorn ]; then
          dir=experiments/regime_large/$role/s$seed
          steps=""  # the default run: 1,500 steps, validation every 250
        else
          tree=runs
          [ "$base" != "$role" ] && tree=runs_lr
          dir=experiments/ladder/$tree/$rung/$role/s$seed
          steps="trainer.max_steps=$rung trainer.val_check_interval=$(( rung <= 1500 ? 250 : rung / 6 ))"
        fi
        queue_run "$dir" "$args $steps seed=$seed run_name=$role"
      done
    done
  done
}
run_queue
