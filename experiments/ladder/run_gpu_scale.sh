#!/usr/bin/env bash
# The small rung of the scale ladder on a lent GPU (the device tool) or any CUDA machine:
#   experiments/ladder/run_gpu_scale.sh DEADLINE_S [overrides...]
# = experiments/run_gpu.sh scale_small DEADLINE_S 18: the 18 runs of conf/experiment/scale_small.yaml as
# packed processes on the one GPU, stopped at the deadline (interrupted runs are listed, never reported),
# their small outputs packed into $OUT/scale_small_runs.tgz: unpack into experiments/ladder/scale/small/, then
#   testbed-report --rank experiments/ladder/scale/micro/runs experiments/ladder/scale/small/runs
# Device tool: run(command="experiments/ladder/run_gpu_scale.sh 480", carry=[".whl"], timeout_s=560)
DEADLINE=${1:-480}; shift || true
exec "$(dirname "$0")/../run_gpu.sh" scale_small "$DEADLINE" 18 "$@"
