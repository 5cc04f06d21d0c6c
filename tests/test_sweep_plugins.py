"""Hydra plugins (`pip install -e .[sweep]`): the configs in conf/hydra/ compose, a 2-trial Optuna search
and a submitit_local sweep run through the real `testbed-train`; `+key=` on an existing key is explained."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from testbed.errors import ConfigError
from testbed.train.cli import CONF_DIR, check_overrides
from tests.conftest import synth_overrides
from tests.test_train import cli

pytestmark = pytest.mark.slow

PLUGIN_CONFIGS = sorted(
    f"{p.parent.relative_to(Path(CONF_DIR))}={p.stem}" for p in Path(CONF_DIR, "hydra").glob("*/*.yaml")
)
TARGETS = {
    "hydra/sweeper=optuna_lr_balance": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra/launcher=local": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra/job_logging=rich": None,  # a logging config, no plugin: see test_rich_job_logging_composes
}
TINY = ("trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_threads=1")


def compose_with_hydra(override: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[override], return_hydra_config=True)


def test_every_plugin_config_is_known():
    assert PLUGIN_CONFIGS == sorted(TARGETS)


def test_rich_job_logging_composes():
    """The default job logging (conf/config.yaml): the console handler from testbed's factory, the run's
    log file in Hydra's plain format."""
    logging_cfg = compose_with_hydra("hydra/job_logging=rich").hydra.job_logging
    assert logging_cfg.handlers.console["()"] == "testbed.train.progress.rich_log_handler"
    assert logging_cfg.handlers.file.formatter == "plain" and logging_cfg.root.handlers == ["console", "file"]
    default = compose_with_hydra("hydra/job_logging=default").hydra.job_logging
    assert default.handlers.console["class"] == "logging.StreamHandler"


@pytest.mark.parametrize("override", [c for c in PLUGIN_CONFIGS if TARGETS.get(c)])
def test_plugin_config_composes(override):
    cfg = compose_with_hydra(override)
    group = override.split("=")[0].split("/")[1]
    assert cfg.hydra[group]["_target_"] == TARGETS[override]


def test_optuna_search_space_names_existing_keys():
    cfg = compose_with_hydra("hydra/sweeper=optuna_lr_balance")
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20
    parser = OverridesParser.create()
    bounds = {}
    for key, space in sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a key of the training config"
        override = parser.parse_override(f"{key}={space}")
        assert override.is_sweep_override() and "log" in override.value().tags
        bounds[key] = (override.value().start, override.value().end)
    assert bounds == {"optim.lr": (3e-4, 3e-2), "balance.coefficient": (1e-3, 1e-1)}
    sampler = instantiate(sweeper.sampler)
    assert type(sampler).__name__ == "TPESampler"


def test_slurm_template_keys():
    launcher = compose_with_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher.partition is None and launcher.timeout_min == 240
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 1)
    assert compose_with_hydra("hydra/launcher=local").hydra.launcher.n_jobs == 2


def test_plus_on_an_existing_key_says_what_to_write():
    with pytest.raises(ConfigError, match=r"trainer.num_nodes exists already: write trainer.num_nodes=2"):
        check_overrides(["+trainer.num_nodes=2"])
    check_overrides(["trainer.num_nodes=2", "++trainer.devices=1"])  # both fine


def sweep_of_two(root, sweep: Path, *plugin_overrides: str) -> list[dict]:
    """Run `testbed-train -m` with these overrides on the tiny synthetic mix; the two runs' summaries."""
    result = cli(
        "-m", *synth_overrides(root, *TINY), *plugin_overrides, f"hydra.sweep.dir={sweep}", cwd=sweep.parent
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]


@pytest.mark.heavy  # tests/test_sweeps.py runs an Optuna search in CI
def test_optuna_search_of_two_trials(synth_mix, tmp_path):
    sweep = tmp_path / "optuna"
    trials = sweep_of_two(synth_mix, sweep, "hydra/sweeper=optuna_lr_balance", "hydra.sweeper.n_trials=2")
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(trials, key=lambda s: s["val/loss"])
    # the sweeper got each run's final val/loss back and kept the smaller one, with its parameters
    assert found["best_value"] == pytest.approx(best["val/loss"], rel=1e-12)
    assert found["best_params"]["optim.lr"] == pytest.approx(best["resolved"]["optim"]["lr"])
    assert found["best_params"]["balance.coefficient"] == pytest.approx(
        best["resolved"]["balance"]["coefficient"]
    )
    for trial in trials:
        assert 3e-4 <= trial["resolved"]["optim"]["lr"] <= 3e-2
        assert 1e-3 <= trial["resolved"]["balance"]["coefficient"] <= 1e-1
        assert trial["steps"] == 3 and math.isfinite(trial["val/loss"])
    assert trials[0]["resolved"]["optim"]["lr"] != trials[1]["resolved"]["optim"]["lr"]


@pytest.mark.heavy
def test_submitit_local_sweep_of_two_jobs(synth_mix, tmp_path):
    sweep = tmp_path / "submitit"
    runs = sweep_of_two(synth_mix, sweep, "hydra/launcher=submitit_local", "seed=0,1")
    summaries = {s["seed"]: s for s in runs}
    assert sorted(summaries) == [0, 1] and all(s["steps"] == 3 for s in summaries.values())
    # each submitit job returned its run's final val/loss to the launcher
    returned = []
    for path in sorted((sweep / ".submitit").glob("*/*_result.pkl")):
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success"
        returned.append(job_return.return_value)
    assert sorted(returned) == pytest.approx(sorted(s["val/loss"] for s in summaries.values()))
