"""The YAML of conf/ states each option once: defaults live in the dataclasses, the files select and override.

Also: component options (router, balance, aux_loss) all exist after composition, so that any of them can be
overridden by key; trainer=gpu is trainer=cpu plus what differs; and the dense baselines' sizes, worked out
in their comments, match the parameter counts of the MoE they are the twin of.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from testbed.checks import plain
from testbed.config import (
    COMPONENT_REGISTRIES,
    SECTIONS,
    RunConfig,
    num_active_params,
    num_total_params,
    parse_config,
)
from testbed.model.schema import ModelConfig, MoEConfig
from testbed.model.transformer import MoETransformer
from testbed.train.cli import CONF_DIR
from tests.conftest import compose

CONF = Path(CONF_DIR)
REGISTRIES = {registry.config_key: registry for registry in COMPONENT_REGISTRIES}
CHECKED_GROUPS = (*sorted(SECTIONS.keys() & {p.name for p in CONF.iterdir()}), *REGISTRIES)
"""The groups whose files are checked: the run sections with a folder in conf/ (model, data, trainer,
logger) and the component groups (router, balance, aux_loss). Experiments (conf/experiment/) pin the
settings of committed runs on purpose, and conf/hydra/ configures Hydra's plugins."""

INTENDED = {
    ("model/small_dense.yaml", "dense_hidden"): "the twin's hidden size (top-4 x 512) is its definition",
    ("model/base_dense.yaml", "dense_hidden"): "the twin's hidden size (top-4 x 1024) is its definition",
}
"""Values equal to what they override, stated on purpose (with why): a dense twin's hidden size happens to
equal the (unused: no dense layer) dense_hidden of the MoE it inherits."""


def leaves(node, prefix=""):
    """{dotted key: value} of the scalars and lists of a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    found = {}
    for key, value in node.items():
        found.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def own_values(path: Path) -> tuple[dict, list]:
    """What the file states itself (its defaults list aside), and its defaults list."""
    content = OmegaConf.to_container(OmegaConf.load(path)) or {}
    defaults = content.pop("defaults", [])
    return content, defaults


def overridden(group: str, path: Path, defaults: list) -> dict:
    """What the file's values override: the option it inherits in its own group (composed, dataclass
    defaults under it), else the dataclass defaults of its section or of the component it names."""
    parents = [d for d in defaults if isinstance(d, str) and d != "_self_" and not d.startswith("/")]
    if parents:
        return OmegaConf.to_container(compose([f"{group}={parents[-1]}"]), resolve=True)[group]
    if group in REGISTRIES:
        _, config_cls = REGISTRIES[group].get(path.stem)
        return plain(config_cls())
    return plain(SECTIONS[group]())


def restated(path: Path, group: str) -> list[str]:
    values, defaults = own_values(path)
    if group == "aux_loss":  # each file nests its options under the loss's name
        values = values.get(path.stem, {})
    base = leaves(overridden(group, path, defaults))
    name = f"{group}/{path.name}"
    return [
        f"{name}: {key}: {value!r}"
        for key, value in leaves(values).items()
        if key in base and base[key] == value and (name, key) not in INTENDED
    ]


def group_files():
    return [(group, path) for group in CHECKED_GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_the_checked_groups_are_the_ones_there_are():
    assert set(CHECKED_GROUPS) == {"model", "data", "trainer", "logger", "router", "balance", "aux_loss"}
    assert len(group_files()) > 30


@pytest.mark.parametrize(("group", "path"), group_files(), ids=lambda v: getattr(v, "name", v))
def test_no_group_file_restates_a_default(group, path):
    """A value equal to the one it overrides (the dataclass default, or the inherited option's) says nothing
    and goes stale when the default changes: each option's default is stated once, in its dataclass."""
    assert restated(path, group) == []


def test_the_main_config_restates_no_default():
    values, _ = own_values(CONF / "config.yaml")
    values.pop("hydra")
    base = leaves(plain(RunConfig()))
    found = {key: value for key, value in leaves(values).items() if key in base and base[key] == value}
    assert found == {}
    # all else: the schema's defaults and the groups' files; the default run's learning rate is its own (the
    # micro models' best rate, experiments/ladder), the option's default stays that of the committed runs
    assert values == {"run_name": "default", "optim": {"lr": 1e-2}}


def test_the_check_finds_a_restated_default(tmp_path):
    """The check itself, on files written for it: a value equal to the default is found, one that differs
    is not; under an inherited option the inherited value counts."""
    (tmp_path / "trainer").mkdir()
    restating = tmp_path / "trainer" / "cpu.yaml"
    restating.write_text("name: cpu\nmax_steps: 1500\nprecision: bf16-mixed\n")
    assert restated(restating, "trainer") == [
        "trainer/cpu.yaml: name: 'cpu'",
        "trainer/cpu.yaml: max_steps: 1500",
    ]
    child = tmp_path / "trainer" / "ddp.yaml"
    child.write_text("defaults: [gpu, _self_]\ncompile: true\ndeterministic: true\n")
    assert restated(child, "trainer") == ["trainer/ddp.yaml: compile: True"]  # gpu compiles; cpu would not
    router = tmp_path / "sinkhorn.yaml"
    router.write_text("defaults: [/registry/router/sinkhorn@_here_]\niterations: 20\nscope: global\n")
    assert restated(router, "router") == ["router/sinkhorn.yaml: iterations: 20"]


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_every_component_option_can_be_overridden_by_key(group):
    """Each option file lists its component's registered defaults first (registry/<group>/<name>): every
    option of the config dataclass is in the composed config, at its default unless the file overrides it,
    so `router.top_k=4` works without the file restating top_k."""
    registry = REGISTRIES[group]
    for name, (_, config_cls) in registry.items():
        choice = f"aux_loss=[{name}]" if group == "aux_loss" else f"{group}={name}"
        composed = OmegaConf.to_container(compose([choice]), resolve=True)[group]
        options = composed[name] if group == "aux_loss" else composed
        assert set(options) == {f.name for f in dataclasses.fields(config_cls)}, name
        last = dataclasses.fields(config_cls)[-1].name
        key = f"{group}.{name}.{last}" if group == "aux_loss" else f"{group}.{last}"
        value = options[last]
        written = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        assert OmegaConf.select(compose([choice, f"{key}={written}"]), key) == value  # struct: key exists


def test_gpu_trainer_is_the_cpu_trainer_with_what_differs():
    _, defaults = own_values(CONF / "trainer" / "gpu.yaml")
    assert defaults == ["cpu", "_self_"]
    cpu, gpu = (parse_config(compose([f"trainer={name}"])).trainer for name in ("cpu", "gpu"))
    differs = {k: v for k, v in plain(gpu).items() if plain(cpu)[k] != v}
    assert set(differs) == set(own_values(CONF / "trainer" / "gpu.yaml")[0])
    assert differs["accelerator"] == "gpu" and differs["precision"] == "bf16-mixed" and differs["compile"]
    ddp = parse_config(compose(["trainer=ddp"])).trainer
    assert (ddp.devices, ddp.strategy, ddp.precision) == (-1, "ddp", "bf16-mixed")


# ---- parameter counts and the dense twins ----------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(),
        ModelConfig(
            d_model=32,
            n_layers=3,
            n_heads=2,
            dense_layers=1,
            dense_hidden=48,
            tie_embeddings=False,
            moe=MoEConfig(num_experts=5, expert_hidden=24, num_shared_experts=2),
        ),  # fmt: skip
        ModelConfig(d_model=16, n_layers=2, n_heads=2, dense_layers=2, dense_hidden=40),
    ],
    ids=["tiny", "shared_untied_mixed", "dense"],
)
def test_parameter_counts_match_the_model(model):
    """num_total_params equals the built model's parameter count (tied embeddings once); the active count
    keeps top_k of the routed experts per MoE layer."""
    with torch.device("meta"):  # shapes only
        built = MoETransformer(model, parse_config(compose()).router, num_domains=2)
    assert num_total_params(model) == sum(p.numel() for p in built.parameters())
    moe_layers = model.n_layers - model.dense_layers
    expert = 3 * model.d_model * model.moe.expert_hidden
    for top_k in (1, 2):
        dropped = (model.moe.num_experts - top_k) * expert * moe_layers
        assert num_active_params(model, top_k) == num_total_params(model) - dropped


TWIN_COMMENT = re.compile(
    r"Dense baseline of model=(?P<moe>\w+) \(equal (?P<kind>active|total)(?: expert)? parameters: "
    r"hidden = (?:top-(?P<top_k>\d+) x expert_hidden|\d+ experts x) .*the MoE's router weights, d x E per "
    r"layer, are not matched\)"
)


def dense_twins():
    return sorted(p.stem for p in (CONF / "model").glob("*_dense*.yaml"))


def test_every_dense_model_is_a_twin():
    assert dense_twins() == sorted(
        f"{m}_{k}" for m in ("base", "micro", "small", "tiny") for k in ("dense", "dense_total")
    )


@pytest.mark.parametrize("twin", dense_twins())
def test_dense_twin_matches_the_parameters_of_its_moe(twin):
    """Each dense baseline's comment states whose twin it is and how it was sized: its parameters equal the
    MoE's active parameters (top-K experts) or total parameters, except the MoE's router weights (d x E
    per MoE layer), which its comment says are not matched."""
    comment = (CONF / "model" / f"{twin}.yaml").read_text().splitlines()[0]
    match = TWIN_COMMENT.search(comment)
    assert match, comment
    dense = parse_config(compose([f"model={twin}"])).model
    moe = parse_config(compose([f"model={match['moe']}"])).model
    assert dense.dense_layers == dense.n_layers and moe.dense_layers == 0
    assert {
        f: getattr(dense, f) for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")
    } == {f: getattr(moe, f) for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")}
    if match["kind"] == "active":
        expected = num_active_params(moe, int(match["top_k"]))
    else:
        expected = num_total_params(moe)
    router_weights = moe.n_layers * moe.d_model * moe.moe.num_experts
    assert num_total_params(dense) == expected - router_weights
