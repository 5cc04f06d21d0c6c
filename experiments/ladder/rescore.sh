#!/usr/bin/env bash
# Score ladder runs' final checkpoints on the whole validation split (data.val_tokens_per_domain=0: every
# held-out document of every domain) instead of the first 8,192 tokens per domain that validation reads
# during training (2-8 documents per domain on the large mix). testbed-analyze --summary-only writes
# <run>/analysis/analysis.json and summary.md (committed; the checkpoints are not), and
#   testbed-report ... --ladder --ladder-metric analysis/val/loss
# compares those losses (rebuild.sh writes rescored.md; lr_rescored.md for the learning-rate variants of
# runs_lr/). Dense runs get their loss only (no routing).
# Resumable (a run with analysis/analysis.json is skipped). RUNGS / ROLES / SEEDS narrow it; DRY=1 prints.
# RETRAIN=1: a finished run whose checkpoint is gone (checkpoints are not committed) is trained again from
# its recorded rate and overrides (summary.json, .hydra/overrides.yaml) into $SCRATCH (default
# /tmp/ladder_retrain), and scored only if the retrained run's final validation loss equals the committed
# summary's (to 1e-6: the same seed, one thread, the same numbers); otherwise it says so and scores nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
for rung in ${RUNGS:-6000 3000}; do
  for role in ${ROLES:-moe hash eb sinkhorn renorm dense_active dense_total moe_lr1e-2 hash_lr1e-2 dense_active_lr1e-2}; do
    for seed in ${SEEDS:-0 1 2 3 4}; do
      case $role in *_lr*) tree=runs_lr ;; *) tree=runs ;; esac  # run.sh's folders
      dir=experiments/ladder/$tree/$rung/$role/s$seed
      grep -q '"status": "finished"' "$dir/summary.json" 2>/dev/null || continue
      [ -f "$dir/analysis/analysis.json" ] && continue
      source=$dir
      if [ ! -f "$dir/checkpoints/last.ckpt" ]; then
        [ -n "${RETRAIN:-}" ] && [ -f "$dir/.hydra/overrides.yaml" ] || continue
        source=${SCRATCH:-/tmp/ladder_retrain}/$rung/$role/s$seed
        # the recorded rate first (runs from before the default rate changed do not state theirs), then the
        # recorded overrides
        rate=$(.venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['resolved']['optim']['lr'])" "$dir/summary.json")
        overrides="optim.lr=$rate $(sed -n 's/^- //p' "$dir/.hydra/overrides.yaml" | grep -v '^resume=' | tr '\n' ' ')"
        train="OMP_NUM_THREADS=1 .venv/bin/testbed-train $overrides resume=auto hydra.run.dir=$source"
        if [ -n "${DRY:-}" ]; then echo "$train"; else
          eval "$train" > /dev/null 2>&1 || { echo "FAILED retraining $dir"; continue; }
          same=$(.venv/bin/python -c "import json, sys; a, b = (json.load(open(f + '/summary.json'))['val/loss'] for f in sys.argv[1:]); print(int(abs(a - b) <= 1e-6))" "$dir" "$source")
          [ "$same" = 1 ] || { echo "NOT SCORED $dir: the retrained run's val/loss differs from the committed one"; continue; }
        fi
      fi
      cmd="OMP_NUM_THREADS=1 .venv/bin/testbed-analyze --summary-only --no-progress --out $dir/analysis $source data.val_tokens_per_domain=0"
      if [ -n "${DRY:-}" ]; then echo "$cmd"; continue; fi
      eval "$cmd" > /dev/null && echo "done $dir" || echo "FAILED $dir"
    done
  done
done
