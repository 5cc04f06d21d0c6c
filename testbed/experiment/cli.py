"""`testbed-experiment <id>` (`make experiment NAME=<id>`): run a paper-reproduction grid, then report it.

The command line and the processes it runs: its options, threads per packed process, one `testbed-train -m`
process per planned job (`testbed.experiment.grid`), the experiment's commands, then `testbed-report`.
The experiment file's format: testbed/experiment/__init__.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra import compose, initialize_config_dir

from testbed import CONF_DIR
from testbed.analysis import report
from testbed.config import parse_config
from testbed.experiment.grid import (
    Job,
    check_grid,
    grid_points,
    merge_overrides,
    parent_runs,
    plan_sweep,
    stages,
)
from testbed.experiment.schema import Experiment, ExperimentError, available, load_experiment

GPU_THREADS_CAP = 4
"""CPU threads per packed GPU process at most: torch's CPU ops only feed the device there, and more
threads per process than this oversubscribe the cores that N processes and their compile workers share."""


def threads_per_job(jobs: int, gpu: bool, cores: int | None = None) -> int:
    """`trainer.num_threads` for each of `jobs` concurrent processes."""
    share = max(1, (cores or os.cpu_count() or 1) // jobs)
    return min(share, GPU_THREADS_CAP) if gpu else share


def runs_on_gpu(experiment: Experiment, extra: list[str]) -> bool:
    """Whether the experiment's first grid point trains on a GPU (trainer.accelerator gpu/cuda)."""
    point = merge_overrides(experiment.sweeps[0].overrides, *grid_points(experiment.sweeps[0])[:1], extra)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run = parse_config(compose("config", overrides=[f"+experiment={experiment.name}", *point]))
    return run.trainer.accelerator in ("gpu", "cuda")


def run_job(job: Job, threads: int, python: str, log) -> int:
    command = [
        python,
        "-m",
        "testbed.train.cli",
        "-m",
        *job.args,
        f"hydra.sweep.dir={job.sweep_dir}",
        f"trainer.num_threads={threads}",
        "trainer.progress_bar=false",
        # a rerun continues interrupted runs from their last checkpoint and does not retrain ended ones
        "resume=auto",
    ]
    job.sweep_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{job.sweep}] {shlex.join(command[3:])}")
    with open(job.sweep_dir / "sweep.log", "a") as fh:
        result = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        log(f"[{job.sweep}] exit status {result.returncode}; see {job.sweep_dir / 'sweep.log'}")
    return result.returncode


def fill(template: str, **values) -> list[str]:
    return [part.format(**values) for part in shlex.split(template)]


def run_command(argv: list[str], log) -> int:
    log("$ " + shlex.join(argv))
    bin_dir = Path(sys.executable).parent
    if (bin_dir / argv[0]).exists():
        argv = [str(bin_dir / argv[0]), *argv[1:]]
    return subprocess.run(argv, check=False).returncode


def commands_for(commands: list[dict], sweeps: list) -> list[dict]:
    """The grid's commands that concern the sweeps being run: every `once` command, and the `each_run_of`
    commands of those sweeps only (so `--sweeps oracle` adds one sweep to a finished grid without
    re-evaluating the others' runs)."""
    names = {sweep.name for sweep in sweeps}
    return [command for command in commands if "once" in command or command["each_run_of"] in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed-experiment", description=__doc__.splitlines()[0])
    parser.add_argument(
        "name", help=f"experiment id, one of conf/experiment/*.yaml: {', '.join(available())}"
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides for every run (they win over the grid's values)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="smoke variant (CI): validate every grid point, train the first value of each key briefly",
    )
    parser.add_argument("--out", type=Path, help="output folder (default multirun/<id>[-smoke]/<date_time>)")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the experiment's")
    parser.add_argument(
        "--sweeps", help="comma-separated sweep names: run only these sweeps of the grid (default: all)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="(sweep, seed) processes at once (default 1)")
    parser.add_argument(
        "--threads", type=int, help="trainer.num_threads per process (default: cores // jobs; GPU: at most 4)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the testbed-train commands only")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options
    try:
        experiment = load_experiment(args.name)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.sweeps:
        wanted = [name for name in args.sweeps.split(",") if name]
        names = [sweep.name for sweep in experiment.sweeps]
        unknown = [name for name in wanted if name not in names]
        if unknown:
            print(
                f"error: --sweeps: {args.name} has no sweep {unknown[0]!r}; its sweeps: {names}",
                file=sys.stderr,
            )
            return 2
        experiment = dataclasses.replace(
            experiment, sweeps=[sweep for sweep in experiment.sweeps if sweep.name in wanted]
        )
    seeds = experiment.smoke.get("seeds", [0]) if args.smoke else experiment.seeds
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    extra = [*(experiment.smoke.get("overrides", []) if args.smoke else []), *args.overrides]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or Path("multirun") / f"{args.name}{'-smoke' if args.smoke else ''}" / stamp
    log = print
    start = time.perf_counter()
    failures = 0
    try:
        checked = check_grid(experiment, extra, data="smoke" if args.smoke else "all")
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"experiment {args.name}: {checked} configurations compose and validate")
    threads = args.threads or threads_per_job(args.jobs, runs_on_gpu(experiment, extra))
    if args.jobs > 1:
        log(f"{args.jobs} training processes at once, trainer.num_threads={threads} each")
    for stage in stages(experiment.sweeps):
        jobs = []
        for sweep in stage:
            planned = plan_sweep(experiment, sweep, out, seeds, extra, first_only=args.smoke)
            if not planned and not args.dry_run:
                log(f"[{sweep.name}] nothing to run: sweep {sweep.parent!r} has no finished runs")
                failures += 1
            jobs += planned
        if args.dry_run:
            for job in jobs:
                log(shlex.join(["testbed-train", "-m", *job.args, f"hydra.sweep.dir={job.sweep_dir}"]))
            continue
        done = [job for job in jobs if job.finished()]
        for job in done:
            log(f"[{job.sweep}] finished before, skipped: {job.sweep_dir}")
        jobs = [job for job in jobs if job not in done]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda job: run_job(job, threads, sys.executable, log), jobs))
        failures += sum(code != 0 for code in codes)
    if args.dry_run:
        return 0
    commands = experiment.smoke.get("commands", experiment.commands) if args.smoke else experiment.commands
    for command in commands_for(commands, experiment.sweeps):
        if "once" in command:
            failures += run_command(fill(command["once"], out=out, conf=CONF_DIR), log) != 0
            continue
        for run_dir, _ in parent_runs(out, command["each_run_of"]):
            failures += run_command(fill(command["run"], out=out, run=run_dir, conf=CONF_DIR), log) != 0
    report_args = [str(out), "--out", str(out / "report.md"), "--plots"]
    for key in ("columns", "curves", "layer_metrics"):
        if key in experiment.report:
            report_args += [f"--{key.replace('_', '-')}", ",".join(experiment.report[key])]
    code = report.main(report_args)
    minutes = (time.perf_counter() - start) / 60
    log(f"experiment {args.name}{' (smoke)' if args.smoke else ''}: {minutes:.1f} min, out {out}")
    if failures:
        log(f"{failures} sweep process(es) or command(s) failed; the report lists runs that did not finish")
    return 1 if failures or code else 0
