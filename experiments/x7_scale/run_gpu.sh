#!/usr/bin/env bash
# X7 on a lent GPU (the device tool) or any CUDA machine: experiments/x7_scale/run_gpu.sh DEADLINE_S [overrides...]
# = experiments/run_gpu.sh x7 DEADLINE_S 12 [overrides...]: the grid as 12 packed processes, stopped at the
# deadline, its small outputs packed into $OUT/x7_runs.tgz (unpack here, then rebuild.sh).
DEADLINE=${1:-240}; shift || true
exec "$(dirname "$0")/../run_gpu.sh" x7 "$DEADLINE" 12 "$@"
