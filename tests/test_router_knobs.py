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
    run_training(
        compose(synth_overrides(synth_mix, *common, "optim.router_freeze_step=0")), tmp_path / "f", True
    )
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


def test_hash_steps_route_by_hash_first_then_by_the_gate(synth_mix):
    from testbed.routing.base import RoutingContext
    from testbed.routing.hash import hash_choices, hash_constants

    lm = module(synth_mix, "router.hash_steps=5")
    router = lm.routers[0]
    x = torch.randn(40, router.gate.in_features)
    ids = torch.randint(0, 512, (40,))
    context = RoutingContext(batch_size=1, seq_len=40, token_ids=ids)
    hashed = hash_choices(ids, *hash_constants(router.num_experts, 0), top_k=2)
    own = torch.topk(torch.softmax(router.router_logits(x), -1), 2, dim=-1).indices

    def chosen_per_token(routing):
        pairs = sorted(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
        return [sorted(e for t2, e in pairs if t2 == t) for t in range(40)]

    for step, expected in ((4, hashed), (5, own)):
        router.step = step
        routing = router(x, context)
        assert chosen_per_token(routing) == [sorted(row) for row in expected.tolist()]
        # the gates are this router's probabilities of the chosen experts, so the gate learns in stage one
        probs = torch.softmax(router.router_logits(x), -1)
        assert torch.allclose(routing.weight, probs[routing.token_index, routing.expert_index])
    assert all(r.step == 0 for r in module(synth_mix).routers)


def test_training_sets_the_router_step(synth_mix, tmp_path):
    import lightning as L

    class Record(L.Callback):
        steps: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.global_step - 1, pl_module.routers[0].step))

    record = Record()
    overrides = synth_overrides(
        synth_mix, "router.hash_steps=2", "trainer.max_steps=4", "trainer.val_check_interval=4"
    )
    run_training(compose(overrides), tmp_path, quiet=True, callbacks=(record,))
    assert record.steps == [(0, 0), (1, 1), (2, 2), (3, 3)]  # the step each batch was routed at
