#!/usr/bin/env bash
# The token ladder at tiny (experiments/ladder/README.md, "Tiny up the token ladder"): the scale ladder's tiny
# configuration (conf/experiment/scale_tiny.yaml: the tiny model on the large mix, 16 x 128-token steps,
# AdamW at 3e-3) trained for longer, each rung its own cosine schedule. Its 1,500-step rung is the scale
# ladder's tiny grid (scale/tiny/runs); this script adds 3,000 steps (RUNGS="3000 6000" for more) for the
# default router (`lbl_micro_batch`: top-2 softmax, load balance 0.01 at micro-batch scope), hash and the
# dense model of equal active parameters, seeds 0-2, into tiny/<steps>/<role>/s<seed>. Run names are the
# scale grid's sweep names, so that `testbed-report scale/tiny/runs tiny --ladder` pairs the rungs.
#
# Resumable: a run whose summary.json says finished (or failed) is skipped, an interrupted one resumes from
# its last.ckpt. JOBS single-threaded processes at once (default 2); RUNGS / ROLES / SEEDS narrow the grid;
# DRY=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/ladder/grid.sh
commands() {
  for rung in ${RUNGS:-3000}; do
    for seed in ${SEEDS:-0 1 2}; do
      for role in ${ROLES:-lbl_micro_batch hash dense_active}; do
        case $role in
          lbl_micro_batch) args="model=tiny" ;;
          hash) args="model=tiny router=hash balance=none" ;;
          dense_active) args="model=tiny_dense" ;;
          *) echo "unknown role $role (lbl_micro_batch hash dense_active)" >&2; exit 2 ;;
        esac
        dir=experiments/ladder/tiny/$rung/$role/s$seed
        queue_run "$dir" "+experiment=scale_tiny $args trainer.max_steps=$rung trainer.val_check_interval=1500" \
          "seed=$seed run_name=$role trainer.num_threads=1"
      done
    done
  done
}
run_queue
