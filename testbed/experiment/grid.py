"""The grid of a `testbed-experiment` experiment: its points as Hydra overrides, every point composed and
validated before any run, and the testbed-train processes (`Job`) each sweep plans, post-training sweeps
from the finished runs of their parent (with the expert path they fine-tune, `select_experts`)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from hydra import compose, initialize_config_dir

from testbed import CONF_DIR
from testbed.config import parse_config
from testbed.data.loading import missing_folder_error, resolve_data_path
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import CheckpointError
from testbed.experiment.schema import Experiment, ExperimentError, Sweep
from testbed.safe_load import load_file


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
    run_dir: Path, domain: str, fraction: float, pick: str = "top", seed: int = 0, source: str = "train"
) -> str:
    """finetune.experts={layer0:[...],...} from the last routing table saved by the run at `run_dir`: the
    experts that serve `domain` most (pick=top), or as many drawn at random per layer (pick=random). The
    table (source): `train` = the counts of the run's last measured training steps
    (routing/train_counts_step<N>.pt), so that the path is chosen on training data and its gain scored on
    validation; `val` = the last validation's counts (routing/counts_step<N>.pt)."""
    prefix = "train_counts_step" if source == "train" else "counts_step"
    tables = sorted(
        (run_dir / "routing").glob(f"{prefix}*.pt"), key=lambda p: int(p.stem.removeprefix(prefix))
    )
    if not tables:
        hint = (
            " (training counts are saved when metrics.train_every_n_steps and metrics.train_counts_window are"
            " > 0; select_experts.source=val uses the validation table)"
            if source == "train"
            else ""
        )
        raise ExperimentError(f"{run_dir}: no routing/{prefix}*.pt to select experts from{hint}")
    try:  # tensors and plain containers only (testbed/safe_load.py)
        table = load_file(tables[-1], "expert path")
    except CheckpointError as err:
        raise ExperimentError(str(err)) from err
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
        kept = [o for o in overrides if not o.startswith((*NOT_COMPARED, "+experiment=", "init_from="))]
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

    def mismatches(self) -> list[str]:
        """How the runs already in this job's folder were made differently from this job's command line:
        one line per run and setting (empty: every run there has this job's settings). Swept keys (a
        comma list here) and settings that cannot change results (threads, progress bar, resume, hydra.*)
        are not compared."""
        swept = {override_key(item) for item in self.args if _top_level_comma(item.partition("=")[2])}
        wanted = _settings(self.args, swept)
        lines = []
        for path in sorted(self.sweep_dir.glob("*/.hydra/overrides.yaml")):
            have = _settings(yaml.safe_load(path.read_text()) or [], swept)
            for key in sorted(set(wanted) | set(have)):
                if wanted.get(key) != have.get(key):
                    lines.append(
                        f"{path.parent.parent}: {key}={have.get(key, '(not set)')} there, "
                        f"{wanted.get(key, '(not set)')} requested"
                    )
        return lines

    def finished(self) -> bool:
        """Every run of this process ended: its summary.json says finished or failed (a rerun of the
        experiment skips the process; a failed run would fail again). Interrupted or unfinished runs make the
        rerun start the process again, with resume=auto: finished runs are not retrained, interrupted ones
        continue from their last checkpoint."""
        ended = [
            p for p in self.sweep_dir.glob("*/summary.json") if summary_status(p) in ("finished", "failed")
        ]
        return len(ended) >= self.runs


NOT_COMPARED = ("hydra.", "trainer.num_threads=", "trainer.progress_bar=", "resume=", "overwrite=")
"""Overrides that cannot change a run's results: not compared between runs (`Job.mismatches`) and not
inherited by post-training from a parent run (`parent_runs`)."""


def _top_level_comma(value: str) -> bool:
    """Whether a Hydra override value is a sweep list (a comma outside brackets and quotes)."""
    depth, quote = 0, None
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def _settings(overrides: list[str], skip: set[str]) -> dict[str, str]:
    """key -> value (outer quotes removed) of the overrides that decide a run's results."""
    settings = {}
    for item in overrides:
        key = override_key(item)
        if item.startswith(NOT_COMPARED) or key in skip:
            continue
        value = item.partition("=")[2].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        try:  # false == False, 1e-3 == 0.001: compared as the values they parse to (as Hydra parses them)
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        settings[key] = json.dumps(parsed, sort_keys=True, default=str)
    return settings


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
