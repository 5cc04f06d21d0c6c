"""Every router against the routing contract, plus each router's own rule (property and value tests), the
contract's own helpers (routing_from_choices, kept assignments) and the facts routers declare."""

import dataclasses
import math
import typing
from enum import Enum

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.config import MoEConfig, parse_config
from testbed.errors import ConfigError
from testbed.layout import block_layout
from testbed.model.moe import MoELayer
from testbed.routing import ROUTERS, RoutingContext, routing_from_choices
from testbed.routing.base import count_per_expert
from testbed.routing.capacity import expert_capacity
from testbed.scope import SCOPES
from tests.conftest import compose

D_MODEL = 8
VOCAB = 30


def draw_top_k(data, num_experts, num_domains):
    return data.draw(st.integers(1, num_experts), label="top_k")


# One entry per router: name -> strategy for its options given (data, E, D). Add a router in one line.
ROUTER_OPTIONS = {
    "topk_softmax": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "renormalize": data.draw(st.booleans(), label="renormalize"),
    },
    "sigmoid": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "scale": data.draw(st.floats(0.1, 4.0), label="scale"),
    },
    "expert_choice": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "capacity_factor": data.draw(st.floats(0.05, 3.0), label="capacity_factor"),
        "scope": data.draw(st.sampled_from(["micro_batch", "sequence"]), label="scope"),
    },
    "oracle": lambda data, e, d: {
        "top_k": data.draw(st.integers(1, e // d), label="top_k"),
        "within_block": data.draw(st.sampled_from(["learned", "uniform"]), label="within_block"),
    },
    "hash": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "seed": data.draw(st.integers(0, 1000), label="seed"),
    },
    "sinkhorn": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "iterations": data.draw(st.integers(1, 30), label="iterations"),
        "scope": data.draw(st.sampled_from(["sequence", "micro_batch", "global"]), label="scope"),
    },
    "balanced_assignment": lambda data, e, d: {
        "top_k": draw_top_k(data, e, d),
        "scope": data.draw(st.sampled_from(["sequence", "micro_batch"]), label="scope"),
    },
}


def generic_options(name):
    """Options for a router without an entry above (a new router is tested from the moment it is
    registered): top_k drawn, `scope` from the router's own `scopes` (else every scope), other Enum fields
    from their members, booleans both ways; every other field keeps its default."""
    router_cls, config_cls = ROUTERS.get(name)
    hints = typing.get_type_hints(config_cls)

    def draw(data, e, d):
        options = {}
        for f in dataclasses.fields(config_cls):
            kind = hints[f.name]
            if f.name == "top_k":
                options["top_k"] = draw_top_k(data, e, d)
            elif f.name == "scope":
                scopes = list(getattr(router_cls, "scopes", SCOPES))
                options["scope"] = data.draw(st.sampled_from(scopes), label="scope")
            elif isinstance(kind, type) and issubclass(kind, Enum):
                options[f.name] = data.draw(st.sampled_from([m.value for m in kind]), label=f.name)
            elif kind is bool:
                options[f.name] = data.draw(st.booleans(), label=f.name)
        return options

    return draw


ALL = ROUTERS.names()  # every registered router, shipped or new
OPTIONS = {name: ROUTER_OPTIONS.get(name) or generic_options(name) for name in ALL}
TOKEN_CHOICE = [name for name in ALL if ROUTERS.get(name)[0].token_choice]


def build(name, num_experts, num_domains=1, init_seed=0, **options):
    router_cls, config_cls = ROUTERS.get(name)
    torch.manual_seed(init_seed)
    return router_cls(D_MODEL, num_experts, config_cls(**options), num_domains)


def draw_case(data, name, max_experts=10):
    """A router with random options, random inputs and a full context (token ids and domain labels)."""
    num_experts = data.draw(st.integers(1, max_experts), label="E")
    num_domains = data.draw(st.integers(1, num_experts), label="D")
    options = OPTIONS[name](data, num_experts, num_domains)
    batch = data.draw(st.integers(1, 4), label="B")
    seq = data.draw(st.integers(1, 12), label="S")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000), label="seed"))
    num_tokens = batch * seq
    router = build(name, num_experts, num_domains, init_seed=data.draw(st.integers(0, 99)), **options)
    x = torch.randn(num_tokens, D_MODEL, generator=gen)
    context = RoutingContext(
        batch_size=batch,
        seq_len=seq,
        token_ids=torch.randint(0, VOCAB, (num_tokens,), generator=gen),
        domain_ids=torch.randint(0, num_domains, (num_tokens,), generator=gen),
    )
    return router, x, context


def gate_matrix(routing):
    """[T, E] gates (0 where unassigned); assumes distinct pairs."""
    return torch.zeros(routing.probs.shape, dtype=routing.weight.dtype).index_put_(
        (routing.token_index, routing.expert_index), routing.weight
    )


def experts_per_token(routing):
    """Sorted expert list of each token."""
    chosen = [[] for _ in range(routing.num_tokens)]
    for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True):
        chosen[t].append(e)
    return [sorted(c) for c in chosen]


def check_contract(routing, num_tokens, num_experts):
    assert routing.logits.shape == routing.probs.shape == (num_tokens, num_experts)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(num_tokens))
    assert torch.all(routing.probs >= 0)
    assert torch.all(routing.weight >= 0)
    assert routing.token_index.shape == routing.expert_index.shape == routing.weight.shape
    assert routing.token_index.dtype == routing.expert_index.dtype == torch.long
    assert torch.all(routing.expert_index[1:] >= routing.expert_index[:-1]), "assignments sorted by expert"
    assert torch.all((routing.expert_index >= 0) & (routing.expert_index < num_experts))
    assert torch.all((routing.token_index >= 0) & (routing.token_index < num_tokens))
    counts = torch.bincount(routing.expert_index, minlength=num_experts)
    assert torch.equal(routing.tokens_per_expert, counts)
    pairs = routing.token_index * num_experts + routing.expert_index
    assert pairs.unique().numel() == pairs.numel(), "no (token, expert) pair twice"


# ---- every router --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_contract(name, data):
    router, x, context = draw_case(data, name)
    routing = router(x, context)
    check_contract(routing, x.shape[0], router.num_experts)


@pytest.mark.parametrize("name", TOKEN_CHOICE)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_token_choice_gives_k_distinct_experts(name, data):
    router, x, context = draw_case(data, name)
    routing = router(x, context)
    assert routing.num_assignments == x.shape[0] * router.top_k
    for experts in experts_per_token(routing):
        assert len(experts) == len(set(experts)) == router.top_k


def test_registry_lists_routers():
    shipped = list(ROUTER_OPTIONS)
    assert set(shipped) <= set(ALL)  # no stale entry in ROUTER_OPTIONS
    assert [n for n in shipped if not ROUTERS.get(n)[0].token_choice] == ["expert_choice"]
    assert {n for n in shipped if ROUTERS.get(n)[0].supports_expert_bias} == {"topk_softmax", "sigmoid"}
    with pytest.raises(ValueError, match="one of"):
        ROUTERS.get("no_such_router")
    assert ROUTERS.find("no_such_router") is None and ROUTERS.find("hash") is ROUTERS.get("hash")[0]


def test_shipped_routers_declare_their_facts():
    """What reports, plots and the config read of a router, as its class attributes (those the config reads
    stated on its options, the same on the class)."""
    facts = {
        name: (cls.balances, cls.label, cls.marker, cls.gateless, cls.needs_reference)
        for name, (cls, _) in ROUTERS.items()
        if name in ROUTER_OPTIONS
    }
    assert facts == {
        "topk_softmax": (False, "", None, False, False),
        "sigmoid": (False, None, None, False, False),
        "sinkhorn": (True, "SH", "^", False, False),
        "balanced_assignment": (True, "BA", "D", False, False),
        "expert_choice": (True, "EC", "v", False, False),
        "oracle": (False, None, "*", False, True),
        "hash": (False, None, "X", True, False),
    }
    config_cls = ROUTERS.config_class("oracle")
    assert config_cls(within_block="uniform").is_gateless() and not config_cls().is_gateless()
    assert ROUTERS.config_class("hash")().is_gateless()
    for name, (cls, config_cls) in ROUTERS.items():
        for fact in ("token_choice", "supports_expert_bias", "scopes", "gateless"):
            assert getattr(cls, fact) == getattr(config_cls, fact), (name, fact)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_gateless_is_what_the_gate_gets(name, data):
    """`config.is_gateless()` holds exactly when nothing the router returns (logits, probabilities, gates)
    depends on its gate: the fact DDP's strategy is chosen by (testbed.config.resolve_strategy)."""
    router, x, context = draw_case(data, name)
    routing = router(x, context)
    outputs = (routing.logits, routing.probs, routing.weight)
    total = sum((t.float() * torch.randn(t.shape)).sum() for t in outputs if t.requires_grad)
    if torch.is_tensor(total):
        total.backward()
    grad = router.gate.weight.grad
    unused = grad is None or not grad.any()
    assert router.config.is_gateless() == unused


@pytest.mark.parametrize("name", ALL)
def test_moe_layer_runs_with_router(name):
    """The MoE layer accepts each router (forward + backward)."""
    _, config_cls = ROUTERS.get(name)
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, MoEConfig(num_experts=4, expert_hidden=8, backend="loop"), config_cls(), 0,
                     num_domains=2)  # fmt: skip
    x = torch.randn(2, 5, D_MODEL, requires_grad=True)
    context = RoutingContext(2, 5, token_ids=torch.randint(0, VOCAB, (10,)), domain_ids=torch.arange(10) % 2)
    y, out = layer(x, context)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None


# ---- sigmoid -------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sigmoid_gates_sum_to_scale_and_follow_scores(data):
    router, x, context = draw_case(data, "sigmoid")
    routing = router(x, context)
    gates = gate_matrix(routing)
    torch.testing.assert_close(gates.sum(-1), torch.full((x.shape[0],), router.config.scale))
    scores = torch.sigmoid(routing.logits.float())
    torch.testing.assert_close(routing.probs, scores / scores.sum(-1, keepdim=True))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_sigmoid_bias_changes_selection_not_gates(data):
    router, x, context = draw_case(data, "sigmoid")
    favoured = data.draw(st.integers(0, router.num_experts - 1), label="favoured")
    router.expert_bias[favoured] = 1e3
    with torch.no_grad():
        routing = router(x, context)
    assert all(favoured in experts for experts in experts_per_token(routing)), "biased expert always chosen"
    # the gates come from the sigmoid scores alone: s_S / sum(s_S) * scale over the (biased) selection
    scores = torch.sigmoid(router.gate(x))
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[routing.token_index, routing.expert_index] = True
    selected = scores * chosen
    expected = selected / selected.sum(-1, keepdim=True) * router.config.scale
    torch.testing.assert_close(gate_matrix(routing), expected)


def test_sigmoid_gates_by_hand():
    # logits z = [0, ln 3, -ln 3] -> s = [1/2, 3/4, 1/4]; top-2 = {1, 0}; g = s / (5/4) * scale
    router = build("sigmoid", 3, top_k=2, scale=2.0)
    router.gate.weight.data = torch.zeros(3, D_MODEL)
    router.gate.weight.data[1, 0], router.gate.weight.data[2, 0] = math.log(3), -math.log(3)
    x = torch.zeros(1, D_MODEL)
    x[0, 0] = 1.0
    routing = router(x, RoutingContext(1, 1))
    assert routing.expert_index.tolist() == [0, 1]
    torch.testing.assert_close(routing.weight, torch.tensor([0.5 / 1.25 * 2, 0.75 / 1.25 * 2]))
    torch.testing.assert_close(routing.probs, torch.tensor([[1 / 3, 1 / 2, 1 / 6]]))


# ---- expert choice -------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_expert_choice_takes_top_c_tokens_per_expert(data):
    router, x, context = draw_case(data, "expert_choice")
    routing = router(x, context)
    cfg, num_experts = router.config, router.num_experts
    by_sequence = cfg.scope == "sequence"
    group_len = context.seq_len if by_sequence else x.shape[0]
    groups = context.batch_size if by_sequence else 1
    capacity = expert_capacity(group_len, num_experts, cfg.top_k, cfg.capacity_factor)
    assert torch.all(routing.tokens_per_expert == groups * capacity)
    group_of = routing.token_index // group_len
    per_group = torch.zeros(num_experts, groups, dtype=torch.long)
    per_group.index_put_((routing.expert_index, group_of), torch.ones_like(group_of), accumulate=True)
    assert torch.all(per_group == capacity), "C tokens per expert (per sequence for scope=sequence)"
    # gates are P at the chosen pairs, and each expert's tokens are its top-C of P[:, e] within the group
    torch.testing.assert_close(routing.weight, routing.probs[routing.token_index, routing.expert_index])
    scores = routing.probs.view(groups, group_len, num_experts)
    kth = scores.topk(capacity, dim=1).values[:, -1, :]  # [G, E]: the C-th largest score
    assert torch.all(routing.weight >= kth[group_of, routing.expert_index] - 1e-7)


def test_expert_capacity_formula():
    assert expert_capacity(10, 4, 2, 1.0) == 5  # ceil(1 * 2 * 10 / 4)
    assert expert_capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
    assert expert_capacity(10, 11, 1, 1.1) == 1  # exactly 1, no float round-up
    assert expert_capacity(3, 2, 2, 2.0) == 3  # capped at T
    assert expert_capacity(64, 16, 2, 0.5) == 4
    router = build("expert_choice", 4, top_k=2, capacity_factor=1.25)
    routing = router(torch.randn(12, D_MODEL), RoutingContext(2, 6))
    assert routing.tokens_per_expert.tolist() == [8] * 4  # ceil(1.25 * 2 * 12 / 4) = 8
    router = build("expert_choice", 4, top_k=2, capacity_factor=1.25, scope="sequence")
    routing = router(torch.randn(12, D_MODEL), RoutingContext(2, 6))
    assert routing.tokens_per_expert.tolist() == [2 * 4] * 4  # ceil(1.25 * 2 * 6 / 4) = 4 per sequence


def test_expert_choice_sequence_scope_needs_batch_major_shape():
    router = build("expert_choice", 4, scope="sequence")
    with pytest.raises(ValueError, match="batch_size \\* seq_len"):
        router(torch.randn(10, D_MODEL), RoutingContext(2, 6))


# ---- oracle --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_oracle_routes_inside_the_domain_block(data):
    router, x, context = draw_case(data, "oracle")
    routing = router(x, context)
    blocks = block_layout(router.num_experts, router.num_domains)
    domains = context.domain_ids.tolist()
    for t, experts in enumerate(experts_per_token(routing)):
        assert set(experts) <= set(blocks[domains[t]])
        outside = [e for e in range(router.num_experts) if e not in blocks[domains[t]]]
        assert torch.all(routing.probs[t, outside] == 0), "probs exactly zero outside the block"
    gates = gate_matrix(routing)
    torch.testing.assert_close(gates.sum(-1), torch.ones(x.shape[0]))
    top_k = router.top_k
    if router.config.within_block == "uniform":
        torch.testing.assert_close(routing.weight, torch.full_like(routing.weight, 1 / top_k))
        for t, experts in enumerate(experts_per_token(routing)):
            block, pos = blocks[domains[t]], t % context.seq_len
            assert experts == sorted(block[(pos + j) % len(block)] for j in range(top_k))
            torch.testing.assert_close(routing.probs[t, block], torch.full((len(block),), 1 / len(block)))
    else:
        chosen = routing.probs[routing.token_index, routing.expert_index]
        kth = routing.probs.topk(top_k, dim=-1).values[:, -1]
        assert torch.all(chosen >= kth[routing.token_index] - 1e-7), "top-K of the block's probabilities"


def test_oracle_uniform_spreads_over_block_by_position():
    # E=6, D=2: blocks [0,1,2] and [3,4,5]; K=2; every token in domain 1
    router = build("oracle", 6, num_domains=2, top_k=2, within_block="uniform")
    context = RoutingContext(1, 4, domain_ids=torch.ones(4, dtype=torch.long))
    routing = router(torch.randn(4, D_MODEL), context)
    assert experts_per_token(routing) == [[3, 4], [4, 5], [3, 5], [3, 4]]
    assert routing.tokens_per_expert.tolist() == [0, 0, 0, 3, 3, 2]


def test_oracle_needs_domain_labels():
    router = build("oracle", 4, num_domains=2)
    with pytest.raises(ValueError, match="per-token domain labels"):
        router(torch.randn(3, D_MODEL), RoutingContext(1, 3))


def test_oracle_check_rejects_top_k_above_block_size():
    run = parse_config(compose(["router=oracle", "router.top_k=2"]))  # E=16, D=8: K <= 2
    assert run.router.name == "oracle"
    with pytest.raises(ConfigError) as err:
        parse_config(compose(["router=oracle", "router.top_k=3"]))
    assert err.value.key == "router.top_k" and err.value.value == 3
    for part in ("E=16", "D=8", "= 2", "raise model.moe.num_experts or lower router.top_k"):
        assert part in str(err.value)
    with pytest.raises(ConfigError, match="within_block"):
        parse_config(compose(["router=oracle", "router.within_block=random"]))


# ---- hash ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_hash_depends_only_on_token_id(data):
    router, x, context = draw_case(data, "hash")
    routing = router(x, context)
    mapping = {}
    for token, experts in zip(context.token_ids.tolist(), experts_per_token(routing), strict=True):
        assert mapping.setdefault(token, experts) == experts, "same id, same experts at any position"
    # another batch: shuffled ids, other hidden states, other shape, a router with another gate init
    gen = torch.Generator().manual_seed(1)
    ids = context.token_ids[torch.randperm(len(context.token_ids), generator=gen)]
    other = build("hash", router.num_experts, init_seed=123, top_k=router.top_k, seed=router.config.seed)
    routing2 = other(
        torch.randn(len(ids), D_MODEL, generator=gen), RoutingContext(1, len(ids), token_ids=ids)
    )
    for token, experts in zip(ids.tolist(), experts_per_token(routing2), strict=True):
        assert mapping[token] == experts
    assert torch.all(routing.logits == 0)
    torch.testing.assert_close(routing.weight, torch.full_like(routing.weight, 1 / router.top_k))


def test_hash_seed_changes_the_map_and_needs_token_ids():
    ids = torch.arange(200)
    a, b = build("hash", 8, seed=0, top_k=2), build("hash", 8, init_seed=5, seed=0, top_k=2)
    c = build("hash", 8, top_k=2, seed=1)
    ctx = RoutingContext(1, 200, token_ids=ids)
    x = torch.randn(200, D_MODEL)
    assert experts_per_token(a(x, ctx)) == experts_per_token(b(x, ctx))
    assert experts_per_token(a(x, ctx)) != experts_per_token(c(x, ctx))
    assert (a(x, ctx).tokens_per_expert > 0).all(), "the hash spreads tokens over all experts"
    with pytest.raises(ValueError, match="token ids"):
        a(x, RoutingContext(1, 200))


# ---- config checks and gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_shipped_router_configs_parse(name):
    """Every registered router has its conf/router/<name>.yaml, which composes into a valid run whose router
    section holds every option of the router's config dataclass (at its default unless the file says)."""
    run = parse_config(compose([f"router={name}", "balance=none"]))
    _, config_cls = ROUTERS.get(name)
    assert run.router.name == name and isinstance(run.router, config_cls)
    composed = compose([f"router={name}"]).router
    assert set(composed) == {f.name for f in dataclasses.fields(config_cls)}


@pytest.mark.parametrize(
    "name, options",
    [("sigmoid", {}), ("expert_choice", {}), ("expert_choice", {"scope": "sequence"}), ("oracle", {})],
)
def test_gradients_reach_the_gate_through_the_gates(name, options):
    router = build(name, 8, num_domains=2, **options)
    x = torch.randn(12, D_MODEL)
    context = RoutingContext(2, 6, domain_ids=torch.arange(12) % 2)
    routing = router(x, context)
    (routing.weight * torch.randn_like(routing.weight)).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_references_are_flagged_on_the_router_classes():
    from testbed.analysis.report import reference_routers

    assert reference_routers() == {"oracle", "hash"}
    assert ROUTERS.get("oracle")[0].reference == "upper" and ROUTERS.get("hash")[0].reference == "floor"


# ---- top-k softmax -------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_topk_softmax_takes_the_top_k_probabilities_as_gates(data):
    router, x, context = draw_case(data, "topk_softmax")
    routing = router(x, context)
    top_k = router.top_k
    chosen_probs = routing.probs[routing.token_index, routing.expert_index]
    kth = routing.probs.topk(top_k, dim=-1).values[:, -1]
    assert torch.all(chosen_probs >= kth[routing.token_index] - 1e-7), "the top-k of the probabilities"
    if router.config.renormalize:
        torch.testing.assert_close(gate_matrix(routing).sum(-1), torch.ones(x.shape[0]))
    else:
        torch.testing.assert_close(routing.weight, chosen_probs)


def test_jitter_only_in_training():
    router = build("topk_softmax", 8, jitter=0.5)
    x = torch.randn(10, D_MODEL)
    router.eval()
    a, b = router(x, RoutingContext(1, 10)), router(x, RoutingContext(1, 10))
    assert torch.equal(a.logits, b.logits)
    router.train()
    assert not torch.equal(router(x, RoutingContext(1, 10)).logits, a.logits)


# ---- the contract's helpers ----------------------------------------------------------------------------


def test_routing_from_choices_by_hand():
    logits = torch.zeros(3, 4)
    probs = torch.full((3, 4), 0.25)
    chosen = torch.tensor([[2, 0], [1, 2], [0, 3]])
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    r = routing_from_choices(logits, probs, chosen, gates)
    assert r.expert_index.tolist() == [0, 0, 1, 2, 2, 3]
    assert r.token_index.tolist() == [0, 2, 1, 0, 1, 2]
    torch.testing.assert_close(r.weight, torch.tensor([0.4, 0.9, 0.7, 0.6, 0.3, 0.1]))
    assert r.tokens_per_expert.tolist() == [2, 1, 2, 1]
    assert r.slot_index.tolist() == [1, 0, 0, 0, 1, 1]  # k of each (token, k) choice
    assert r.kept is None and r.kept_as(torch.long).tolist() == [1] * 6  # dropless: every assignment counts


def test_kept_mask_counts_only_the_kept_assignments():
    r = routing_from_choices(
        torch.zeros(3, 4),
        torch.full((3, 4), 0.25),
        torch.tensor([[2, 0], [1, 2], [0, 3]]),
        torch.full((3, 2), 0.5),
    )
    r.kept = torch.tensor([True, False, True, True, False, True])  # e.g. dropped by capacity
    assert r.num_assignments == 6 and r.kept_as(torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert count_per_expert(r.expert_index, 4).tolist() == [2, 1, 2, 1]
    assert count_per_expert(r.expert_index, 4, r.kept).tolist() == [1, 1, 1, 1]
