"""Pretrained HF MoEs (testbed/hf/): tiny random-weight models of each family, built from configs in code (no
download). The reconstructed routing is checked against the model's own choice, interventions against
constructions with a known effect, and the metrics on a model routed by construction."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional extra .[hf] is not installed")

from testbed.hf.capture import RouterHooks, find_routers  # noqa: E402
from testbed.hf.families import FAMILIES, route  # noqa: E402
from testbed.hf.load import wrap_model  # noqa: E402

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_config(family: str, **extra):
    """A 2-layer, 8-expert, top-2 config of each family (DeepSeek/GLM: 4 groups of 2, 2 groups per token)."""
    T = transformers
    deepseek = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1)
    deepseek |= dict(first_k_dense_replace=0, n_group=4, topk_group=2)
    configs = {
        "olmoe": lambda: T.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(
            **COMMON,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            norm_topk_prob=True,
        ),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(
            **COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16
        ),
        "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        "deepseek_v2": lambda: T.DeepseekV2Config(
            **COMMON, **MLA, **deepseek, topk_method="group_limited_greedy", routed_scaling_factor=1.5
        ),
        "deepseek_v3": lambda: T.DeepseekV3Config(**COMMON, **MLA, **deepseek),
        "glm4_moe": lambda: T.Glm4MoeConfig(**COMMON, **deepseek, head_dim=16),
        "phimoe": lambda: T.PhimoeConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
        "gpt_oss": lambda: T.GptOssConfig(
            **COMMON,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
    }
    config = configs[family]()
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, sharpen: float = 20.0, seed: int = 0):
    """Random weights; router weights scaled up so that choices and gates are far from uniform; DeepSeek-V3 /
    GLM get a random correction bias (it must change the selection, not the gates)."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spec = wrap_model(model, None).spec
    with torch.no_grad():
        for _, router in find_routers(model, spec):
            router.weight.mul_(sharpen)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def test_every_family_of_the_issue_is_known():
    expected = {
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "deepseek_v2",
        "deepseek_v3",
        "phimoe",
        "gpt_oss",
    }
    assert expected <= set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reconstructed_routing_is_the_models_own(family):
    """From the router logits alone: the same expert set per token and the same gates as the model's router,
    and replacing the model's choice by the reconstruction leaves the model's output unchanged."""
    model = tiny_model(family)
    hf = wrap_model(model, None)
    own = []
    handles = [
        router.register_forward_hook(lambda m, i, o: own.append((o[0], o[1], o[2], m)))
        for _, router in find_routers(model, hf.spec)
    ]
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    for handle in handles:
        handle.remove()
    assert len(own) == 2 == len(find_routers(model, hf.spec))
    changed_by_bias = 0
    for logits, weights, indices, module in own:
        bias = getattr(module, "e_score_correction_bias", None)
        choice = route(hf.spec, logits, bias)
        order, own_order = choice.indices.argsort(-1), indices.argsort(-1)
        assert torch.equal(choice.indices.gather(-1, order), indices.gather(-1, own_order))
        torch.testing.assert_close(
            choice.weights.gather(-1, order), weights.float().gather(-1, own_order), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(choice.probs.sum(-1), torch.ones(len(logits)), rtol=0, atol=1e-5)
        assert len(indices.unique()) > 2  # a non-trivial routing
        if bias is not None:
            unbiased = route(hf.spec, logits, torch.zeros_like(bias)).indices.sort(-1).values
            changed_by_bias += int((unbiased != choice.indices.sort(-1).values).any(-1).sum())
    if family in ("deepseek_v3", "glm4_moe"):
        assert changed_by_bias > 0  # the bias decided some choices: it was reconstructed, not ignored
    no_exclusion = torch.zeros(2, hf.spec.num_experts, dtype=torch.bool)
    with RouterHooks(model, hf.spec, excluded=no_exclusion) as hooks, torch.no_grad():
        replaced = model(ids).logits
    assert all(a == 1.0 for a in hooks.agreement().values())
    torch.testing.assert_close(replaced, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruning_experts_that_never_fire_changes_nothing(family):
    """One token repeated: positions route (nearly) alike, so few experts fire. Pruning the others leaves the
    output exactly as it was; pruning a firing expert takes it out of every choice."""
    model = tiny_model(family)
    hf = wrap_model(model, None)
    fired = torch.zeros(2, 8, dtype=torch.long)

    def count(layer, routing):
        fired[layer].index_add_(0, routing.expert_index, torch.ones_like(routing.expert_index))

    ids = torch.full((2, 12), 7)
    with RouterHooks(model, hf.spec, on_routing=count), torch.no_grad():
        reference = model(ids).logits
    never = fired == 0
    assert (never.sum(1) >= 4).all()  # at most K experts when positions route alike (GPT-OSS's sinks: not)
    with RouterHooks(model, hf.spec, excluded=never), torch.no_grad():
        pruned = model(ids).logits
    assert torch.equal(pruned, reference)

    used = []
    excluded = torch.zeros(2, 8, dtype=torch.bool)
    excluded[:, 0] = True
    excluded[torch.arange(2), fired.argmax(1)] = True  # a firing expert in each layer
    with (
        RouterHooks(model, hf.spec, excluded=excluded, on_routing=lambda _, r: used.append(r)),
        torch.no_grad(),
    ):
        changed = model(ids).logits
    for layer, routing in enumerate(used):
        assert not excluded[layer][routing.expert_index].any()
    assert not torch.allclose(changed, reference)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_reweighting_a_gate_equals_scaling_that_experts_output(family):
    """An expert's output is linear in its down projection: gate x s == down_proj x s."""
    model = tiny_model(family)
    hf = wrap_model(model, None)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    scale = torch.ones(2, 8)
    scale[0, 3], scale[1, 5] = 2.5, 0.5
    with torch.no_grad():
        reference = model(ids).logits
    with RouterHooks(model, hf.spec, gate_scale=scale), torch.no_grad():
        reweighted = model(ids).logits
    with torch.no_grad():
        for layer, expert in ((0, 3), (1, 5)):
            model.model.layers[layer].mlp.experts.down_proj[expert].mul_(scale[layer, expert])
        direct = model(ids).logits
    torch.testing.assert_close(reweighted, direct, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reweighted, reference)  # the scaled experts were chosen


# ------------------------------------------------------------------------ metrics with a known answer

DOMAINS = {"red": "abcdef", "green": "ghijkl", "blue": "mnopqr"}


@pytest.fixture(scope="module")
def block_mix(tmp_path_factory):
    """Three domains with disjoint alphabets and no spaces (no token is shared), and their tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("block_mix")
    rng = np.random.default_rng(0)
    texts = []
    for domain, letters in DOMAINS.items():
        with gzip.open(root / f"{domain}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for _ in range(16):
                text = "".join(rng.choice(list(letters), 400))
                texts.append(text)
                fh.write(json.dumps({"text": text}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def block_model(root, tmp_path):
    """A tiny OLMoE (6 experts, top-2) whose tokens of domain d all go to experts {2d, 2d + 1}: embeddings
    are the domain's unit vector, attention and experts output zero (the residual stays the embedding), and
    the router rows of block d read that direction. Saved with its tokenizer as a model directory."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
    config = tiny_config("olmoe", num_experts=6)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    domain_of_token = {}
    for d, letters in enumerate(DOMAINS.values()):
        text = "".join(letters) * 50
        ids = set(tokenizer(text)["input_ids"])
        ids |= {
            i
            for doc in gzip.open(root / f"{list(DOMAINS)[d]}.jsonl.gz", "rt")
            for i in tokenizer(json.loads(doc)["text"])["input_ids"]
        }
        for i in ids:
            assert domain_of_token.setdefault(i, d) == d  # no shared token
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        for token, d in domain_of_token.items():
            model.model.embed_tokens.weight[token, d] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.mlp.gate.weight.zero_()
            for d in range(3):
                layer.mlp.gate.weight[2 * d : 2 * d + 2, d] = 10.0
    out = tmp_path / "block_olmoe"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def mix_overrides(root):
    return [f"data.root={root}", f"data.domains=[{','.join(DOMAINS)}]", "data.seq_len=32"]


def test_metrics_of_a_model_routed_by_domain_blocks(block_mix, tmp_path):
    from testbed.hf.cli import analyze_main as main

    model_dir = block_model(block_mix, tmp_path)
    out = tmp_path / "analysis"
    args = ["--hf", str(model_dir), *mix_overrides(block_mix), "--out", str(out), "--no-progress"]
    assert main([*args, "--max-tokens-per-domain", "256", "--batch-size", "4"]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["router"] == "OLMoE" and analysis["domains"] == list(DOMAINS)
    assert analysis["layers"] == ["layer0", "layer1"]
    assert analysis["hf"]["tokens"] == 3 * 256 and analysis["hf"]["top_k"] == 2
    assert analysis["hf"]["selection_agreement"] == {"layer0": 1.0, "layer1": 1.0}
    for name in analysis["layers"]:
        m = analysis["per_layer"][name]
        for key in ("purity", "reference_precision", "routing_specialization", "domain_isolation"):
            assert m[key] == pytest.approx(1.0), key
        assert m["utilization"] == pytest.approx(1.0)
        assert m["dead_experts"] == 0.0
        assert m["nmi"] == pytest.approx(math.sqrt(math.log(3) / math.log(6)))
        assert m["gate_entropy"] == pytest.approx(math.log(2) / math.log(6), abs=1e-6)  # two gates of 1/2
        assert m["routing_variance"] == pytest.approx(1 / 15, abs=1e-6)  # Var([.5, .5, 0, 0, 0, 0])
        assert m["ngram_expertise_n4"] == 1.0 and m["ngram_expertise_n10"] == 1.0
        assert analysis["expert_load"][name] == [256] * 6
        # block routing: domain d's 256 tokens x top-2 go to experts 2d and 2d + 1 only
        assert analysis["counts"][name] == [[256 if e // 2 == d else 0 for e in range(6)] for d in range(3)]
    keys = {k.split("/")[1] for k in analysis["metrics"]}
    assert {"utilization", "purity", "nmi", "gate_entropy", "routing_variance", "dead_experts"} <= keys
    assert (out / "heatmap.png").is_file() and (out / "gate_entropy.png").is_file()
    counts = torch.load(out / "routing_counts.pt")["counts"]
    assert counts[0].tolist() == [[256, 256, 0, 0, 0, 0], [0, 0, 256, 256, 0, 0], [0, 0, 0, 0, 256, 256]]


# ----------------------------------------------------------------------------------------------- quiz

QUIZ = [
    ("What is two plus two?", "three", "four", "five", "six", "B"),
    ('Which word, "quoted", is a color?', "red", "run", "rug", "rim", "A"),
    ("Pick the last letter.", "a", "b", "c", "z", "D"),
    ("Which is an animal?", "stone", "table", "cat", "cloud", "C"),
    (
        "A longer question that takes many more tokens than the others, so batches hold padding?",
        "x",
        "y",
        "z",
        "w",
        "A",
    ),
]


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    """A tiny random OLMoE over the repo's own tokenizer (data/tokenizer.json, 4,096 tokens), saved."""
    from testbed.data.loading import SHIPPED_TOKENIZER

    out = tmp_path_factory.mktemp("olmoe")
    torch.manual_seed(0)
    config = tiny_config("olmoe", vocab_size=4096)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(30)
    model.save_pretrained(out)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(SHIPPED_TOKENIZER))
    tokenizer.save_pretrained(out)
    quiz = out / "quiz"
    quiz.mkdir()
    import csv

    for subject in ("arithmetic", "trivia"):
        with open(quiz / f"{subject}_test.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(QUIZ)
    return out


def test_quiz_counts_routing_at_the_answer_position(olmoe_dir, tmp_path):
    """The CLI's accuracy, dead experts, entropy and per-expert accuracy equal a direct computation from the
    model's own outputs (output_router_logits), one unpadded prompt at a time."""
    from testbed.analysis.quiz import load_quiz
    from testbed.hf.cli import quiz_main as main
    from testbed.hf.quiz import letter_token_ids, mmlu_prompt

    out = tmp_path / "quiz"
    args = [
        "--hf",
        str(olmoe_dir),
        "--quiz",
        str(olmoe_dir / "quiz"),
        "--out",
        str(out),
        "--batch-items",
        "3",
    ]
    assert main([*args, "--no-progress"]) == 0
    result = json.loads((out / "quiz.json").read_text())
    for figure in ("dead_experts.png", "gate_entropy.png", "expert_accuracy.png"):
        assert (out / figure).is_file()

    model = transformers.AutoModelForCausalLM.from_pretrained(olmoe_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(olmoe_dir)
    letters = letter_token_ids(tokenizer)
    items = load_quiz(olmoe_dir / "quiz")
    chosen = torch.zeros(2, len(items), 8, dtype=torch.bool)
    entropy = torch.zeros(2)
    correct = []
    for n, item in enumerate(items):
        ids = torch.tensor([tokenizer(mmlu_prompt(item))["input_ids"]])
        with torch.no_grad():
            output = model(ids, output_router_logits=True)
        correct.append(int(output.logits[0, -1, letters].argmax()) == item.answer)
        for layer, logits in enumerate(output.router_logits):
            probs = logits[-1].softmax(-1)  # the answer position (last token)
            chosen[layer, n, probs.topk(2).indices] = True
            entropy[layer] += -(probs * probs.log()).sum() / math.log(8) / len(items)
    assert result["accuracy"] == pytest.approx(np.mean(correct))
    for layer, name in enumerate(result["layers"]):
        m = result["per_layer"][name]
        assert m["dead_experts"] == pytest.approx(float((~chosen[layer].any(0)).float().mean()))
        assert m["gate_entropy"] == pytest.approx(float(entropy[layer]), abs=1e-5)
        items_per_expert = chosen[layer].sum(0)
        assert m["expert_items"] == items_per_expert.tolist()
        for e in range(8):
            if items_per_expert[e] > 0:
                expected = np.mean([c for c, on in zip(correct, chosen[layer, :, e], strict=True) if on])
                assert m["expert_accuracy"][e] == pytest.approx(expected)
            else:
                assert m["expert_accuracy"][e] is None


# --------------------------------------------------------------------------------------------- errors


def test_bad_models_exit_2_with_a_clear_message(tmp_path, capsys, monkeypatch):
    from testbed.hf.cli import analyze_main as main

    assert main(["--hf", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    dense = tmp_path / "llama"
    transformers.LlamaConfig(**COMMON).save_pretrained(dense)
    assert main(["--hf", str(dense)]) == 2
    err = capsys.readouterr().err
    assert "'llama' is not an MoE model" in err and "olmoe" in err
    (tmp_path / "empty").mkdir()
    assert main(["--hf", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    assert main(["--hf", str(dense)]) == 2
    assert "pip install -e .[hf]" in capsys.readouterr().err


def test_intervene_on_a_testbed_checkpoint(synth_mix, tmp_path):
    """The same commands on the testbed's own models: the dead set is the zero-load experts of the cloze quiz
    (every counted token), so pruning it changes nothing; reweighting the two most accurate experts does."""
    from testbed.hf.cli import quiz_main
    from testbed.hf.intervene import main
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides

    run_dir = tmp_path / "run"
    overrides = synth_overrides(synth_mix, "trainer.max_steps=6", "metrics.plots=false")
    run_training(compose(overrides), run_dir, quiet=True)
    quiz = tmp_path / "quiz"
    assert (
        quiz_main(["build", *synth_overrides(synth_mix)[:6], "--out", str(quiz), "--items-per-domain", "6"])
        == 0
    )
    assert quiz_main(["eval", str(run_dir), "--quiz", str(quiz), "--out", str(tmp_path / "eval")]) == 0
    baseline = json.loads((tmp_path / "eval" / "quiz.json").read_text())
    out = tmp_path / "prune"
    assert main(["prune", str(run_dir), "--quiz", str(quiz), "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    assert result["before"] == result["after"]
    for name in baseline["layers"]:
        load = baseline["per_layer"][name]["expert_load"]
        assert result["experts"][name] == [e for e, n in enumerate(load) if n == 0]
    out = tmp_path / "reweight"
    assert main(["reweight", str(run_dir), "--quiz", str(quiz), "--min-items", "1", "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    assert all(len(experts) == 2 for experts in result["experts"].values())
    assert result["after"]["loss"] != result["before"]["loss"]
