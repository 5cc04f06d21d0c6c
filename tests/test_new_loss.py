"""Adding a loss is its options (a dataclass appended to testbed/losses/options.py, deriving from LossOptions,
with the check of its values), its class (one .py in testbed/losses/) and one .yaml in conf/aux_loss/
(tests/test_new_router.py does the same for a router).

A throwaway auxiliary loss is written into a copy of the package and its configs. Nothing else is edited:
the registry finds it, its YAML (only its non-default option) composes with every option overridable by
key, the loss tests iterated over the registries (tests/test_losses.py) run it, and `testbed-train` trains
with it and logs its term.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import synth_overrides

ROOT = Path(__file__).resolve().parents[1]
TRAIN = Path(sys.executable).with_name("testbed-train")

OPTIONS_PY = """

@AUX_LOSSES.options("throwaway")
@dataclass
class ThrowawayConfig(LossOptions):
    coefficient: float = 1e-3
    scale: float = 1.0

    def check(self, key: str) -> None:
        check_coefficient(self, key)
        if not self.scale > 0:
            raise ConfigError(f"{key}.scale", self.scale, "a float > 0")
"""

LOSS_PY = '''"""Throwaway auxiliary loss for tests/test_new_loss.py: scale * mean squared router logit."""

from __future__ import annotations

from testbed.losses.base import AUX_LOSSES, AuxLoss


@AUX_LOSSES.register("throwaway")
class ThrowawayLoss(AuxLoss):
    def __call__(self, routing, context, expert_outputs=None):
        return self.config.scale * routing.logits.float().square().mean()
'''

LOSS_YAML = """# Throwaway loss: scale * mean_t,e z_te^2 (tests/test_new_loss.py).
defaults:
  - /registry/aux_loss/throwaway@throwaway
  - _self_

throwaway:
  scale: 2.0
"""

CHECK_PY = """
import sys
import pytest
from testbed.config import parse_config
from testbed.errors import ConfigError
from testbed.losses import AUX_LOSSES
from tests.conftest import compose

assert "throwaway" in AUX_LOSSES.names()
run = parse_config(compose(["aux_loss=[z_loss,throwaway]"]))
assert (run.aux_loss["throwaway"].coefficient, run.aux_loss["throwaway"].scale) == (1e-3, 2.0)
run = parse_config(compose(["aux_loss=[throwaway]", "aux_loss.throwaway.coefficient=0.5"]))
assert run.aux_loss["throwaway"].coefficient == 0.5
with pytest.raises(ConfigError, match="aux_loss.throwaway.scale"):
    parse_config(compose(["aux_loss=[throwaway]", "aux_loss.throwaway.scale=0"]))
with pytest.raises(ConfigError, match="aux_loss.throwaway.coefficient"):
    parse_config(compose(["aux_loss=[throwaway]", "aux_loss.throwaway.coefficient=-1"]))
assert "torch" not in sys.modules  # the options checked themselves: the loss class was not needed
print("registry and config: ok")
"""


@pytest.mark.slow  # trains (a few steps, through the command line)
def test_a_new_loss_is_its_options_its_class_and_one_yaml(synth_mix, tmp_path):
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("testbed", "conf", "tests"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    options = copy / "testbed" / "losses" / "options.py"
    options.write_text(options.read_text() + OPTIONS_PY)  # (options.py imports what OPTIONS_PY uses)
    (copy / "testbed" / "losses" / "throwaway.py").write_text(LOSS_PY)
    (copy / "conf" / "aux_loss" / "throwaway.yaml").write_text(LOSS_YAML)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}

    def run(*args, executable=sys.executable):
        return subprocess.run([executable, *args], cwd=copy, env=env, capture_output=True, text=True)

    checked = run("-c", CHECK_PY)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "registry and config: ok" in checked.stdout

    tests = run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_losses.py", "-k", "throwaway", "-rA"
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    passed = [line for line in tests.stdout.splitlines() if line.startswith("PASSED") and "throwaway" in line]
    for test in ("keeps_the_contract", "config_validates", "sends_gradient_to_the_router"):
        assert any(test in line for line in passed), tests.stdout[-3000:]

    run_dir = tmp_path / "run"
    overrides = synth_overrides(
        synth_mix,
        "aux_loss=[z_loss,throwaway]",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.num_threads=1",
        "metrics.plots=false",
        f"hydra.run.dir={run_dir}",
    )
    trained = run(*overrides, executable=str(TRAIN))
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["coefficients"]["throwaway"] == 1e-3
    with open(run_dir / "metrics.csv") as handle:
        logged = [
            float(row["train/aux/throwaway"]) for row in csv.DictReader(handle) if row["train/aux/throwaway"]
        ]
    assert logged and all(value > 0 for value in logged)  # 2 * mean z^2 of the routers' logits
