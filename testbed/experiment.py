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
                                                            # (pick: random = as many, drawn at random)
      commands:                             # optional, after the sweeps; {out} {run} {conf} filled in
        - {once: "testbed-quiz build --out {out}/quiz"}
        - {each_run_of: pretrain, run: "testbed-quiz eval {run} --quiz {out}/quiz"}
      report: {columns: [...], curves: [...], layer_metrics: [...]}
      smoke: {seeds: [0], overrides: [trainer.max_steps=4, ...]}   # --smoke: the CI variant (may also
                                                                    # replace `commands`)

Each (sweep, seed) is one `testbed-train -m` process; `--jobs N` runs N of them at once (on a GPU: N
processes sharing the one device, no MPS needed) with `trainer.num_threads = cores // N` (on a GPU at most
4: the CPU only feeds the device; `--threads` overrides). Concurrent runs share the token-id cache
(`data.cache_dir`): the first encodes and writes each entry once, under a lock, the others read it.
Finally `testbed-report` writes `<out>/report.md`, `report.csv`
and the figures. Failed runs are listed by the report and make the exit status non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra import compose, initialize_config_dir

from testbed import CONF_DIR
from testbed.analysis import report
from testbed.config import parse_config
from testbed.data.loading import missing_folder_error, resolve_data_path
from testbed.data.tokenizer import load_tokenizer

EXPERIMENT_DIR = Path(CONF_DIR) / "experiment"
SWEEP_KEYS = {"name", "grid", "overrides", "from", "select_experts"}


class ExperimentError(ValueError):
    """The experiment file is malformed; the message names the file, the key and what is allowed."""


@dataclass
class Sweep:
    name: str
    grid: dict[str, list] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    parent: str | None = None
    select_experts: dict | None = None


@dataclass
class Experiment:
    name: str
    path: Path
    seeds: list[int]
    sweeps: list[Sweep]
    commands: list[dict]
    report: dict
    smoke: dict


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load_experiment(name: str, conf_dir: Path = EXPERIMENT_DIR) -> Experiment:
    """Read and check the `experiment:` block of conf/experiment/<name>.yaml."""
    path = conf_dir / f"{name}.yaml"
    if not path.exists():
        raise ExperimentError(f"no experiment {name!r}: {path} does not exist; available: {available()}")
    try:
        block = (yaml.safe_load(path.read_text()) or {}).get("experiment")
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(block, dict):
        raise ExperimentError(f"{path}: no `experiment:` block (seeds, sweeps, ...)")

    def fail(key: str, problem: str):
        raise ExperimentError(f"{path}: experiment.{key}: {problem}")

    seeds = block.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        fail("seeds", f"a non-empty list of integers, got {seeds!r}")
    sweeps: list[Sweep] = []
    for i, raw in enumerate(block.get("sweeps") or []):
        if not isinstance(raw, dict) or "name" not in raw:
            fail(f"sweeps[{i}]", f"a mapping with a name and some of {sorted(SWEEP_KEYS)}")
        unknown = sorted(set(raw) - SWEEP_KEYS)
        if unknown:
            fail(f"sweeps[{i}].{unknown[0]}", f"unknown key; allowed: {sorted(SWEEP_KEYS)}")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            fail(f"sweeps[{i}].grid", "a mapping of override key to a non-empty list of values")
        parent = raw.get("from")
        if parent is not None and parent not in [s.name for s in sweeps]:
            fail(
                f"sweeps[{i}].from",
                f"{parent!r} is not an earlier sweep; earlier: {[s.name for s in sweeps]}",
            )
        select = raw.get("select_experts")
        if select is not None and (
            parent is None
            or not {"domain", "fraction"} <= set(select) <= {"domain", "fraction", "pick"}
            or select.get("pick", "top") not in ("top", "random")
        ):
            fail(
                f"sweeps[{i}].select_experts",
                "{domain: <name>, fraction: <0..1>, pick: top|random (optional)} on a sweep with `from`",
            )
        sweeps.append(Sweep(raw["name"], grid, list(raw.get("overrides") or []), parent, select))
    if not sweeps:
        fail("sweeps", "at least one sweep")
    if len({s.name for s in sweeps}) != len(sweeps):
        fail("sweeps", "sweep names must be unique")
    commands = block.get("commands") or []
    smoke = block.get("smoke") or {}
    for i, command in enumerate([*commands, *smoke.get("commands", [])]):
        if not isinstance(command, dict) or not (
            {"once"} == set(command) or {"each_run_of", "run"} == set(command)
        ):
            fail(f"commands[{i}]", "{once: <command>} or {each_run_of: <sweep>, run: <command>}")
    return Experiment(
        name=name,
        path=path,
        seeds=seeds,
        sweeps=sweeps,
        commands=commands,
        report=block.get("report") or {},
        smoke=smoke,
    )


def hydra_value(value) -> str:
    """A YAML value as Hydra override syntax (lists as [a,b], None as null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def top_domain_experts(counts, domain: int, fraction: float) -> list[list[int]]:
    """Per layer, the round(fraction * E) experts (at least 1) that receive most of `domain`'s assignments
    in counts[L, D, E] (ties by expert id), sorted by id: the domain's expert path (X6)."""
    counts = np.asarray(counts, dtype=np.float64)
    keep = max(1, round(fraction * counts.shape[-1]))
    chosen = []
    for layer in counts:
        order = np.lexsort((np.arange(layer.shape[-1]), -layer[domain]))
        chosen.append(sorted(int(e) for e in order[:keep]))
    return chosen


def random_experts(num_layers: int, num_experts: int, fraction: float, seed: int) -> list[list[int]]:
    """Per layer, round(fraction * E) experts (at least 1) drawn at random (seeded), sorted by id: the
    control for the domain's expert path (as many trained experts, chosen without the domain)."""
    keep = max(1, round(fraction * num_experts))
    rng = np.random.default_rng(seed)
    return [sorted(int(e) for e in rng.choice(num_experts, keep, replace=False)) for _ in range(num_layers)]


def expert_path_override(
    run_dir: Path, domain: str, fraction: float, pick: str = "top", seed: int = 0
) -> str:
    """finetune.experts={layer0:[...],...} from the last routing table saved by the run at `run_dir`: the
    experts that serve `domain` most (pick=top), or as many drawn at random per layer (pick=random)."""
    tables = sorted(
        (run_dir / "routing").glob("counts_step*.pt"), key=lambda p: int(p.stem.removeprefix("counts_step"))
    )
    if not tables:
        raise ExperimentError(f"{run_dir}: no routing/counts_step*.pt to select experts from")
    table = torch.load(tables[-1], map_location="cpu", weights_only=False)
    if domain not in table["domains"]:
        raise ExperimentError(
            f"select_experts.domain {domain!r} not in {run_dir}'s domains {table['domains']}"
        )
    counts = table["counts"].numpy()
    if pick == "random":
        chosen = random_experts(counts.shape[0], counts.shape[-1], fraction, seed)
    else:
        chosen = top_domain_experts(counts, table["domains"].index(domain), fraction)
    # table["layers"] are the module's moe_layer_names, layer<i>: the keys finetune.experts takes
    return "finetune.experts=" + hydra_value(dict(zip(table["layers"], chosen, strict=True)))


def parent_runs(out: Path, sweep: str) -> list[tuple[Path, list[str]]]:
    """(run dir, its own overrides minus hydra/experiment/init_from ones) for each finished run of `sweep`."""
    runs = []
    for summary in sorted((out / sweep).rglob("summary.json")):
        if summary_status(summary) != "finished":
            continue
        run_dir = summary.parent
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        kept = [
            o
            for o in overrides
            if not o.startswith(
                (
                    "hydra.",
                    "+experiment=",
                    "init_from=",
                    "trainer.num_threads=",
                    "trainer.progress_bar=",
                    "resume=",
                    "overwrite=",
                )
            )
        ]
        runs.append((run_dir, kept))
    return runs


def override_key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Later groups win per key (a post-training sweep replaces its parent's trainer.max_steps, say)."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            merged[override_key(item)] = item
    return list(merged.values())


@dataclass
class Job:
    sweep: str
    sweep_dir: Path
    args: list[str]
    runs: int = 1  # training runs this process makes (the grid points it sweeps)

    def finished(self) -> bool:
        """Every run of this process ended: its summary.json says finished or failed (a rerun of the
        experiment skips the process; a failed run would fail again). Interrupted or unfinished runs make the
        rerun start the process again, with resume=auto: finished runs are not retrained, interrupted ones
        continue from their last checkpoint."""
        ended = [
            p for p in self.sweep_dir.glob("*/summary.json") if summary_status(p) in ("finished", "failed")
        ]
        return len(ended) >= self.runs


def summary_status(path: Path) -> str:
    """`status` of a run's summary.json (finished for summaries written before statuses existed)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(summary.get("status", "finished")) if isinstance(summary, dict) else "unreadable"


def plan_sweep(
    experiment: Experiment,
    sweep: Sweep,
    out: Path,
    seeds: list[int],
    extra: list[str],
    first_only: bool = False,
) -> list[Job]:
    grid = [
        f"{key}={','.join(hydra_value(v) for v in (values[:1] if first_only else values))}"
        for key, values in sweep.grid.items()
    ]
    base = [f"+experiment={experiment.name}"]
    jobs = []
    if sweep.parent is None:
        # One process per seed and value of the first swept key (so N parallel processes stay busy).
        split = next((k for k, v in sweep.grid.items() if len(v) > 1 and not first_only), None)
        parts = [[f"{split}={hydra_value(v)}"] for v in sweep.grid[split]] if split else [[]]
        sizes = [1 if first_only else len(v) for k, v in sweep.grid.items() if k != split]
        runs = int(math.prod(sizes))
        for seed in seeds:
            for i, part in enumerate(parts):
                args = merge_overrides(base, sweep.overrides, grid, part, extra, [f"seed={seed}"])
                name = f"s{seed}" + (f"-{i}" if split else "")
                jobs.append(Job(sweep.name, out / sweep.name / name, args, runs))
        return jobs
    for index, (run_dir, inherited) in enumerate(parent_runs(out, sweep.parent)):
        own = [f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}"]
        if sweep.select_experts:
            own.append(expert_path_override(run_dir, **sweep.select_experts, seed=index))
        args = merge_overrides(base, inherited, sweep.overrides, grid, extra, own)
        jobs.append(Job(sweep.name, out / sweep.name / f"from{index}", args))
    return jobs


def stages(sweeps: list[Sweep]) -> list[list[Sweep]]:
    """Sweeps in order, cut into stages that run their jobs in one pool: a sweep post-training from a sweep
    of the current stage starts the next stage (it needs the parent's checkpoints)."""
    result: list[list[Sweep]] = [[]]
    for sweep in sweeps:
        if sweep.parent in {s.name for s in result[-1]}:
            result.append([])
        result[-1].append(sweep)
    return result


def grid_points(sweep: Sweep, first_only: bool = False) -> list[list[str]]:
    """Every combination of the sweep's grid as override lists (only the first value of each key with
    first_only: the smoke variant's reduced grid)."""
    keys = list(sweep.grid)
    values = [sweep.grid[k][:1] if first_only else sweep.grid[k] for k in keys]
    return [
        [f"{k}={hydra_value(v)}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*values)
    ]


def check_data_paths(data) -> None:
    """A mix folder or tokenizer that does not exist fails the whole grid up front (DataError saying how to
    build it, e.g. `make data-languages`), not run by run."""
    if data.root is not None and not resolve_data_path(data.root).is_dir():
        raise missing_folder_error(resolve_data_path(data.root))
    if data.tokenizer is not None and not resolve_data_path(data.tokenizer).is_file():
        load_tokenizer(data.tokenizer)  # raises the DataError that names the file and how to build it


def check_grid(experiment: Experiment, extra: list[str], data: str = "all") -> int:
    """Compose and validate the config of every point of every sweep (no training): a bad value anywhere in
    the grid fails before any run starts. Post-training sweeps are checked on each parent point. The data
    folders and tokenizers are checked too: for every point (data="all"), for the points a smoke run
    trains (data="smoke": the first value of each key), or not at all (data="none"). Returns the number of
    configurations checked."""
    points: dict[str, list[list[str]]] = {}
    checked = 0
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for sweep in experiment.sweeps:
            parents = points[sweep.parent] if sweep.parent else [[]]
            points[sweep.name] = [
                merge_overrides(parent, sweep.overrides, point, extra)
                for parent in parents
                for point in grid_points(sweep)
            ]
            trained = [merge_overrides(point, extra) for point in grid_points(sweep, first_only=True)]
            for overrides in points[sweep.name]:
                try:
                    run = parse_config(
                        compose("config", overrides=[f"+experiment={experiment.name}", *overrides])
                    )
                    smoke_point = any(set(t) <= set(overrides) for t in trained)
                    if data == "all" or (data == "smoke" and smoke_point):
                        check_data_paths(run.data)
                except Exception as err:
                    raise ExperimentError(
                        f"{experiment.path}: sweep {sweep.name!r}, {overrides}: {err}"
                    ) from None
                checked += 1
    return checked


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
    for command in commands:
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


if __name__ == "__main__":
    sys.exit(main())
