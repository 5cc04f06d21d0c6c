#!/usr/bin/env bash
# The mechanism runs (experiments/ladder/README.md, "Mechanism"): candidates for why hash routing beats the
# learned top-2 router, each a change to the default run (data=large, micro, 1,500 steps: the ladder's
# 1,500-step rung, whose moe / hash / dense runs in experiments/regime_large are the shared baselines,
# same seeds):
#   renorm       router.renormalize=true            gates of the chosen experts sum to 1
#   freeze       optim.router_freeze_step=300       the router stops training after 300 steps
#   hash_start   router.hash_steps=300              two-stage start: hash experts gated by the router, then top-k
#   lbl_1e-3     balance.coefficient=0.001          a tenth of the default load balance
#   init_0.1     optim.router_init_scale=0.1        router gates start 10x smaller
#   init_10      optim.router_init_scale=10         router gates start 10x larger: decisive (hash-like) choices from step 0
#   fine64       64 experts of hidden 16, top-8     fine-grained, equal active and total parameters
#   hash64       the same, routed by hash           fine64's hash baseline
#   fine64_renorm  fine64 with renormalised gates   the eight chosen gates sum to 1 (fine64's gate mass is 0.51)
#   fine64_lr1e-2, hash64_lr1e-2                    fine64 and hash64 at the micro models' best rate (3 seeds)
#   lr sweep     optim.lr 1e-3, 1e-2 and 3e-2       for moe, hash and dense_active: each model at its best rate
#                (<model>_lr<rate>; every other run uses 3e-3, the baselines' rate); renorm_lr1e-2: renormalised
#                gates at the best rate; dense_total_lr1e-2: the dense model of equal total parameters at the
#                default run's rate (its regime check's dense-total baseline)
# Seeds 0-4 (the lr sweep 0-2). Resumable like run.sh; JOBS / NAMES / SEEDS narrow it; DRY=1 prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/ladder/grid.sh
FINE="model.moe.num_experts=64 model.moe.expert_hidden=16 router.top_k=8"
commands() {
  for name in ${NAMES:-renorm freeze hash_start lbl_1e-3 init_0.1 init_10 fine64 hash64 moe_lr1e-3 moe_lr1e-2 moe_lr3e-2 hash_lr1e-3 hash_lr1e-2 hash_lr3e-2 dense_active_lr1e-3 dense_active_lr1e-2 dense_active_lr3e-2 renorm_lr1e-2 dense_total_lr1e-2 fine64_renorm fine64_lr1e-2 hash64_lr1e-2}; do
    case $name in
      renorm) args="router.renormalize=true" ;;
      freeze) args="optim.router_freeze_step=300" ;;
      hash_start) args="router.hash_steps=300" ;;
      lbl_1e-3) args="balance.coefficient=0.001" ;;
      init_0.1) args="optim.router_init_scale=0.1" ;;
      init_10) args="optim.router_init_scale=10" ;;
      fine64) args="$FINE" ;;
      hash64) args="router=hash balance=none $FINE" ;;
      fine64_renorm) args="$FINE router.renormalize=true" ;;
      fine64_lr*) args="$FINE optim.lr=${name#fine64_lr}" ;;
      hash64_lr*) args="router=hash balance=none $FINE optim.lr=${name#hash64_lr}" ;;
      moe_lr*) args="optim.lr=${name#moe_lr}" ;;
      renorm_lr*) args="router.renormalize=true optim.lr=${name#renorm_lr}" ;;
      hash_lr*) args="router=hash balance=none optim.lr=${name#hash_lr}" ;;
      dense_active_lr*) args="model=micro_dense optim.lr=${name#dense_active_lr}" ;;
      dense_total_lr*) args="model=micro_dense_total optim.lr=${name#dense_total_lr}" ;;
      *) echo "unknown name $name" >&2; exit 2 ;;
    esac
    case $name in *_lr*) ;; *) args="$args optim.lr=3e-3" ;; esac  # the baselines' rate, pinned
    case $name in *_lr*) seeds=${SEEDS:-0 1 2} ;; *) seeds=${SEEDS:-0 1 2 3 4} ;; esac
    for seed in $seeds; do
      dir=experiments/ladder/mechanism/$name/s$seed
      queue_run "$dir" "$args seed=$seed run_name=$name"
    done
  done
}
run_queue
