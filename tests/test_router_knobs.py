"""Router initialisation scale and freezing (optim.router_init_scale, optim.router_freeze_step): the knobs
of the ladder's mechanism runs."""

import torch

from testbed.config import parse_config
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


def test_training_sets_the_router_step_and_freezes_the_router(synth_mix, tmp_path):
    """One run: the router reads the optimizer step (hash_steps), its gates move for 2 steps, then stay."""
    import lightning as L

    class Record(L.Callback):
        steps: list = []
        gates: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.global_step - 1, pl_module.routers[0].step))
            self.gates.append(pl_module.routers[0].gate.weight.detach().clone())

    record = Record()
    extra = ("router.hash_steps=2", "optim.router_freeze_step=2", "trainer.max_steps=4")
    overrides = synth_overrides(synth_mix, *extra, "trainer.val_check_interval=4")
    run_training(compose(overrides), tmp_path, quiet=True, callbacks=(record,))
    assert record.steps == [(0, 0), (1, 1), (2, 2), (3, 3)]  # the step each batch was routed at
    after = record.gates
    assert not torch.equal(after[0], after[1])  # steps 0 and 1 train the gates
    assert torch.equal(after[1], after[2]) and torch.equal(after[2], after[3])  # frozen from step 2: no decay
