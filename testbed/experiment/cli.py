"""`testbed-experiment <id>` (`make experiment NAME=<id>`): run a paper-reproduction grid, then report it.

The command line and the processes it runs: its options, threads per packed process, one `testbed-train -m`
process per planned job (`testbed.experiment.grid`), the experiment's commands, then `testbed-report`.
Single-device CPU grids fork their processes from one that imported the training code once (`Launcher`;
TESTBED_LAUNCHER=subprocess for a fresh interpreter per job).
The experiment file's format: testbed/experiment/__init__.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
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
from testbed.train.cli import TRAINING_MODULES

GPU_THREADS_CAP = 4
"""CPU threads per packed GPU process at most: torch's CPU ops only feed the device there, and more
threads per process than this oversubscribe the cores that N processes and their compile workers share."""


def threads_per_job(jobs: int, gpu: bool, cores: int | None = None) -> int:
    """`trainer.num_threads` for each of `jobs` concurrent processes."""
    share = max(1, (cores or os.cpu_count() or 1) // jobs)
    return min(share, GPU_THREADS_CAP) if gpu else share


def first_run(experiment: Experiment, extra: list[str]):
    """The run config of the experiment's first grid point (its trainer decides how jobs are launched)."""
    point = merge_overrides(experiment.sweeps[0].overrides, *grid_points(experiment.sweeps[0])[:1], extra)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return parse_config(compose("config", overrides=[f"+experiment={experiment.name}", *point]))


def runs_on_gpu(experiment: Experiment, extra: list[str]) -> bool:
    """Whether the experiment's first grid point trains on a GPU (trainer.accelerator gpu/cuda)."""
    return first_run(experiment, extra).trainer.accelerator in ("gpu", "cuda")


def preloaded_launcher_fits(run) -> bool:
    """Whether jobs may start from a preloaded process (see `Launcher`): CPU runs on one device only (a
    multi-device run re-executes its command line per rank; CUDA must not be initialised before a fork),
    on a platform with the forkserver start method, unless TESTBED_LAUNCHER=subprocess asks otherwise."""
    wanted = os.environ.get("TESTBED_LAUNCHER", "auto")
    if wanted not in ("auto", "subprocess", "preload"):
        raise ExperimentError(f"TESTBED_LAUNCHER={wanted!r}: allowed are auto, subprocess, preload")
    if wanted == "subprocess" or "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    single = run.trainer.accelerator == "cpu" and str(run.trainer.devices) in ("1", "auto")
    return single and run.trainer.num_nodes == 1


def train_command(job: Job, threads: int) -> list[str]:
    """The `testbed-train -m` arguments of one job (without the program)."""
    return [
        "-m",
        *job.args,
        f"hydra.sweep.dir={job.sweep_dir}",
        f"trainer.num_threads={threads}",
        "trainer.progress_bar=false",
        # a rerun continues interrupted runs from their last checkpoint and does not retrain ended ones
        "resume=auto",
    ]


def _main_in_child(target: str, argv: list[str], log_path: str | None, env: dict[str, str], cwd: str) -> None:
    """A preloaded child: the launching process's environment and folder (the forkserver holds those of
    its own start), the output to `log_path` (else the launcher's own), then the console script `target`
    ("module:function") with `argv` in this process; its exit status as the process's."""
    import importlib
    import traceback

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    module, function = target.split(":")
    sys.argv = argv
    try:
        result = getattr(importlib.import_module(module), function)()
        code = result if isinstance(result, int) else 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the traceback goes to the log, as a process's would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def project_script(name: str) -> str | None:
    """The "module:function" of one of this project's console scripts (testbed-*), else None."""
    from importlib.metadata import entry_points

    found = [e.value for e in entry_points(group="console_scripts", name=name)]
    return found[0] if found and found[0].startswith("testbed.") else None


class Launcher:
    """Starts each job's `testbed-train -m` process. `subprocess`: a fresh interpreter per job (imports
    torch and Lightning each time, about 10 s of CPU on a small machine). `preload`: children forked from
    one forkserver process that imported the training code once, so a grid of short runs (the smoke
    variants) does not pay the imports per job; the child runs exactly the command line a subprocess
    would, with the same log file and exit status."""

    def __init__(self, preload: bool):
        self.context = None
        if preload:
            self.context = multiprocessing.get_context("forkserver")
            # the training modules too: testbed.train.cli imports them only once a run is accepted
            self.context.set_forkserver_preload(["testbed.train.cli", *TRAINING_MODULES])

    def run(self, job: Job, threads: int, log) -> int:
        args = train_command(job, threads)
        job.sweep_dir.mkdir(parents=True, exist_ok=True)
        log(f"[{job.sweep}] {shlex.join(args[1:])}")
        log_path = job.sweep_dir / "sweep.log"
        if self.context is None:
            command = [sys.executable, "-m", "testbed.train.cli", *args]
            with open(log_path, "a") as fh:
                code = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
        else:
            code = self._fork("testbed.train.cli:train_main", ["testbed-train", *args], str(log_path))
        if code != 0:
            log(f"[{job.sweep}] exit status {code}; see {log_path}")
        return code

    def command(self, argv: list[str], log) -> int:
        """One of the experiment's commands: this project's console scripts from the preloaded process,
        anything else as a subprocess (a program next to this Python's first, then on PATH)."""
        log("$ " + shlex.join(argv))
        target = project_script(argv[0]) if self.context is not None else None
        if target is not None:
            return self._fork(target, argv, None)
        bin_dir = Path(sys.executable).parent
        if (bin_dir / argv[0]).exists():
            argv = [str(bin_dir / argv[0]), *argv[1:]]
        return subprocess.run(argv, check=False).returncode

    def _fork(self, target: str, argv: list[str], log_path: str | None) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        child = self.context.Process(
            target=_main_in_child, args=(target, argv, log_path, dict(os.environ), os.getcwd())
        )
        child.start()
        child.join()
        return child.exitcode


def fill(template: str, **values) -> list[str]:
    return [part.format(**values) for part in shlex.split(template)]


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
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            print(
                f"error: --seeds {args.seeds!r}: allowed are comma-separated integers, e.g. 0,1,2",
                file=sys.stderr,
            )
            return 2
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
    try:
        first = first_run(experiment, extra)
        launcher = Launcher(preload=preloaded_launcher_fits(first))
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = args.threads or threads_per_job(args.jobs, first.trainer.accelerator in ("gpu", "cuda"))
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
        mismatched = [line for job in jobs for line in job.mismatches()]
        if mismatched:  # never report runs made with other settings under this command's labels
            shown = "\n  ".join(mismatched[:8]) + (
                f"\n  ... {len(mismatched) - 8} more" if len(mismatched) > 8 else ""
            )
            print(
                f"error: {out} holds runs made with other settings than this command's:\n  {shown}\n"
                "use another --out, or delete those run folders to train them again with these settings",
                file=sys.stderr,
            )
            return 2
        done = [job for job in jobs if job.finished()]
        for job in done:
            log(f"[{job.sweep}] finished before, skipped: {job.sweep_dir}")
        jobs = [job for job in jobs if job not in done]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda job: launcher.run(job, threads, log), jobs))
        failures += sum(code != 0 for code in codes)
    if args.dry_run:
        return 0
    commands = experiment.smoke.get("commands", experiment.commands) if args.smoke else experiment.commands
    for command in commands_for(commands, experiment.sweeps):
        if "once" in command:
            failures += launcher.command(fill(command["once"], out=out, conf=CONF_DIR), log) != 0
            continue
        for run_dir, _ in parent_runs(out, command["each_run_of"]):
            failures += launcher.command(fill(command["run"], out=out, run=run_dir, conf=CONF_DIR), log) != 0
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
