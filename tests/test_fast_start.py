"""`testbed-train --help` and config errors answer before the heavy imports: --help imports neither torch nor
Lightning, and an unknown key, a value of the wrong type, a value the sections' or a component's own checks
refuse, or components that do not fit together stop with exit 2 before torch or Lightning is imported (a run
pays their imports, seconds, only once its config is accepted; testbed.config reads the routers' and losses'
options, their checks and facts, without their torch classes). Asserted on the modules a fresh process has
imported, which a loaded machine cannot make flaky; no time is asserted."""

import os
import subprocess
import sys
import time

import pytest

PROBE = """
import json, sys
sys.argv = ["testbed-train", *json.loads(sys.argv[1])]
from testbed.train.cli import train_main
code = 0
try:
    train_main()
except SystemExit as exit_:
    code = exit_.code
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "lightning", "wandb", "tensorboard"})
print("LOADED", json.dumps(loaded), "CODE", code, file=sys.stderr)
"""


def probe(*args: str) -> tuple[int, list[str], str, float]:
    """Run testbed-train's entry point with `args` in a fresh interpreter: (exit code, heavy top-level
    packages it imported, its stdout + stderr, wall seconds)."""
    import json

    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    seconds = time.perf_counter() - start
    tail = result.stderr.strip().splitlines()[-1]
    assert tail.startswith("LOADED "), result.stderr[-2000:]
    loaded = json.loads(tail.split("LOADED ", 1)[1].split(" CODE ")[0])
    code = int(tail.rsplit("CODE ", 1)[1])
    return code, loaded, result.stdout + result.stderr, seconds


def test_help_imports_neither_torch_nor_lightning():
    code, loaded, output, seconds = probe("--help")
    assert code == 0 and loaded == []
    assert "config groups" in output and "logger: csv (default)" in output and "make train ARGS=" in output
    # speed lives in what is imported, not in a timed assertion: about 1 s here (29 s with the imports)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("foo=1", "config key 'foo'"),  # a key that does not exist
        ("model.d_model=abc", "config key 'model.d_model': got 'abc'; allowed: an integer"),
        ("router.topk=3", "config key 'router.topk'"),  # an option the router does not have
        ("trainer.max_steps=abc", "config key 'trainer.max_steps': got 'abc'; allowed: an integer"),
        ("optim.lr=-1", "config key 'optim.lr': got -1.0; allowed: a float > 0"),  # refused by the checks
        # refused by a router's, a balancing method's own check; by the checks across components
        ("router.top_k=0", "config key 'router.top_k': got 0; allowed: an integer from 1"),
        ("balance.coefficient=-1", "config key 'balance.coefficient': got -1.0; allowed: a float >= 0"),
        (
            "balance=expert_bias router=expert_choice",
            "config key 'balance': got 'expert_bias'; allowed: a router with expert-bias support",
        ),
        pytest.param(
            "trainer.progress_every_s=-5", "config key 'trainer.progress_every_s'", marks=pytest.mark.heavy
        ),
        pytest.param("logger=[csv,mlflow]", "config key 'logger': got 'mlflow'", marks=pytest.mark.heavy),
        pytest.param("logger.wandb.project=x", "add wandb to the list", marks=pytest.mark.heavy),
    ],
)
def test_config_errors_answer_before_torch_and_lightning(override, message):
    code, loaded, output, _ = probe(*override.split())
    assert code == 2 and message in output
    assert loaded == [], loaded


def test_the_config_module_imports_no_torch():
    """The run's schema, the registries' names and options and the sections' checks, without torch."""
    script = (
        "import sys, testbed.config\n"
        "from testbed.routing import ROUTERS\n"
        "assert ROUTERS.config_class('sinkhorn')().iterations == 20\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_the_strategies_accepted_without_lightning_are_lightnings():
    from testbed.config import COMMON_STRATEGIES, strategy_names

    assert set(COMMON_STRATEGIES) <= set(strategy_names())


def test_values_are_checked_for_a_run_not_for_a_config_shown():
    from testbed.errors import ConfigError
    from testbed.train.cli import check_values

    with pytest.raises(ConfigError, match="optim.lr"):
        check_values(["optim.lr=-1"])
    check_values(["--cfg", "job", "optim.lr=-1"])  # printing the config refuses nothing
    check_values(["-m", "optim.lr=-1,1e-3"])  # a sweep's values: check_overrides checks each
