"""Adding a router is its options (a dataclass appended to testbed/routing/options.py, deriving from
RouterOptions: its values' check and the facts that differ from the defaults), its class (one .py in
testbed/routing/) and one .yaml in conf/router/.

A throwaway router is written into a copy of the package and its configs: the registry finds it,
`router=<name>` composes and validates (its Enum option is checked, an unknown option refused, a value its
options' own check refuses reported without torch), and the existing router tests (tests/test_routers.py,
parametrized over the registry) run it without a line added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTIONS_PY = """

class Temperature(StrEnum):
    cold = "cold"
    warm = "warm"


@ROUTERS.options("throwaway")
@dataclass
class ThrowawayConfig(RouterOptions):
    name: str = "throwaway"
    top_k: int = 2
    temperature: Temperature = Temperature.warm
    sharpness: float = 1.0  # logits are multiplied by it

    def check(self, run: Any, key: str) -> None:
        super().check(run, key)  # top_k
        if not self.sharpness > 0:
            raise ConfigError(f"{key}.sharpness", self.sharpness, "a float > 0")
"""

ROUTER_PY = '''"""Throwaway router (tests/test_new_router.py): top-k of softmax(sharpness z / temperature)."""

from __future__ import annotations

import torch

from testbed.routing.base import ROUTERS, Router, routing_from_choices


@ROUTERS.register("throwaway")
class ThrowawayRouter(Router):
    def forward(self, x, context):
        temperature = 0.5 if self.config.temperature == "cold" else 2.0
        logits = self.router_logits(x) * self.config.sharpness / temperature
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        chosen = torch.topk(probs, self.config.top_k, dim=-1).indices
        return routing_from_choices(logits, probs, chosen, probs.gather(-1, chosen).to(x.dtype))
'''

ROUTER_YAML = """# Throwaway router (tests/test_new_router.py): every option at its dataclass default.
defaults:
  - /registry/router/throwaway@_here_
  - _self_
"""

CHECK_PY = """
import sys
import pytest
from testbed.config import parse_config
from testbed.errors import ConfigError
from testbed.routing import ROUTERS
from tests.conftest import compose

assert "throwaway" in ROUTERS.names()
run = parse_config(compose(["router=throwaway", "router.top_k=3", "router.temperature=cold"]))
assert (run.router.name, run.router.top_k, run.router.temperature) == ("throwaway", 3, "cold")
with pytest.raises(ConfigError, match="options of router 'throwaway'"):
    parse_config(compose(["router=throwaway", "+router.nope=1"]))
with pytest.raises(ConfigError, match="one of \\\\['cold', 'warm'\\\\]"):
    parse_config(compose(["router=throwaway", "router.temperature=hot"]))
with pytest.raises(ConfigError, match="router.sharpness': got 0.0; allowed: a float > 0"):
    parse_config(compose(["router=throwaway", "router.sharpness=0"]))
with pytest.raises(ConfigError, match="router.top_k': got 0"):
    parse_config(compose(["router=throwaway", "router.top_k=0"]))
assert "torch" not in sys.modules  # the options checked themselves: the router class was not needed
print("registry and config: ok")
"""


def test_a_new_router_is_its_options_its_class_and_one_yaml(tmp_path):
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("testbed", "conf", "tests"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    options = copy / "testbed" / "routing" / "options.py"
    options.write_text(options.read_text() + OPTIONS_PY)  # (options.py imports what OPTIONS_PY uses)
    (copy / "testbed" / "routing" / "throwaway.py").write_text(ROUTER_PY)
    (copy / "conf" / "router" / "throwaway.yaml").write_text(ROUTER_YAML)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True)

    checked = run("-c", CHECK_PY)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "registry and config: ok" in checked.stdout

    tests = run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_routers.py", "-k", "throwaway", "-rA"
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    passed = [line for line in tests.stdout.splitlines() if line.startswith("PASSED") and "throwaway" in line]
    # the contract test, the top-k test of token-choice routers and the MoE-layer test, at least
    assert any("test_contract[throwaway]" in line for line in passed), tests.stdout[-3000:]
    assert any("test_moe_layer_runs_with_router[throwaway]" in line for line in passed)
    assert len(passed) >= 3
