# Sourced by the ladder's run scripts (run.sh, mechanism.sh, run_tiny.sh): each defines `commands`, which
# prints one training command per run through `queue_run`, then calls `run_queue`.
#
# queue_run DIR OVERRIDES: print the single-threaded training command that writes the run into DIR, unless
# the run has ended (summary.json says finished or failed); an interrupted run (status "interrupted") is
# printed again and continues from its last.ckpt (resume=auto).
queue_run() {
  local dir=$1
  shift
  grep -qE '"status": "(finished|failed)"' "$dir/summary.json" 2>/dev/null && return 0
  echo "OMP_NUM_THREADS=1 .venv/bin/testbed-train $* trainer.progress_bar=false resume=auto" \
    "hydra.run.dir=$dir > /dev/null 2>&1 && echo done $dir || echo FAILED $dir"
}
# run_queue: DRY=1 prints the commands; otherwise JOBS processes at once (default 2) run them.
run_queue() {
  if [ -n "${DRY:-}" ]; then commands; exit 0; fi
  commands | xargs -P "${JOBS:-2}" -I{} bash -c {}
}
