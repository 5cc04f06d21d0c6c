"""The experiment file of `testbed-experiment`: the `experiment:` block of conf/experiment/<id>.yaml (its
seeds, sweeps, commands, report and smoke variant; the format: testbed/experiment/__init__.py), read and
checked into an `Experiment`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed import CONF_DIR

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
            or not {"domain", "fraction"} <= set(select) <= {"domain", "fraction", "pick", "source"}
            or select.get("pick", "top") not in ("top", "random")
            or select.get("source", "train") not in ("train", "val")
        ):
            fail(
                f"sweeps[{i}].select_experts",
                "{domain: <name>, fraction: <0..1>, pick: top|random (optional), source: train|val "
                "(optional)} on a sweep with `from`",
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
