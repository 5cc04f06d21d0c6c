"""`testbed-train -m`: what the command line's pre-check (testbed.train.cli.train_main) does for sweeps,
before Hydra starts, and the value a run returns to the sweeper.

Hydra's sweep grammar reaches the runs unchanged: `key=a,b`, `choice(...)`, `range(start,stop,step=...)`
(integers when its bounds and step are integers), and for a sampling sweeper (Optuna) `interval(a,b)` and
`tag(log,interval(a,b))`. Before any run starts, each value a sweep can give is checked like a value on the
command line: every choice, the first and last value of a range and both bounds of an interval, against
the option's type and checks (`testbed.config.parse_config`), the other keys at their first values. The
search space in `hydra.sweeper.params` (the sweeper's config or `hydra.sweeper.params.<key>=...` on the
command line) is checked the same way. A search space on the command line is passed to the sweeper as the
sweep override it stands for (`hydra.sweeper.params.optim.lr=...` -> `optim.lr=...`): both Hydra sweepers
read the two forms alike, and a dotted key such as `optim.lr` cannot be added below
`hydra.sweeper.params` by an override.

The Optuna sweeper's direction follows `objective.direction`; each run returns the number at
`objective.key` in its summary.json (`objective_value`).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException

from testbed.errors import ConfigError

MULTIRUN_FLAGS = ("-m", "--multirun")
SWEEPER_PARAMS = "hydra.sweeper.params."
OPTUNA_SWEEPER = "OptunaSweeper"


def is_multirun(argv: list[str]) -> bool:
    return any(arg in MULTIRUN_FLAGS for arg in argv)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def sweeper_params_as_overrides(argv: list[str]) -> list[str]:
    """`hydra.sweeper.params.<key>=<search space>` -> `<key>=<search space>` (with -m): the sweep override
    it stands for, which the basic and the Optuna sweeper read like an entry of `hydra.sweeper.params`.
    Without -m there is no sweep to give it to: a ConfigError."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+")
        if not sep or arg.startswith("-") or not bare.startswith(SWEEPER_PARAMS):
            out.append(arg)
            continue
        target = bare.removeprefix(SWEEPER_PARAMS)
        if not is_multirun(argv):
            raise ConfigError(
                bare,
                value,
                f"a sweep's search space, for `testbed-train -m ...` (add -m; or set {target}=...)",
            )
        out.append(f"{target}={_unquote(value)}")
    return out


# --- experiment=<id> ------------------------------------------------------------------------------------


def experiment_grid(conf_dir: str, name: str) -> dict:
    """The `experiment:` block (seeds, sweeps) of conf/experiment/<name>.yaml, {} if it has none."""
    path = Path(conf_dir) / "experiment" / f"{name}.yaml"
    try:
        block = (yaml.safe_load(path.read_text()) or {}).get("experiment")
    except (OSError, yaml.YAMLError):
        return {}
    return block if isinstance(block, dict) else {}


def grid_words(conf_dir: str, name: str) -> str:
    block = experiment_grid(conf_dir, name)
    sweeps = [s.get("name", "?") for s in block.get("sweeps") or [] if isinstance(s, dict)]
    if not sweeps:
        return f"conf/experiment/{name}.yaml holds no grid"
    return (
        f"its grid (sweeps {', '.join(sweeps)}; seeds {block.get('seeds', [0])}) runs with "
        f"`testbed-experiment {name}` (`make experiment NAME={name}`; --dry-run prints each run's command)"
    )


def experiment_overrides(argv: list[str], conf_dir: str) -> list[str]:
    """`experiment=<id>` selects conf/experiment/<id>.yaml, the settings every run of that experiment's grid
    shares, for one run (passed on as `+experiment=<id>`, the form `testbed-experiment` gives its runs).
    The grid itself is not run by testbed-train: a single run says so, and `-m experiment=<id>` with nothing
    else to sweep, which can only mean the grid, is refused with the command that runs it."""
    multirun = is_multirun(argv)
    parser = OverridesParser.create()
    out, named, user_form = [], [], False
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "experiment" and not arg.startswith("-"):
            user_form |= not key.startswith("+")
            arg = f"+experiment={value}"
            named += [v.strip() for v in value.split(",") if v.strip()]
        out.append(arg)
    if not named:
        return out
    if multirun and user_form:
        others = [a for a in out if "=" in a and not a.startswith(("-", "+experiment=", "hydra.", "hydra/"))]
        sweeps = [a for a in others if _is_sweep(parser, a)]
        searched = any(a.startswith(("hydra/sweeper=", "hydra.sweeper.params")) for a in out)
        if len(named) == 1 and not sweeps and not searched:
            raise ConfigError(
                "experiment",
                named[0],
                f"one run's settings: testbed-train -m sweeps only what its command line lists, and "
                f"{grid_words(conf_dir, named[0])}; drop -m for one run with these settings, or add the "
                "keys to sweep (seed=0,1,2)",
            )
    if not multirun:
        for name in named:
            print(
                f"note: experiment={name}: one run with the settings every run of its grid shares "
                f"(conf/experiment/{name}.yaml); {grid_words(conf_dir, name)}",
                file=sys.stderr,
            )
    return out


def _is_sweep(parser, arg: str) -> bool:
    try:
        return parser.parse_override(arg).is_sweep_override()
    except HydraException:
        return False


# --- the values a sweep can give ------------------------------------------------------------------------


def range_bounds(start, stop, step, inclusive: bool = False) -> list:
    """The first and the last value of range(start, stop, step) ([] when empty): Hydra's basic sweeper
    stops before `stop`; Optuna's integer or stepped distribution (`inclusive`) may reach it."""
    if step == 0:
        return []
    span = (stop - start) / step
    count = math.floor(span + 1e-9) + 1 if inclusive else math.ceil(span - 1e-9)
    if count <= 0:
        return []
    last = start + (count - 1) * step
    if not all(isinstance(v, int) for v in (start, stop, step)):
        last = round(last, 12)
    return [start] if count == 1 else [start, last]


def sweep_candidates(override: Override, sampling: bool) -> list[tuple[Any, str]]:
    """(value, what it is in the sweep) for each value of the sweep `override` to check: every choice,
    a range's first and last value, an interval's bounds. `sampling`: the sweeper samples intervals
    (Optuna); the basic sweeper enumerates choices and ranges only, so an interval there is refused."""
    text = override.input_line or override.get_key_element()
    key = override.get_key_element()
    if override.is_interval_sweep():
        if not sampling:
            raise ConfigError(
                key,
                text.partition("=")[2],
                "choices (a,b or choice(...)) or range(...) with the basic sweeper; interval(...) is sampled "
                "by a sampling sweeper: add hydra/sweeper=optuna (or optuna_lr_balance)",
            )
        sweep = override.value()
        if sweep.start is None or sweep.end is None or not sweep.start < sweep.end:
            raise ConfigError(key, text, "interval(low, high) with low < high")
        if "log" in sweep.tags and sweep.start <= 0:
            raise ConfigError(key, text, "tag(log, interval(low, high)) with low > 0 (a log scale)")
        return [(sweep.start, "its lower bound"), (sweep.end, "its upper bound")]
    if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
        return []  # glob(...) over a group's options: Hydra expands it to options that exist
    if override.is_range_sweep():
        sweep = override.value()
        bounds = range_bounds(sweep.start, sweep.stop, sweep.step, inclusive=sampling and not sweep.shuffle)
        if not bounds:
            raise ConfigError(key, text, "a range with at least one value: range(start, stop, step=...)")
        return list(zip(bounds, ["its first value", "its last value"], strict=False))
    if override.is_sweep_override():
        return [(value, "one of its choices") for value in override.sweep_iterator()]
    return [(override.value(), "its value")]


def _set_path(node: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[parts[-1]] = value


def _as_override_text(value: Any) -> str:
    """A value back into Hydra's override grammar (for composing a config group's choice)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_as_override_text(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_sweep_values(
    sweeps: list[Override], concrete: list[str], base: dict, groups: set[str], compose_run, sampling: bool
) -> int:
    """Check every value of each sweep in `sweeps` (see `sweep_candidates`) as that run's value, the other
    keys at the first values (`concrete`, composed into `base`: a plain container, no hydra node). A config
    group's choice is composed (`compose_run(overrides)` -> plain container), any other key set in a copy
    of `base`; then the run's checks (`parse_config`). Returns the number of configurations checked."""
    from testbed.config import parse_config  # torch and the model's code: only once a sweep is checked

    try:
        parse_config(base)  # the first values
    except ConfigError as err:
        swept = next((o for o in sweeps if o.get_key_element().lstrip("+~") == err.key), None)
        if swept is None:
            raise
        where = f"the value the sweep {swept.input_line} starts from"
        raise ConfigError(err.key, err.value, f"{err.allowed} ({where})") from None
    checked = 1
    for override in sweeps:
        key = override.get_key_element()
        bare = key.lstrip("+~")
        for value, what in sweep_candidates(override, sampling):
            if bare.split("@")[0] in groups:
                prefix = key[: len(key) - len(bare)]
                item = f"{prefix}{bare}={_as_override_text(value)}"
                others = [c for c in concrete if c.partition("=")[0].lstrip("+~") != bare]
                candidate = compose_run([*others, item])
            else:
                candidate = copy.deepcopy(base)
                _set_path(candidate, bare, value)
            try:
                parse_config(candidate)
            except ConfigError as err:
                where = f"{what} in the sweep {override.input_line or bare}"
                if err.key == bare:
                    raise ConfigError(err.key, err.value, f"{err.allowed} ({where})") from None
                raise ConfigError(
                    err.key, err.value, f"{err.allowed} (with {bare}={value!r}, {where})"
                ) from None
            checked += 1
    return checked


def search_space(argv_sweeps: list[Override], sweeper: dict) -> list[Override]:
    """The sweeps a run of this command line's sweeper will draw from: the command line's sweep overrides
    and the entries of the sweeper's `params` (an entry on the command line wins, as in the sweepers)."""
    parser = OverridesParser.create()
    from_config = []
    for key, value in (sweeper.get("params") or {}).items():
        try:
            override = parser.parse_override(f"{key}={value}")
        except HydraException as err:
            raise ConfigError(
                f"hydra.sweeper.params.{key}", value, f"a value in Hydra's sweep grammar ({err})"
            ) from None
        from_config.append(override)
    given = {o.get_key_element().lstrip("+~") for o in argv_sweeps}
    return [o for o in from_config if o.get_key_element().lstrip("+~") not in given] + argv_sweeps


def is_sampling_sweeper(sweeper: dict) -> bool:
    return OPTUNA_SWEEPER in str(sweeper.get("_target_", ""))


def direction_overrides(argv: list[str], sweeper: dict, objective_direction: str) -> list[str]:
    """The Optuna sweeper searches in `objective.direction`: the override that makes it do so when its
    config says otherwise (Hydra's own hydra/sweeper=optuna minimizes); a `hydra.sweeper.direction` on the
    command line that disagrees with objective.direction is refused (one place states the direction)."""
    if not is_sampling_sweeper(sweeper):
        return []
    direction = sweeper.get("direction")
    given = [a for a in argv if a.lstrip("+").startswith("hydra.sweeper.direction=")]
    if isinstance(direction, list | tuple):
        raise ConfigError(
            "hydra.sweeper.direction",
            direction,
            "one direction: each run returns one number (objective.key, objective.direction)",
        )
    name = getattr(direction, "name", direction)
    if str(name) == objective_direction:
        return []
    if given:
        raise ConfigError(
            "hydra.sweeper.direction",
            str(name),
            f"the direction of objective.direction ({objective_direction}): set objective.direction="
            f"{name} to search that way",
        )
    return [f"hydra.sweeper.direction={objective_direction}"]


# --- what a run returns --------------------------------------------------------------------------------


def objective_value(summary: dict, key: str) -> float | None:
    """The number at `key` (objective.key) in a run's summary, returned to the sweeper. A run that did not
    finish (failed, interrupted: no results) returns None. A finished run without that number is a
    ConfigError that lists the numbers it has."""
    if summary.get("status", "finished") != "finished":
        return None
    value = summary.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    numbers = sorted(k for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool))
    raise ConfigError(
        "objective.key", key, f"a number in the run's summary.json; this run's numbers: {numbers}"
    )
