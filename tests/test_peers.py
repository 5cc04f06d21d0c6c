"""The peer analyses (testbed/analysis/peers.py, testbed/hf/peers.py, testbed/analysis/peer_runs.py), each on
a construction whose answer is known: routings written by hand, tiny Hugging Face OLMoEs whose embeddings,
routers and experts are set so that known experts fire for known domains, and tiny testbed models (an oracle
run, whose experts are its domains' blocks, and a top-k model whose router is set by hand)."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from testbed.analysis.peers import (
    PEER_ANALYSES,
    Agreement,
    CoActivation,
    Contribution,
    CrossLayer,
    TokenTables,
    coactivation_conditional,
    gate_rank,
    loss_table_summary,
    membership,
    parse_peers,
    top1_expert,
    top_pairs,
    transition_summary,
)
from testbed.routing.base import routing_from_choices


def hand_routing(choices, gates=None, num_experts: int = 4, kept=None):
    """A token-choice `Routing` of the given experts [T, K] (gates: decreasing along K unless given)."""
    chosen = torch.tensor(choices)
    num_tokens, top_k = chosen.shape
    if gates is None:
        gates = torch.linspace(0.7, 0.3, top_k).expand(num_tokens, top_k)
    routing = routing_from_choices(
        torch.zeros(num_tokens, num_experts),
        torch.full((num_tokens, num_experts), 1 / num_experts),
        chosen,
        torch.as_tensor(gates, dtype=torch.float32),
    )
    if kept is not None:  # [T, K] bool in the order of `choices`; assignments are sorted by expert
        flat = torch.tensor(kept, dtype=torch.bool).reshape(-1)
        routing.kept = flat[routing.token_index * top_k + routing.slot_index]
    return routing


# --------------------------------------------------------------------------------------- pure counting


def test_parse_peers():
    assert parse_peers("all") == list(PEER_ANALYSES)
    assert parse_peers("tokens,coactivation") == ["coactivation", "tokens"]
    with pytest.raises(ValueError, match="allowed: all"):
        parse_peers("coactivation,bogus")


def test_coactivation_of_a_hand_routing():
    """Tokens {0,1}, {0,1}, {0,2}, {2,3}: P(1|0) = 2/3, P(0|1) = 1, P(3|2) = 1/2; streamed in two batches,
    with a dropped assignment that must not count."""
    co = CoActivation(1, 4)
    co.update(0, membership(hand_routing([[0, 1], [0, 1]])))
    co.update(0, membership(hand_routing([[0, 2], [2, 3], [1, 3]], kept=[[1, 1], [1, 1], [0, 0]])))
    pairs = co.pairs[0].numpy()
    assert np.diag(pairs).tolist() == [3, 2, 2, 1]
    p = coactivation_conditional(pairs)
    expected = [
        [1, 2 / 3, 1 / 3, 0],
        [1, 1, 0, 0],
        [1 / 2, 0, 1, 1 / 2],
        [0, 0, 1, 1],
    ]
    np.testing.assert_allclose(p, expected)
    ranked = top_pairs(pairs, tokens=4, top=3)
    assert ranked["by_count"][0] == {
        "experts": [0, 1],
        "count": 2.0,
        "p_j_given_i": pytest.approx(2 / 3),
        "p_i_given_j": 1.0,
        "lift": pytest.approx(4 / 3),  # 2 x 4 / (3 x 2)
    }
    assert [e["experts"] for e in ranked["by_lift"]] == [[2, 3], [0, 1], [0, 2]]  # lifts 2, 4/3, 2/3
    assert ranked["by_lift"][0]["lift"] == pytest.approx(2.0)


def test_cross_layer_permutation_is_deterministic_and_independence_is_not():
    layer0 = [[e] for e in [0, 1, 2, 3] * 5]
    layer1 = [[(e + 1) % 4] for e in [0, 1, 2, 3] * 5]
    cross = CrossLayer(2, 4)
    for layer, choices in enumerate((layer0, layer1)):
        routing = hand_routing(choices, gates=[[1.0]] * len(choices))
        cross.update(layer, membership(routing), top1_expert(routing))
    cross.end_batch()
    summary = transition_summary(cross.joint[0].numpy())
    np.testing.assert_allclose(summary["p_next_given_prev"], np.roll(np.eye(4), 1, axis=1))
    assert summary["determinism"] == pytest.approx(1.0)
    assert summary["marginal_entropy"] == pytest.approx(math.log(4))
    assert summary["conditional_entropy"] == pytest.approx(0.0)
    assert transition_summary(cross.joint_top1[0].numpy())["determinism"] == pytest.approx(1.0)

    independent = CrossLayer(2, 2)
    for layer, choices in enumerate(([[0], [0], [1], [1]], [[0], [1], [0], [1]])):
        routing = hand_routing(choices, gates=[[1.0]] * 4, num_experts=2)
        independent.update(layer, membership(routing), top1_expert(routing))
    summary = transition_summary(independent.joint[0].numpy())
    np.testing.assert_allclose(summary["p_next_given_prev"], [[0.5, 0.5], [0.5, 0.5]])
    assert summary["determinism"] == pytest.approx(0.0)
    assert summary["mutual_information"] == pytest.approx(0.0)


def token_routing():
    """E = 3, K = 1: type 5 (6x) always to expert 0, type 6 (6x) half to 1 and half to 2, type 7 (2x) to 0."""
    tokens = torch.tensor([5] * 6 + [6] * 6 + [7] * 2)
    experts = [0] * 6 + [1, 2] * 3 + [0, 0]
    return tokens, hand_routing([[e] for e in experts], gates=[[1.0]] * 14, num_experts=3)


def test_token_tables_count_lift_and_vocabulary_share():
    tokens, routing = token_routing()
    tables = TokenTables(1, 3, vocab_size=200)
    tables.observe(tokens, tokens + 100)  # next token of type v: v + 100
    tables.update(0, routing)
    summary = tables.summary(decode=lambda ids: [f"<{i}>" for i in ids], top=5, min_count=5)
    layer = summary["layers"][0]
    expert0 = layer["experts"][0]
    assert expert0["assignments"] == 8
    assert [(r["id"], r["count"]) for r in expert0["top_input"]] == [(5, 6), (7, 2)]
    assert expert0["top_input"][0]["share"] == pytest.approx(6 / 8)
    assert expert0["top_input"][0]["lift"] == pytest.approx((6 / 8) / (6 / 14))
    assert expert0["top_input"][0]["token"] == "<5>"
    assert [r["id"] for r in expert0["top_input_by_lift"]] == [5]  # type 7: 2 < min_count
    assert [(r["id"], r["count"]) for r in expert0["top_next"]] == [(105, 6), (107, 2)]
    vocabulary = layer["vocabulary"]
    assert vocabulary["types"] == 2  # types 5 and 6 (type 7 is below min_count)
    assert vocabulary["share_types_mostly_one_expert"] == 0.5  # c_5 = 1, c_6 = 1/2 (not more than half)
    assert vocabulary["share_tokens_mostly_one_expert"] == 0.5
    assert vocabulary["mean_concentration"] == pytest.approx(0.75)
    assert vocabulary["uniform_concentration"] == pytest.approx(1 / 3)
    assert summary["tracking"]["exact"] and summary["tracking"]["coverage_inputs"] == 1.0


def test_token_tables_stay_within_their_budget():
    """2 slots: the first types seen (5, 6 by id within the batch) are tracked, type 7 and the next tokens are
    counted in the totals only, and the coverage says so. Tables grow with the types seen, by doubling."""
    tokens, routing = token_routing()
    tables = TokenTables(1, 3, vocab_size=200, budget=12)  # 12 // (2 x 1 x 3) = 2 slots
    assert tables.max_slots == 2
    tables.observe(tokens, tokens + 100)
    tables.update(0, routing)
    assert tables.inputs.numel() + tables.nexts.numel() <= 12
    tracking = tables.coverage()
    assert tracking["types_tracked"] == 2 and not tracking["exact"]
    assert tracking["coverage_inputs"] == pytest.approx(12 / 14) and tracking["coverage_next"] == 0.0
    assert tables.assignments[0].tolist() == [8, 3, 3]  # every assignment is still counted
    assert tables.inputs[0, :, 0].tolist() == [6, 0, 0] and tables.inputs[0, :, 1].tolist() == [0, 3, 3]

    growing = TokenTables(1, 3, vocab_size=200, initial_slots=1)
    for start in range(0, 14, 4):  # four batches: the tables widen from 1 slot as types arrive
        growing.observe(tokens[start : start + 4], tokens[start : start + 4] + 100)
        growing.update(0, hand_routing(routing_rows(routing)[start : start + 4], gates=None, num_experts=3))
    assert growing.slots >= growing.used == 6 and growing.coverage()["exact"]
    exact = TokenTables(1, 3, vocab_size=200)
    exact.observe(tokens, tokens + 100)
    exact.update(0, routing)
    assert growing.summary(top=5, min_count=1) == exact.summary(top=5, min_count=1)


def routing_rows(routing) -> list[list[int]]:
    """A one-expert-per-token routing's experts in token order, as `hand_routing` takes them."""
    rows = [0] * routing.num_tokens
    for token, expert in zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True):
        rows[token] = expert
    return [[e] for e in rows]


def test_agreement_of_hand_routings():
    """Sets {0,1}/{0,1}, {2,3}/{1,2}, {0,2}/{1,3}: same set 1/3, overlap (1 + 1/2 + 0)/3, same top-1 1/3."""
    a = hand_routing([[0, 1], [2, 3], [0, 2]])
    b = hand_routing([[1, 0], [2, 1], [3, 1]])
    agreement = Agreement(1, 2)
    agreement.update(0, a, b, torch.tensor([0, 0, 1]))
    layer = agreement.summary(["layer0"], ["x", "y"])["layer0"]
    assert layer["exact"] == pytest.approx(1 / 3)
    assert layer["overlap"] == pytest.approx(0.5)
    assert layer["top1"] == pytest.approx(1 / 3)  # top-1s 0, 2, 0 vs 1, 2, 3
    assert layer["per_domain"]["x"] == {"exact": 0.5, "overlap": 0.75, "top1": 0.5}
    assert layer["per_domain"]["y"] == {"exact": 0.0, "overlap": 0.0, "top1": 0.0}


def test_gate_rank():
    rank = gate_rank(torch.tensor([0, 1, 0, 0]), torch.tensor([0.2, 0.9, 0.5, 0.3]), 2)
    assert rank.tolist() == [2, 0, 0, 1]


def test_contribution_of_hand_outputs():
    """Token 0: gate 3/4 on o = (4, 0) and 1/4 on o = (0, 16): norms 3 and 4, top-1 share 3/7, y = (3, 4),
    cos(y1, y) = 3/5, relative error 4/5. Token 1: one expert, share 1, cos 1, error 0. Token 2: a zero
    output, skipped."""
    contribution = Contribution(1, 4)
    contribution.update(
        0,
        token_index=torch.tensor([0, 0, 1, 2]),
        expert_index=torch.tensor([0, 1, 2, 3]),
        weight=torch.tensor([0.75, 0.25, 1.0, 1.0]),
        outputs=torch.tensor([[4.0, 0.0], [0.0, 16.0], [1.0, 1.0], [0.0, 0.0]]),
        num_tokens=3,
    )
    layer = contribution.summary(["layer0"])["layer0"]
    assert layer["tokens"] == 2 and layer["tokens_skipped"] == 1
    assert layer["top1_share"] == pytest.approx((3 / 7 + 1) / 2)
    assert layer["top1_cosine"] == pytest.approx((0.6 + 1) / 2)
    assert layer["top1_relative_error"] == pytest.approx(0.4)
    np.testing.assert_allclose(layer["share_by_expert"][:3], [3 / 7, 4 / 7, 1.0])
    assert math.isnan(layer["share_by_expert"][3])  # never counted
    np.testing.assert_allclose(layer["share_by_rank"], [(3 / 7 + 1) / 2, 4 / 7])


def test_loss_table_ranks_ablation_and_forcing():
    summary = dict(
        baseline=[1.0, 2.0], losses=[[[1.5, 2.0], [1.0, 2.1]]], domains=["a", "b"], layer_names=["l0"]
    )
    ablation = loss_table_summary("ablation", **summary)
    assert ablation["delta"]["l0"] == [[0.5, 0.0], [0.0, pytest.approx(0.1)]]
    assert [e["expert"] for e in ablation["top"]] == [0, 1]  # mean increases 0.25, 0.05
    assert ablation["top_per_domain"]["b"][0]["expert"] == 1
    forcing = loss_table_summary("forcing", **summary)
    assert [e["expert"] for e in forcing["top"]] == [1, 0]
    assert forcing["best_per_domain"] == {"l0": {"a": 1, "b": 0}}


# ------------------------------------------------------------------------------ tiny Hugging Face OLMoEs

transformers = pytest.importorskip("transformers", reason="the optional extra .[hf] is not installed")

LETTERS = {"red": "abcdef", "green": "ghijkl", "blue": "mnopqr"}
TOKENS_PER_DOMAIN = 256


@pytest.fixture(scope="module")
def letters_mix(tmp_path_factory):
    """Three domains written in disjoint alphabets without spaces, so that no token type is shared, and a
    byte-level BPE tokenizer trained on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("letters")
    rng = np.random.default_rng(1)
    texts = []
    for domain, letters in LETTERS.items():
        with gzip.open(root / f"{domain}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for _ in range(16):
                texts.append("".join(rng.choice(list(letters), 400)))
                fh.write(json.dumps({"text": texts[-1]}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def mix_overrides(root) -> list[str]:
    return [f"data.root={root}", f"data.domains=[{','.join(LETTERS)}]", "data.seq_len=32"]


def letters_model(root, blocks, loud, seed: int = 0):
    """A tiny OLMoE (6 experts, top-2, two layers) and its tokenizer. Every token of domain d embeds as the
    unit vector e_d and attention adds nothing, so the router of layer l sees the token's domain: it sends
    domain d to `blocks[l][d]` = (first, second) with logits 10 and 9 (times the norm's scale; the first
    is the top-1). Experts output zero except `loud` (layer, expert) pairs, whose outputs avoid the first
    three dimensions (the routers never see them)."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
    config = transformers.OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts=6,
        num_experts_per_tok=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        for token, text in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            for d, letters in enumerate(LETTERS.values()):
                if text and set(text) <= set(letters):
                    embed[token, d] = 1.0
        for layer, block in enumerate(model.model.layers):
            block.self_attn.o_proj.weight.zero_()
            block.mlp.gate.weight.zero_()
            block.mlp.experts.down_proj.zero_()
            for d, (first, second) in enumerate(blocks[layer]):
                block.mlp.gate.weight[first, d] = 10.0
                block.mlp.gate.weight[second, d] = 9.0
            for expert in (e for l_, e in loud if l_ == layer):
                block.mlp.experts.down_proj[expert, 3:] = torch.randn(29, 32)
    return model, tokenizer


BLOCKS = [(0, 1), (2, 3), (4, 5)]  # domain d -> experts 2d (top-1) and 2d + 1
SHIFTED = [(2, 3), (4, 5), (0, 1)]  # domain d -> the block of domain d + 1


def save_model(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_hf_cli_counting_analyses_and_agreement(letters_mix, tmp_path):
    """Model A: layer 0 routes domain d to {2d, 2d+1}, layer 1 to the next domain's block; even experts
    speak, odd ones are silent. Model B: A with layer 1 sending red to {3, 4} and green to {5, 0}."""
    from testbed.hf.cli import analyze_main

    loud = [(layer, e) for layer in (0, 1) for e in (0, 2, 4)]
    a = save_model(*letters_model(letters_mix, [BLOCKS, SHIFTED], loud), tmp_path / "a")
    b = save_model(*letters_model(letters_mix, [BLOCKS, [(3, 4), (5, 0), (0, 1)]], loud), tmp_path / "b")
    out = tmp_path / "out"
    args = ["--hf", str(a), *mix_overrides(letters_mix), "--out", str(out), "--no-progress"]
    args += ["--max-tokens-per-domain", str(TOKENS_PER_DOMAIN), "--batch-size", "4", "--compare", str(b)]
    assert analyze_main([*args, "--peers", "coactivation,tokens,cross_layer,contribution,agreement"]) == 0
    peers = json.loads((out / "peers.json").read_text())
    assert peers["layers"] == ["layer0", "layer1"] and peers["tokens_counted"] == 3 * TOKENS_PER_DOMAIN

    # co-activation: the two experts of a block always together, never with another block
    for name in peers["layers"]:
        layer = peers["coactivation"][name]
        p = np.array(layer["p_j_given_i"], dtype=float)
        np.testing.assert_allclose(p, np.kron(np.eye(3), np.ones((2, 2))))
        assert {tuple(e["experts"]) for e in layer["top_pairs"]["by_count"]} == {(0, 1), (2, 3), (4, 5)}
        for entry in layer["top_pairs"]["by_count"]:
            assert entry["count"] == TOKENS_PER_DOMAIN and entry["lift"] == pytest.approx(3.0)

    # tokens: expert 0 takes every red token at layer 0 and every blue one at layer 1, each at lift 3
    # (its share of the expert's tokens over its share of all tokens); every type sits on one expert
    assert peers["tokens"]["tracking"]["exact"]
    for name, letters in (("layer0", LETTERS["red"]), ("layer1", LETTERS["blue"])):
        layer = peers["tokens"]["layers"][name]
        assert layer["vocabulary"]["share_types_mostly_one_expert"] == 1.0
        assert layer["vocabulary"]["mean_concentration"] == 1.0
        assert layer["vocabulary"]["uniform_concentration"] == pytest.approx(1 / 3)
        expert0 = layer["experts"][0]
        assert expert0["assignments"] == TOKENS_PER_DOMAIN
        for row in expert0["top_input"] + expert0["top_input_by_lift"] + expert0["top_next"]:
            assert set(row["token"]) <= set(letters)
            assert row["lift"] == pytest.approx(3.0)
        assert layer["experts"][1]["top_input"] == expert0["top_input"]  # 2d + 1 sees what 2d sees

    # cross-layer: block d at layer 0 -> block d + 1 at layer 1, each of its two experts with P = 1/2;
    # the top-1 path (first expert of each block) is a permutation
    pair = peers["cross_layer"]["layer0->layer1"]
    expected = np.zeros((6, 6))
    for d, (first, second) in enumerate(SHIFTED):
        expected[[2 * d, 2 * d + 1], first] = expected[[2 * d, 2 * d + 1], second] = 0.5
    np.testing.assert_allclose(np.array(pair["assignments"]["p_next_given_prev"], dtype=float), expected)
    assert pair["assignments"]["determinism"] == pytest.approx(1 - math.log(2) / math.log(6))
    assert pair["top1"]["determinism"] == pytest.approx(1.0)
    top1 = np.array(pair["top1"]["p_next_given_prev"], dtype=float)
    assert [top1[2 * d, first] for d, (first, _) in enumerate(SHIFTED)] == [1.0, 1.0, 1.0]

    # contribution: the top-1 (even) expert carries the whole output, the odd one nothing
    for name in peers["layers"]:
        layer = peers["contribution"][name]
        assert layer["tokens"] == 3 * TOKENS_PER_DOMAIN
        assert layer["top1_share"] == pytest.approx(1.0)
        assert layer["top1_cosine"] == pytest.approx(1.0)
        assert layer["top1_relative_error"] == pytest.approx(0.0, abs=1e-9)
        assert layer["share_by_expert"] == pytest.approx([1, 0, 1, 0, 1, 0])
        assert layer["share_by_rank"] == pytest.approx([1.0, 0.0])

    # agreement: layer 0 identical; layer 1: blue identical, red and green share one expert of two
    agreement = peers["agreement"]["layers"]
    assert [agreement["layer0"][k] for k in ("exact", "overlap", "top1")] == [1.0, 1.0, 1.0]
    assert agreement["layer0"]["tokens"] == 3 * TOKENS_PER_DOMAIN
    assert agreement["layer1"]["exact"] == pytest.approx(1 / 3)
    assert agreement["layer1"]["overlap"] == pytest.approx(2 / 3)
    assert agreement["layer1"]["top1"] == pytest.approx(1 / 3)
    assert agreement["layer1"]["per_domain"]["red"] == {"exact": 0.0, "overlap": 0.5, "top1": 0.0}
    assert agreement["layer1"]["per_domain"]["blue"] == {"exact": 1.0, "overlap": 1.0, "top1": 1.0}
    assert peers["agreement"]["checkpoint_b"] == str(b)

    for stem in ("coactivation", "tokens", "top_tokens", "cross_layer", "agreement", "contribution"):
        for suffix in ("png", "pdf"):
            assert (out / f"peers_{stem}.{suffix}").stat().st_size > 0
    assert "## Router agreement" in (out / "peers.md").read_text()
    assert (out / "analysis.json").is_file()  # the standard report is written too


def hf_data(root):
    from testbed.analysis.quiz import compose_data

    return compose_data(mix_overrides(root))


def test_hf_ablation_and_forcing_of_the_one_expert_that_speaks(letters_mix, tmp_path):
    """Only expert 0 of layer 0 outputs anything, and only red tokens reach it. Ablating it changes the red
    loss by exactly what zeroing its weights does and nothing else; ablating any other expert changes
    nothing (its stand-in is silent too). Forcing every token of layer 0 to a silent expert equals that
    ablation; forcing at layer 1 (all silent) changes nothing."""
    from testbed.hf.load import wrap_model
    from testbed.hf.mix import interleaved_batches
    from testbed.hf.peers import domain_losses, hf_peers

    model, tokenizer = letters_model(letters_mix, [BLOCKS, BLOCKS], loud=[(0, 0)])
    hf, data = wrap_model(model, tokenizer), hf_data(letters_mix)
    peers = hf_peers(hf, data, 32, 4, 0, ["ablation", "forcing"], ablation_tokens_per_domain=128)
    batches = list(interleaved_batches(data, tokenizer, 32, 4, 128))
    baseline = domain_losses(hf, batches, 3)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[0].zero_()
    silenced = domain_losses(hf, batches, 3) - baseline
    assert abs(silenced[0]) > 1e-4
    np.testing.assert_allclose(silenced[1:], 0.0, atol=1e-7)

    ablation, forcing = peers["ablation"], peers["forcing"]
    assert ablation["baseline"] == pytest.approx(dict(zip(LETTERS, baseline, strict=True)))
    assert ablation["tokens"] == 3 * 128 and ablation["method"].startswith("selection")
    expected = np.zeros((2, 6, 3))
    expected[0, 0] = silenced
    delta = np.array([ablation["delta"][n] for n in ("layer0", "layer1")])
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    forced = np.array([forcing["delta"][n] for n in ("layer0", "layer1")])
    for expert in range(1, 6):
        np.testing.assert_allclose(forced[0, expert], silenced, atol=1e-5)
    np.testing.assert_allclose(forced[1], 0.0, atol=1e-5)
    assert np.abs(forced[0, 0, 1:]).min() > 1e-4  # green and blue now get expert 0's output


def test_hf_contribution_when_the_top1_expert_is_silent(letters_mix):
    """Even experts (the top-1 of each block) silent, odd ones speak: the top-1 share is 0, its cosine with
    the mixture 0 (a zero vector) and the mixture's relative error without the others 1."""
    from testbed.hf.load import wrap_model
    from testbed.hf.peers import hf_peers

    loud = [(layer, e) for layer in (0, 1) for e in (1, 3, 5)]
    model, tokenizer = letters_model(letters_mix, [BLOCKS, BLOCKS], loud)
    peers = hf_peers(wrap_model(model, tokenizer), hf_data(letters_mix), 32, 4, 128, ["contribution"])
    for name in ("layer0", "layer1"):
        layer = peers["contribution"][name]
        assert layer["top1_share"] == 0.0 and layer["top1_cosine"] == 0.0
        assert layer["top1_relative_error"] == pytest.approx(1.0)
        assert layer["share_by_expert"] == pytest.approx([0, 1, 0, 1, 0, 1])


# ----------------------------------------------------------------------- every family's experts module

MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def family_config(family: str):
    """2 layers, 8 experts, top-2, hidden 32, for each supported family (no download)."""
    T = transformers
    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    grouped = dict(n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=0)
    grouped |= dict(n_group=4, topk_group=2)
    build = {
        "olmoe": lambda: T.OlmoeConfig(**base, num_experts=8),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **base, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16
        ),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**base, num_experts=8, moe_intermediate_size=16, head_dim=16),
        "mixtral": lambda: T.MixtralConfig(**base, num_local_experts=8),
        "deepseek_v2": lambda: T.DeepseekV2Config(
            **base, **MLA, **grouped, topk_method="group_limited_greedy"
        ),
        "deepseek_v3": lambda: T.DeepseekV3Config(**base, **MLA, **grouped),
        "glm4_moe": lambda: T.Glm4MoeConfig(**base, **grouped, head_dim=16),
        "phimoe": lambda: T.PhimoeConfig(**base, num_local_experts=8),
        "gpt_oss": lambda: T.GptOssConfig(
            **base, num_local_experts=8, head_dim=16, layer_types=["sliding_attention", "full_attention"]
        ),
    }
    config = build[family]()
    config._attn_implementation = "eager"
    return config


@pytest.mark.parametrize(
    "family",
    [
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe",
        "phimoe",
        "gpt_oss",
    ],
)
def test_expert_slots_rebuild_each_familys_mixture_and_forcing_keeps_the_gate_sum(family):
    """The per-slot outputs the contribution hook computes, gated and summed, give back the experts module's
    own output; the forcing hook puts the expert in slot 0 with the token's gate sum, other slots at 0."""
    from testbed.hf.capture import find_routers
    from testbed.hf.load import wrap_model
    from testbed.hf.peers import ExpertSlots, _force, experts_modules

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(family)).eval()
    hf = wrap_model(model, None)
    modules = experts_modules(model, hf.spec)
    assert len(modules) == 2
    outputs = {}
    handles = [
        m.register_forward_hook(lambda m, i, o, layer=layer: outputs.__setitem__(layer, o.clone()))
        for layer, m in enumerate(modules)
    ]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with ExpertSlots(modules) as slots, torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    routers = [module for _, module in find_routers(model, hf.spec)]
    for layer in range(2):
        indices, weights, per_slot = slots.captured[layer]
        mixture = (per_slot.float() * weights.float().unsqueeze(-1)).sum(1)
        scale = float(outputs[layer].abs().max())  # outputs are small: tolerances relative to them
        torch.testing.assert_close(mixture, outputs[layer].float(), rtol=1e-4, atol=1e-4 * scale)
        handle = routers[layer].register_forward_hook(_force(5))
        with ExpertSlots(modules) as forced, torch.no_grad():
            model(ids)
        handle.remove()
        forced_indices, forced_weights, _ = forced.captured[layer]
        assert (forced_indices[:, 0] == 5).all()
        assert all(len(set(row.tolist())) == row.numel() for row in forced_indices)  # distinct experts
        torch.testing.assert_close(
            forced_weights[:, 0].float(), weights.float().sum(-1), rtol=1e-5, atol=1e-6
        )
        assert (forced_weights[:, 1:] == 0).all()


# --------------------------------------------------------------------------------- testbed checkpoints


@pytest.fixture(scope="module")
def oracle_run(synth_mix, tmp_path_factory):
    """A tiny testbed run with the oracle router: E = 6, K = 2, three domains, so domain d's tokens go to
    both experts of block d = {2d, 2d+1} at every layer."""
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides

    run_dir = tmp_path_factory.mktemp("oracle_run")
    overrides = synth_overrides(synth_mix, "router=oracle", "trainer.max_steps=6", "metrics.plots=false")
    run_training(compose(overrides), run_dir, quiet=True)
    return run_dir


def test_testbed_run_cli_every_analysis(oracle_run, tmp_path):
    """`testbed-analyze RUN --peers all --compare RUN`: blocks co-activate, paths stay in their block with
    P = 1/2, a checkpoint agrees with itself, ablating an expert (gate zero: the oracle renormalizes its
    partner to 1) changes only its domain's loss, and forcing expert e equals ablating its partner."""
    from testbed.hf.cli import analyze_main

    out = tmp_path / "out"
    args = [str(oracle_run), "--out", str(out), "--ablation-tokens-per-domain", "64"]
    assert analyze_main([*args, "--peers", "all", "--compare", str(oracle_run)]) == 0
    peers = json.loads((out / "peers.json").read_text())
    assert peers["router"] == "oracle" and peers["analyses"] == list(PEER_ANALYSES)
    blocks = np.kron(np.eye(3), np.ones((2, 2)))
    for name in peers["layers"]:
        np.testing.assert_allclose(np.array(peers["coactivation"][name]["p_j_given_i"], dtype=float), blocks)
        assert peers["agreement"]["layers"][name]["exact"] == 1.0
        assert peers["agreement"]["layers"][name]["top1"] == 1.0
        contribution = peers["contribution"][name]
        assert contribution["tokens"] > 0 and 0.5 <= contribution["top1_share"] <= 1.0
    pair = peers["cross_layer"]["layer0->layer1"]["assignments"]
    np.testing.assert_allclose(np.array(pair["p_next_given_prev"], dtype=float), blocks / 2)
    assert pair["determinism"] == pytest.approx(1 - math.log(2) / math.log(6))
    assert peers["tokens"]["tracking"]["exact"]

    ablation, forcing = peers["ablation"], peers["forcing"]
    assert ablation["method"].startswith("gate zero")
    for name in peers["layers"]:
        delta = np.array(ablation["delta"][name])
        forced = np.array(forcing["delta"][name])
        for expert in range(6):
            own = expert // 2
            others = [d for d in range(3) if d != own]
            np.testing.assert_allclose(delta[expert, others], 0.0, atol=1e-5)
            assert abs(delta[expert, own]) > 1e-6
            np.testing.assert_allclose(forced[expert, own], delta[expert ^ 1, own], atol=1e-5)
    for stem in ("coactivation", "tokens", "cross_layer", "agreement", "ablation", "forcing", "contribution"):
        assert (out / f"peers_{stem}.png").is_file() and (out / f"peers_{stem}.pdf").is_file()


def test_testbed_run_option_errors(oracle_run, tmp_path, capsys):
    from testbed.hf.cli import analyze_main

    with pytest.raises(SystemExit) as exit_info:
        analyze_main([str(oracle_run), "--peers", "coactivation,bogus"])
    assert exit_info.value.code == 2
    assert "allowed: all" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bare --peers before an override takes it as its list
        analyze_main([str(oracle_run), "--peers", "data.seq_len=16"])
    assert "put it after the overrides" in capsys.readouterr().err
    out = tmp_path / "out"
    assert analyze_main([str(oracle_run), "--out", str(out), "--peers", "agreement"]) == 2
    assert "--compare" in capsys.readouterr().err


def hand_routed_module(synth_mix, renormalize: bool = False):
    """A fresh testbed model (top-k softmax, K = 2 of 6, untied head) whose every token embeds as e_0 and
    whose attention adds nothing: each router sends every token to experts 0 (logit 10) and 1 (logit 9).
    Only expert 0 of the first layer outputs anything, outside dimension 0 (the routers never see it)."""
    from testbed.config import parse_config
    from testbed.data.datamodule import DomainMixDataModule
    from testbed.train.module import MoELanguageModel
    from tests.conftest import compose, synth_overrides

    extra = ["model.tie_embeddings=false", f"router.renormalize={str(renormalize).lower()}"]
    run = parse_config(compose(synth_overrides(synth_mix, *extra)))
    datamodule = DomainMixDataModule(run.data, seed=run.seed)
    datamodule.setup("validate")
    torch.manual_seed(0)
    module = MoELanguageModel(run, datamodule.domains).eval()
    with torch.no_grad():
        module.model.embed.weight.zero_()
        module.model.embed.weight[:, 0] = 1.0
        for index, layer in enumerate(module.model.moe_layers):
            module.model.blocks[layer.layer_index].attn.out.weight.zero_()
            layer.router.gate.weight.zero_()
            layer.router.gate.weight[0, 0], layer.router.gate.weight[1, 0] = 10.0, 9.0
            layer.experts.w_out.zero_()
            if index == 0:
                layer.experts.w_out[0, :, 1:] = torch.randn(layer.experts.hidden, layer.experts.d_model - 1)
    return module, datamodule


def test_testbed_selection_ablation_and_contribution_by_hand(synth_mix):
    """Ablating expert 0 of layer 0 (selection: it leaves the top-2, expert 1 and a silent stand-in remain)
    changes each domain's loss by what zeroing its weights does; ablating expert 1 (gates not renormalized,
    so expert 0 keeps its gate) or an expert never chosen changes nothing. Contribution: expert 0 carries
    the whole output of layer 0 (share 1, cosine 1, error 0), expert 1 none."""
    from testbed.analysis.peer_runs import checkpoint_peers, domain_losses

    module, datamodule = hand_routed_module(synth_mix)
    batches = list(datamodule.val_dataloader())
    peers = checkpoint_peers(module, batches, ["contribution", "ablation"], ablation_tokens_per_domain=0)
    assert peers["ablation"]["method"].startswith("selection")
    baseline = domain_losses(module.model, batches, 3, "cpu")
    with torch.no_grad():
        module.model.moe_layers[0].experts.w_out[0].zero_()
    silenced = domain_losses(module.model, batches, 3, "cpu") - baseline
    assert np.abs(silenced).min() > 1e-4
    delta = np.array([peers["ablation"]["delta"][n] for n in module.moe_layer_names])
    expected = np.zeros_like(delta)
    expected[0, 0] = silenced
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    layer0 = peers["contribution"][module.moe_layer_names[0]]
    assert layer0["top1_share"] == pytest.approx(1.0) and layer0["top1_cosine"] == pytest.approx(1.0)
    assert layer0["top1_relative_error"] == pytest.approx(0.0, abs=1e-9)
    assert layer0["share_by_expert"][:2] == pytest.approx([1.0, 0.0])
    assert layer0["assignments_by_expert"][2:] == [0, 0, 0, 0]
