"""Hydra's sweep grammar through `testbed-train -m`: every form Hydra offers reaches the sweeper (intervals
and tags for Optuna, range(...) with a keyword step for the basic sweeper, `hydra.sweeper.params.<key>=...`
on the command line), each value a sweep can give is checked against its option before the first run, and
the value a run returns to the sweeper is the summary number `objective.key`, searched in
`objective.direction`."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from testbed.errors import ConfigError
from testbed.train.cli import CONF_DIR, check_overrides, quote_values_with_equals
from testbed.train.sweeps import (
    experiment_overrides,
    objective_value,
    range_bounds,
    sweeper_params_as_overrides,
)
from tests.conftest import synth_overrides
from tests.inprocess import train

TINY = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_threads=1")


def precheck(*argv: str) -> list[str]:
    """What train_main does before Hydra starts, in order; returns the overrides it adds."""
    args = sweeper_params_as_overrides(list(argv))
    args = experiment_overrides(quote_values_with_equals(args), CONF_DIR)
    return check_overrides(args)


def test_optuna_interval_with_a_tag_passes_the_precheck():
    """The complaint: the pre-check ended in Hydra's "Can only enumerate CHOICE and RANGE sweeps"."""
    assert precheck("-m", "optim.lr=tag(log,interval(3e-4,3e-2))", "hydra/sweeper=optuna") == []
    assert precheck("-m", "optim.lr=interval(3e-4,3e-2)", "seed=0,1", "hydra/sweeper=optuna") == []


def test_a_range_with_a_keyword_step_stays_a_range():
    """`range(10,100,step=10)` holds an `=`: it was quoted into a string (then refused as not an integer);
    a path with `=` that the grammar cannot read is still quoted."""
    argv = ["-m", "optim.warmup_steps=range(10,100,step=10)", "init_from=/runs/lr=1e-3/last.ckpt"]
    assert quote_values_with_equals(argv) == [
        "-m",
        "optim.warmup_steps=range(10,100,step=10)",
        "init_from='/runs/lr=1e-3/last.ckpt'",
    ]
    assert precheck("-m", "optim.warmup_steps=range(10,100,step=10)") == []


def test_range_bounds():
    assert range_bounds(10, 100, 10) == [10, 90]  # Hydra's basic sweeper: stop excluded
    assert range_bounds(10, 100, 10, inclusive=True) == [10, 100]  # Optuna's IntDistribution: included
    assert range_bounds(0.1, 0.5, 0.1) == [0.1, 0.4]
    assert range_bounds(3, 4, 1) == [3] and range_bounds(5, 5, 1) == [] and range_bounds(9, 1, 1) == []


@pytest.mark.parametrize(
    "argv, key, fragment",
    [
        # each choice
        (
            ["optim.beta1=0.5,0.9,1.5"],
            "optim.beta1",
            "one of its choices in the sweep optim.beta1=0.5,0.9,1.5",
        ),
        (["router.top_k=choice(1,2,x)"], "router.top_k", "one of its choices"),
        # a range's first and last value
        (["optim.warmup_steps=range(-10,100,step=10)"], "optim.warmup_steps", "an integer >= 0 (the value"),
        (["optim.beta2=range(0.5,1.5,step=0.25)"], "optim.beta2", "its last value in the sweep"),
        # an interval's bounds, against the option's type and checks
        (
            ["optim.min_lr_ratio=interval(0.1,2.0)", "hydra/sweeper=optuna"],
            "optim.min_lr_ratio",
            "its upper bound in the sweep",
        ),
        (
            ["optim.warmup_steps=interval(10.5,100)", "hydra/sweeper=optuna"],
            "optim.warmup_steps",
            "an integer",
        ),
        (["optim.lr=tag(log,interval(0,1e-2))", "hydra/sweeper=optuna"], "optim.lr", "a float > 0"),
        (["optim.lr=interval(3e-2,3e-4)", "hydra/sweeper=optuna"], "optim.lr", "low < high"),
        # the basic sweeper enumerates: an interval needs a sampling sweeper
        (["optim.lr=interval(3e-4,3e-2)"], "optim.lr", "add hydra/sweeper=optuna"),
        # a config group's choice, checked with the other keys' first values
        (
            ["router=topk_softmax,expert_choice", "model.moe.capacity_factor=1.0"],
            "model.moe.capacity_factor",
            "with router='expert_choice', one of its choices in the sweep router=topk_softmax,expert_choice",
        ),
    ],
)
def test_every_value_of_a_sweep_is_checked(argv, key, fragment):
    with pytest.raises(ConfigError) as caught:
        precheck("-m", *argv)
    assert caught.value.key == key and fragment in str(caught.value), str(caught.value)


def test_sweeper_params_on_the_command_line():
    """`hydra.sweeper.params.<dotted key>=...` (Hydra refused it: "Key 'optim' is not in struct") is passed
    to the sweeper as the sweep override it stands for; its values are checked like any sweep's."""
    given = [
        "-m",
        "hydra/sweeper=optuna_lr_balance",
        "hydra.sweeper.params.optim.warmup_steps='range(10,100,step=10)'",
    ]
    assert sweeper_params_as_overrides(given) == [
        "-m",
        "hydra/sweeper=optuna_lr_balance",
        "optim.warmup_steps=range(10,100,step=10)",
    ]
    assert precheck(*given) == []
    with pytest.raises(ConfigError, match=r"an integer >= 0"):
        precheck(
            "-m", "hydra/sweeper=optuna", "hydra.sweeper.params.optim.warmup_steps=range(-5,100,step=10)"
        )
    with pytest.raises(ConfigError, match=r"add -m"):
        sweeper_params_as_overrides(["hydra.sweeper.params.optim.lr=interval(1e-4,1e-2)"])


def test_the_sweeper_configs_search_space_is_checked_too():
    """optuna_lr_balance searches balance.coefficient, which expert_bias does not have."""
    with pytest.raises(ConfigError) as caught:
        precheck("-m", "hydra/sweeper=optuna_lr_balance", "balance=expert_bias", "router=sigmoid")
    assert caught.value.key == "balance.coefficient" and "options of balancing method 'expert_bias'" in str(
        caught.value
    )
    assert precheck("-m", "hydra/sweeper=optuna_lr_balance", "router=sigmoid") == []


def test_the_optuna_direction_follows_objective_direction():
    assert precheck("-m", "hydra/sweeper=optuna", "objective.direction=maximize") == [
        "hydra.sweeper.direction=maximize"
    ]
    assert precheck("-m", "hydra/sweeper=optuna_lr_balance", "objective.direction=maximize") == []
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/sweeper=optuna_lr_balance", "objective.direction=maximize"],
            return_hydra_config=True,
        )
    assert OmegaConf.select(cfg, "hydra.sweeper.direction") == "maximize"
    with pytest.raises(ConfigError, match=r"set objective.direction=maximize"):
        precheck("-m", "hydra/sweeper=optuna_lr_balance", "hydra.sweeper.direction=maximize")
    with pytest.raises(ConfigError, match=r"one of \['minimize', 'maximize'\]"):
        precheck("objective.direction=up")


def test_objective_value():
    summary = {"status": "finished", "val/loss": 4.5, "val/loss/code": 3.25, "steps": 10, "data": [{}]}
    assert objective_value(summary, "val/loss/code") == 3.25
    assert objective_value({**summary, "status": "failed"}, "val/loss") is None
    with pytest.raises(ConfigError) as caught:
        objective_value(summary, "val/loss/cod")
    assert "this run's numbers: ['steps', 'val/loss', 'val/loss/code']" in str(caught.value)
    with pytest.raises(ConfigError, match="a number in the run's summary.json"):
        objective_value(summary, "data")


@pytest.mark.slow
def test_basic_sweeper_range_sweeps_integers(synth_mix, tmp_path):
    sweep = tmp_path / "range"
    result = train(
        "-m",
        *synth_overrides(synth_mix, *TINY),
        "optim.warmup_steps=range(2,5,step=2)",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.code == 0, result.stderr[-3000:]
    steps = [
        json.loads((sweep / str(i) / "summary.json").read_text())["resolved"]["optim"]["warmup_steps"]
        for i in (0, 1)
    ]
    assert steps == [2, 4] and all(type(s) is int for s in steps)


@pytest.mark.slow
def test_optuna_searches_the_objective_in_its_direction(synth_mix, tmp_path):
    """Two Optuna trials maximizing val/loss/alpha, with a search space given as hydra.sweeper.params on the
    command line: the best trial is the one with the larger val/loss/alpha, and each trial's warmup is an
    integer of the range."""
    sweep = tmp_path / "optuna"
    result = train(
        "-m",
        *synth_overrides(synth_mix, *TINY),
        "hydra/sweeper=optuna_lr_balance",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.params.optim.warmup_steps=range(1,4)",
        "objective.key=val/loss/alpha",
        "objective.direction=maximize",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.code == 0, result.stderr[-3000:]
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert found["best_value"] == pytest.approx(max(t["val/loss/alpha"] for t in trials), rel=1e-12)
    assert all(t["resolved"]["optim"]["warmup_steps"] in (1, 2, 3, 4) for t in trials)
    assert isinstance(found["best_params"]["optim.warmup_steps"], int)


@pytest.mark.slow
def test_a_missing_objective_key_is_exit_2_naming_the_keys(synth_mix, tmp_path):
    result = train(
        *synth_overrides(synth_mix, *TINY), "objective.key=val/nope", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert result.code == 2
    assert (
        "config key 'objective.key': got 'val/nope'" in result.stderr and "'val/loss/alpha'" in result.stderr
    )
