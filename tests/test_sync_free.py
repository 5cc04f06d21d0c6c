"""The MoE layer's forward and backward make no device-to-host sync, checked on CPU.

A TorchDispatchMode sees every aten op that runs (forward and autograd's backward) and fails on the
ones that need the host to read device data: `.item()` / `int(t)` (`_local_scalar_dense`), `nonzero`,
`masked_select`, boolean-mask indexing, and size-dependent ops such as `unique`. On CUDA each is a sync
that stalls the GPU queue; on CPU they run silently, so this test catches them before any GPU run.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from testbed.config import MoEConfig
from testbed.metrics.stats import RoutingStats
from testbed.model.experts import combine
from testbed.model.moe import MoELayer
from testbed.routing import ROUTERS, RoutingContext, routing_from_choices
from testbed.routing.capacity import apply_capacity, mask_capacity
from testbed.scope import GlobalScopeState
from tests.conftest import layer_step
from tests.loss_cases import every_loss

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,  # output size read from the data (unless output_size is given)
}


class SyncError(AssertionError):
    pass


class NoSync(TorchDispatchMode):
    """Raise on any op that would make the host wait for the device; record every op seen."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.append(str(func))
        if func in SYNCING:
            raise SyncError(f"host sync: {func}")
        if func in (
            aten.index.Tensor,
            aten.index_put.default,
            aten.index_put_.default,
            aten._index_put_impl_,
        ):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise SyncError(f"boolean-mask indexing: {func}")
        return func(*args, **kwargs)


def test_the_detector_catches_each_kind_of_sync():
    x = torch.randn(6)
    for op in (
        lambda: x.sum().item(),
        lambda: int(x.argmax()),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: x.masked_select(x > 0),
        lambda: torch.unique(x),
        lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])),
    ):
        with pytest.raises(SyncError), NoSync():
            op()
    with NoSync() as mode:  # static-shape equivalents pass
        torch.where(x > 0, x, 0.0).sum()
        x[torch.tensor([0, 2])]
        torch.arange(3).repeat_interleave(2)
    assert "aten.where.self" in mode.seen


def make_layer(router: str, losses, capacity_factor=None, **router_options):
    _, config_cls = ROUTERS.get(router)
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=8, expert_hidden=16, capacity_factor=capacity_factor, backend="grouped")
    return MoELayer(32, moe, config_cls(**router_options), 0, num_domains=4).train(), losses


def step(made, batch=2, seq=24):
    layer, losses = made
    torch.manual_seed(1)
    x = torch.randn(batch, seq, 32, requires_grad=True)
    tokens = batch * seq
    stats = RoutingStats(1, 4, 8)
    context = RoutingContext(
        batch,
        seq,
        token_ids=torch.randint(0, 100, (tokens,)),
        domain_ids=torch.arange(tokens) % 4,
        scope_state=GlobalScopeState(),
    )
    layer(x, context)  # warm-up outside the mode (lazy initialization)
    correct = torch.arange(tokens) % 3 == 0
    with NoSync() as mode:  # the layer, then what training does with its record: losses, stateful
        # losses' step statistics (expert bias's per-sequence loads) and the routing counters
        y, out, terms = layer_step(layer, x, context, losses, stats, observe=True)
        (y.square().mean() + sum(terms.values())).backward()
        stats.update_accuracy(0, out.routing, correct)
        stats.update_stiffness(0, out.routing, out.routing, correct)
    assert "aten.mm.default" in mode.seen or "aten._grouped_mm.default" in mode.seen
    assert set(terms) == {loss.name for loss in losses}
    return y, out


SYNC_FREE = sorted(name for name in ROUTERS.names() if not ROUTERS.get(name)[0].host_sync)


def test_only_the_balanced_assignment_auction_reads_the_device():
    assert sorted(set(ROUTERS.names()) - set(SYNC_FREE)) == ["balanced_assignment"]


@pytest.mark.parametrize("router", SYNC_FREE)
def test_every_router_with_every_loss_is_sync_free(router):
    """Grouped backend, training mode, every registered balancing method and auxiliary loss at every scope
    it offers (tests/loss_cases.py: orthogonality also under expert choice, whose per-token slot count is
    bounded by E, not read from the data; expert bias recording its loads), counters (accuracy and
    stiffness included)."""
    step(make_layer(router, every_loss()))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.25])
def test_static_capacity_is_sync_free_and_equals_the_dropping_form(capacity_factor):
    """`mask_capacity` (gates of dropped assignments zeroed) makes no sync and gives the same layer output
    and gradients as `apply_capacity`, which removes them (one `nonzero`, caught by the detector)."""
    torch.manual_seed(0)
    probs = torch.randn(40, 8).softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    gates = probs.gather(1, chosen).requires_grad_(True)
    routing = routing_from_choices(probs.log(), probs, chosen, gates)
    with pytest.raises(SyncError, match="nonzero"), NoSync():
        apply_capacity(routing, capacity_factor, 2)
    dropped = apply_capacity(routing, capacity_factor, 2)
    with NoSync():
        masked = mask_capacity(routing, capacity_factor, 2)
    kept = masked.kept
    assert masked.dropped.item() == dropped.dropped.item() == (~kept).sum().item()
    assert masked.num_assignments == 80 and dropped.num_assignments == 80 - dropped.dropped.item()
    pairs = {
        (t, e)
        for t, e in zip(masked.token_index[kept].tolist(), masked.expert_index[kept].tolist(), strict=True)
    }
    assert pairs == set(zip(dropped.token_index.tolist(), dropped.expert_index.tolist(), strict=True))
    assert torch.all(masked.weight[~kept] == 0)
    outputs = torch.randn(80, 6)
    lookup = dict(
        zip(
            zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True),
            outputs,
            strict=True,
        )
    )
    results = []
    for capped in (dropped, masked):
        rows = torch.stack(
            [lookup[p] for p in zip(capped.token_index.tolist(), capped.expert_index.tolist(), strict=True)]
        )
        y = combine(rows, capped, 40)
        (grad,) = torch.autograd.grad((y * torch.arange(6.0)).sum(), gates, retain_graph=True)
        results.append((y, grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    dropped_gates = torch.ones(40, 2, dtype=torch.bool)
    dropped_gates.view(-1)[dropped.token_index * 2 + dropped.slot_index] = False
    assert dropped_gates.sum() == dropped.dropped and torch.all(results[1][1][dropped_gates] == 0)


TOKEN_CHOICE = sorted(name for name in SYNC_FREE if ROUTERS.get(name)[0].token_choice)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.25])
@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_capacity_in_the_layer_is_sync_free(router, capacity_factor):
    """With `model.moe.capacity_factor` the layer uses `mask_capacity`: forward, backward, every loss and
    the counters make no sync, and assignments are really dropped."""
    y, out = step(make_layer(router, every_loss(), capacity_factor=capacity_factor))
    assert out.routing.kept is not None and out.routing.num_assignments == 48 * 2
    if capacity_factor < 1:
        assert out.routing.dropped.item() > 0 and torch.isfinite(y).all()


def test_combine_token_choice_equals_index_add():
    """The permutation + [T, K, d] sum of token-choice routing equals the scatter-add reference."""
    torch.manual_seed(0)
    probs = torch.randn(33, 8).softmax(-1)
    chosen = probs.topk(3, dim=-1).indices
    routing = routing_from_choices(probs.log(), probs, chosen, probs.gather(1, chosen))
    outputs = torch.randn(99, 16, requires_grad=True)
    with NoSync() as mode:
        y = combine(outputs, routing, 33)
    assert "aten.index_add.default" not in mode.seen and "aten.index_add_.default" not in mode.seen
    reference = torch.zeros(33, 16).index_add_(0, routing.token_index, outputs * routing.weight[:, None])
    torch.testing.assert_close(y, reference)
    (grad,) = torch.autograd.grad(y.sum(), outputs)
    torch.testing.assert_close(grad, routing.weight[:, None].expand(99, 16))


def test_training_step_logs_nothing_to_the_progress_bar():
    """`prog_bar=True` makes Lightning convert the value to a float on every step (a sync on GPU)."""
    import inspect

    from testbed.train.module import MoELanguageModel

    source = inspect.getsource(MoELanguageModel.training_step)
    assert "self.log(" in source and "prog_bar=True" not in source
