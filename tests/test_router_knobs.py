"""Router initialisation scale and freezing (optim.router_init_scale, optim.router_freeze_step): the knobs
of the ladder's mechanism runs."""

import pytest
import torch

from testbed.config import parse_config
from testbed.errors import ConfigError
from testbed.train.cli import run_training
from testbed.train.module import MoELanguageModel
from tests.conftest import compose, synth_overrides


def module(root, *extra):
    torch.manual_seed(0)
    return MoELanguageModel(parse_config(compose(synth_overrides(root, *extra))), ["a", "b", "c"])


def test_init_scale_scales_the_gates_and_nothing_else(synth_mix):
    plain = dict(module(synth_mix).named_parameters())
    scaled = dict(module(synth_mix, "optim.router_init_scale=0.25").named_parameters())
    routers = [n for n in plain if ".router." in n]
    assert routers  # one gate per MoE layer
    for name, value in plain.items():
        expected = value * 0.25 if name in routers else value
        assert torch.equal(scaled[name], expected), name


def router_weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {n: w for n, w in state.items() if ".router.gate" in n}


def test_frozen_router_stays_where_it_started(synth_mix, tmp_path):
    # gates started at 0: frozen from step 0 they stay 0 (no update, no decay); trained they move
    common = ("optim.router_init_scale=0", "trainer.max_steps=6", "trainer.val_check_interval=6")
    run_training(compose(synth_overrides(synth_mix, *common, "optim.router_freeze_step=0")), tmp_path / "f", True)
    run_training(compose(synth_overrides(synth_mix, *common)), tmp_path / "t", quiet=True)
    frozen, trained = router_weights(tmp_path / "f"), router_weights(tmp_path / "t")
    assert frozen and all(torch.count_nonzero(w) == 0 for w in frozen.values())
    assert all(torch.count_nonzero(w) > 0 for w in trained.values())


@pytest.mark.parametrize(
    "override,allowed",
    [("optim.router_freeze_step=13", "[0, trainer.max_steps = 12]"), ("optim.router_init_scale=-1", ">= 0")],
)
def test_bad_router_knobs(synth_mix, override, allowed):
    with pytest.raises(ConfigError, match=r"optim\.router_") as info:
        parse_config(compose(synth_overrides(synth_mix, override)))
    assert allowed in str(info.value)
