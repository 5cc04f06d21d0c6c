"""`testbed-experiment <id>` (`make experiment NAME=<id>`): run a paper-reproduction grid, then report it.

An experiment is one Hydra config, `conf/experiment/<id>.yaml` (`# @package _global_`): its body sets
what every run shares (model size, steps, data), and its `experiment:` block lists the sweeps:

    experiment:
      seeds: [0, 1, 2]
      sweeps:
        - name: lbl                         # runs go to <out>/lbl/s<seed>/<job>
          grid: {balance: [load_balance], balance.scope: [sequence, micro_batch, global]}
          overrides: [data.batch_composition=homogeneous]   # fixed for this sweep
        - name: posttrain
          from: pretrain                    # once per finished run of sweep `pretrain`: its overrides,
          overrides: [data.domains=[code]]  # init_from=<its last.ckpt>, then this sweep's settings
          select_experts: {domain: code, fraction: 0.15}    # optional: finetune.experts per layer
                                                            # (pick: random = as many, drawn at random;
                                                            # source: train = counted on the parent's last
                                                            # measured training steps, the default, so the
                                                            # gain on validation is out of sample; val = on
                                                            # its validation set)
      commands:                             # optional, after the sweeps; {out} {run} {conf} filled in
        - {once: "testbed-quiz build --out {out}/quiz"}
        - {each_run_of: pretrain, run: "testbed-quiz eval {run} --quiz {out}/quiz"}
      report: {columns: [...], curves: [...], layer_metrics: [...]}
      smoke: {seeds: [0], overrides: [trainer.max_steps=4, ...]}   # --smoke: the CI variant (may also
                                                                    # replace `commands`)

Each (sweep, seed) is one `testbed-train -m` process; `--jobs N` runs N of them at once (on a GPU: N
processes sharing the one device, no MPS needed) with `trainer.num_threads = cores // N` (on a GPU at most
4: the CPU only feeds the device; `--threads` overrides). Concurrent runs share one token store
(`data.cache_dir`): the first builds it once, under a lock, the others wait and read it.
Finally `testbed-report` writes `<out>/report.md`, `report.csv`
and the figures. Failed runs are listed by the report and make the exit status non-zero.

The code: the experiment file (its schema and loading) in `testbed.experiment.schema`, the grid (its
points, their validation, the testbed-train processes it plans) in `testbed.experiment.grid`, running those
processes and the command line in `testbed.experiment.cli`; every name is importable from here.
"""

from __future__ import annotations

from testbed.experiment.cli import (
    GPU_THREADS_CAP,
    Launcher,
    commands_for,
    fill,
    first_run,
    main,
    preloaded_launcher_fits,
    project_script,
    runs_on_gpu,
    threads_per_job,
)
from testbed.experiment.grid import (
    Job,
    check_data_paths,
    check_grid,
    expert_path_override,
    grid_points,
    hydra_value,
    merge_overrides,
    override_key,
    parent_runs,
    plan_sweep,
    random_experts,
    stages,
    summary_status,
    top_domain_experts,
)
from testbed.experiment.schema import (
    EXPERIMENT_DIR,
    SWEEP_KEYS,
    Experiment,
    ExperimentError,
    Sweep,
    available,
    load_experiment,
)

__all__ = [
    "EXPERIMENT_DIR",
    "GPU_THREADS_CAP",
    "SWEEP_KEYS",
    "Experiment",
    "ExperimentError",
    "Job",
    "Sweep",
    "available",
    "check_data_paths",
    "check_grid",
    "commands_for",
    "first_run",
    "expert_path_override",
    "fill",
    "grid_points",
    "hydra_value",
    "load_experiment",
    "main",
    "merge_overrides",
    "override_key",
    "parent_runs",
    "plan_sweep",
    "random_experts",
    "Launcher",
    "preloaded_launcher_fits",
    "project_script",
    "runs_on_gpu",
    "stages",
    "summary_status",
    "threads_per_job",
    "top_domain_experts",
]
