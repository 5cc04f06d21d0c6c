#!/usr/bin/env bash
# Score ladder runs' final checkpoints on the whole validation split (data.val_tokens_per_domain=0: every
# held-out document of every domain) instead of the first 8,192 tokens per domain that validation reads
# during training (2-8 documents per domain on the large mix). testbed-analyze --summary-only writes
# <run>/analysis/analysis.json and summary.md (committed; the checkpoints are not), and
#   testbed-report ... --ladder --ladder-metric analysis/val/loss
# compares those losses (rebuild.sh writes rescored.md). Dense runs get their loss only (no routing).
# Resumable (a run with analysis/analysis.json is skipped). RUNGS / ROLES narrow it; DRY=1 prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
for rung in ${RUNGS:-6000 3000}; do
  for role in ${ROLES:-moe hash eb sinkhorn renorm dense_active dense_total}; do
    for dir in experiments/ladder/runs/$rung/$role/s*; do
      [ -f "$dir/checkpoints/last.ckpt" ] || continue
      grep -q '"status": "finished"' "$dir/summary.json" 2>/dev/null || continue
      [ -f "$dir/analysis/analysis.json" ] && continue
      cmd="OMP_NUM_THREADS=1 .venv/bin/testbed-analyze --summary-only --no-progress --out $dir/analysis $dir data.val_tokens_per_domain=0"
      if [ -n "${DRY:-}" ]; then echo "$cmd"; continue; fi
      eval "$cmd" > /dev/null && echo "done $dir" || echo "FAILED $dir"
    done
  done
done
