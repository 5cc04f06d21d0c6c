"""Every committed run under experiments/ still composes, from its recorded overrides, to the settings it
trained with: a change of a default (the default run's learning rate, say) must not silently change what an
experiment's configuration means. Each run's `.hydra/overrides.yaml` is composed with today's conf/ and
compared with the resolved sections its `summary.json` recorded.

Runs launched by a script rather than an experiment configuration (experiments/ladder, regime_large) are
composed after the settings their script now pins (LAUNCHER_PINS): the script states what the default said
when the earlier runs were made. Runs recorded before the resolved sections existed are skipped.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from testbed.train.cli import CONF_DIR

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NOT_SETTINGS = ("seed=", "init_from=", "resume=", "hydra.", "trainer.progress_bar", "trainer.num_threads")
"""Overrides that do not change what is trained (or are checked elsewhere: the seed, the start checkpoint)."""
LAUNCHER_PINS = {
    "ladder": ["optim.lr=3e-3"],  # experiments/ladder/run.sh and mechanism.sh
    "regime_large": ["optim.lr=3e-3"],  # experiments/regime_large/run.sh
}
"""Settings the launching script passes before a run's own overrides (a run's own optim.lr wins)."""
HISTORICAL = {
    "x1_scope/scope_8k": "X1 at its first scope scale (375 steps of 8,192 tokens, lr 6e-3, 25 warm-up steps: "
    "its README), composed from x1.yaml before the grid moved to the 1,500-step scope scale",
}
"""Runs made from an earlier version of their experiment's configuration, kept as the record of that run."""


def settings(resolved: dict, optim_keys) -> dict:
    """The compared settings of a resolved config (a summary's `resolved`, or a composition)."""
    router, balance = resolved.get("router") or {}, resolved.get("balance") or {}
    return {
        "optim": {k: resolved["optim"].get(k) for k in optim_keys},
        "router": {k: router.get(k) for k in ("name", "top_k", "renormalize")},
        "balance": {k: balance.get(k) for k in ("name", "coefficient", "scope")},
        "max_steps": resolved["trainer"].get("max_steps"),
        "data": {k: resolved["data"].get(k) for k in ("name", "batch_size", "seq_len")},
        "model": resolved["model"].get("name"),
    }


def committed_runs() -> dict[tuple[str, ...], list[tuple[Path, dict]]]:
    """{the overrides that set what is trained: [(run folder, its resolved config)]} over committed runs."""
    runs: dict[tuple[str, ...], list[tuple[Path, dict]]] = {}
    for record in sorted(EXPERIMENTS.rglob(".hydra/overrides.yaml")):
        run = record.parent.parent
        relative = run.relative_to(EXPERIMENTS).as_posix()
        if not (run / "summary.json").exists() or any(relative.startswith(h) for h in HISTORICAL):
            continue
        resolved = json.loads((run / "summary.json").read_text()).get("resolved", {})
        if not all(k in resolved for k in ("model", "data", "optim", "trainer")):
            continue  # recorded before summaries held the resolved sections
        overrides = [o for o in yaml.safe_load(record.read_text()) if not o.startswith(NOT_SETTINGS)]
        if not any(o.startswith("+experiment=") for o in overrides):
            overrides = LAUNCHER_PINS[relative.split("/")[0]] + overrides
        runs.setdefault(tuple(overrides), []).append((run, resolved))
    return runs


def test_every_committed_run_composes_to_what_it_trained_with():
    runs = committed_runs()
    assert sum(len(v) for v in runs.values()) > 300  # the committed runs are found (356 when written)
    wrong = []
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for overrides, members in runs.items():
            composed = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
            for run, resolved in members:
                keys = (
                    resolved["optim"].keys() & composed["optim"].keys()
                )  # options added since: not recorded
                if settings(composed, keys) != settings(resolved, keys):
                    wrong.append(
                        f"{run.relative_to(EXPERIMENTS)}: {settings(resolved, keys)} but now composes to "
                        f"{settings(composed, keys)} from {list(overrides)}"
                    )
    assert not wrong, "\n".join(wrong)


def test_a_changed_default_is_caught():
    """The check above fails for a run whose settings its overrides no longer produce."""
    (overrides, [(run, resolved)]) = next(
        (k, v[:1]) for k, v in committed_runs().items() if "regime_large" in str(v[0][0])
    )
    changed = json.loads(json.dumps(resolved))
    changed["optim"]["lr"] = 1e-2  # what the run would get without its launcher's pin
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        composed = OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)
        unpinned = OmegaConf.to_container(
            compose("config", overrides=[o for o in overrides if o not in LAUNCHER_PINS["regime_large"]]),
            resolve=True,
        )
    keys = resolved["optim"].keys()
    assert settings(composed, keys) == settings(resolved, keys)
    assert settings(composed, keys) != settings(changed, keys)
    assert settings(unpinned, keys) == settings(changed, keys)  # the default run's rate is 1e-2


def test_the_ladder_scripts_pin_the_rate_of_every_run():
    """run.sh and mechanism.sh state optim.lr in every command (a rung and seed never run: all listed)."""
    env = {"DRY": "1", "PATH": "/usr/bin:/bin", "RUNGS": "12345", "SEEDS": "99"}
    commands = []
    for script in ("ladder/run.sh", "ladder/mechanism.sh"):
        out = subprocess.run(
            ["bash", str(EXPERIMENTS / script)], env=env, capture_output=True, text=True, check=True
        )
        commands += out.stdout.splitlines()
    assert len(commands) == 6 + 22  # run.sh's six roles, mechanism.sh's twenty-two names
    rates = [next(a for a in c.split() if a.startswith("optim.lr=")) for c in commands]
    assert rates.count("optim.lr=3e-3") == 6 + 9  # every role and mechanism without a rate of its own
    assert "optim.lr=1e-2" in rates and "optim.lr=3e-2" in rates
