"""Pruning pretrained HF MoEs for real (testbed/hf/prune.py), counting expert usage on held-out text until it
is stable (testbed/hf/count.py), and `testbed-intervene` (testbed/hf/intervene.py): the pruned checkpoint of
every family reloads with plain `from_pretrained` and computes the original logits wherever no removed expert
was chosen; reweight is judged on items it did not select on, with a bootstrap interval.

Tiny random models as tests/test_hf.py builds them, with some experts made unreachable: every token embedding
gets a constant first coordinate and those experts' router rows read it with a large negative weight (GPT-OSS:
also its router bias; DeepSeek-V3 / GLM: also a low correction bias), so their logits stay below -100."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional extra .[hf] is not installed")

from testbed.hf.capture import RouterHooks, find_routers  # noqa: E402
from testbed.hf.count import UsageCount, count_usage, text_batches  # noqa: E402
from testbed.hf.families import FAMILIES  # noqa: E402
from testbed.hf.load import wrap_model  # noqa: E402
from testbed.hf.prune import PrunePlan, check_routing, plan_pruning, prune_model, save_pruned  # noqa: E402
from tests.conftest import SYNTH_DOMAINS  # noqa: E402
from tests.test_hf import QUIZ, VOCAB, tiny_config  # noqa: E402

# DeepSeek-V3 / GLM score a group by its top two experts: with test_hf's 4 groups of 2 nothing can go (see
# test_grouped_routers_keep_their_groups), so their round trip uses 2 groups of 4 (one best group per token)
GROUPS = {"deepseek_v3": dict(n_group=2, topk_group=1), "glm4_moe": dict(n_group=2, topk_group=1)}
# DeepSeek-V2 (group_limited_greedy, 4 groups of 2) loses one expert per group
UNREACHABLE = {"deepseek_v2": [1, 2, 5, 6]}
# the families whose routing does not depend on removed experts that were not chosen: there a reachable
# expert is removed as well, so that some positions did choose it (and are not compared)
EXACT = {"mixtral", "gpt_oss", "qwen2_moe"}  # qwen2_moe: test_hf's config renormalizes (norm_topk_prob)


def unreachable_model(family: str, vocab: int = VOCAB, seed: int = 0, sharpen: float = 20.0):
    """(model, unreachable experts): test_hf's tiny model of the family with some experts never chosen."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=vocab, **GROUPS.get(family, {}))
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    spec = wrap_model(model, None).spec
    unreachable = UNREACHABLE.get(family, [1, 6])
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 0.2
        for _, router in find_routers(model, spec):
            router.weight.mul_(sharpen)
            router.weight[:, 0] = 0.0
            router.weight[unreachable, 0] = -30.0
            if getattr(router, "bias", None) is not None:
                router.bias[unreachable] = -30.0
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.uniform_(-0.3, 0.3)
                router.e_score_correction_bias[unreachable] = -1.0
    return model, unreachable


def route_and_count(model, spec, ids):
    """The logits, the loads [L, E] and the chosen experts per layer [B, T, K] of the original model."""
    num_layers = len(find_routers(model, spec))
    load = torch.zeros(num_layers, spec.num_experts, dtype=torch.long)
    chosen = []

    def on_choice(layer, logits, choice):
        load[layer] += torch.bincount(choice.indices.flatten(), minlength=spec.num_experts)
        chosen.append(choice.indices.reshape(*ids.shape, -1))

    with RouterHooks(model, spec, on_choice=on_choice), torch.no_grad():
        logits = model(ids).logits
    return logits, load, chosen


ROUND_TRIP = {}  # family -> (positions compared, positions, max abs diff, parameters, bytes): the report


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_checkpoint_reloads_with_the_original_logits(family, tmp_path):
    """Prune, save, reload with plain from_pretrained: the config's count is lower, the removed experts'
    weights are gone, and the logits equal the original model's at every position where the original router
    chose no removed expert, at that position or an earlier one of its sequence (attention sees those), in
    any layer."""
    model, unreachable = unreachable_model(family)
    hf = wrap_model(model, None)
    spec = hf.spec
    ids = torch.randint(0, VOCAB, (48, 8), generator=torch.Generator().manual_seed(1))
    reference, load, chosen = route_and_count(model, spec, ids)
    assert all(load[:, e].sum() == 0 for e in unreachable)
    plan = plan_pruning(spec, ["layer0", "layer1"], load, torch.zeros(load.shape, dtype=torch.float64))
    assert plan.pruned == [unreachable, unreachable]
    if family in EXACT:  # also the least-used reachable expert of each layer
        extra = [int(torch.where(row > 0, row, row.max() + 1).argmin()) for row in load]
        pruned = [sorted([*p, e]) for p, e in zip(plan.pruned, extra, strict=True)]
        plan = PrunePlan(plan.layer_names, pruned, 8, "test")
    removed = torch.zeros(2, 8, dtype=torch.bool)
    for layer, experts in enumerate(plan.pruned):
        removed[layer, experts] = True
    hit = torch.zeros(ids.shape, dtype=torch.bool)
    for layer, experts in enumerate(chosen):
        hit |= removed[layer][experts].any(-1)
    compared = ~hit.cummax(dim=1).values  # no removed expert chosen here or earlier in the sequence

    result = prune_model(hf, plan)
    saved = save_pruned(hf, tmp_path / "pruned", result)
    assert {"config.json", "model.safetensors"} <= set(saved["files"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    new_count = 8 - len(plan.pruned[0])
    assert wrap_model(reloaded, None).spec.num_experts == new_count
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    counts = [config[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in config]
    assert counts == [new_count] and config["num_experts_per_tok"] <= new_count
    for _, router in find_routers(reloaded, wrap_model(reloaded, None).spec):
        assert router.weight.shape[0] == new_count
    assert result.parameters_removed == result.parameters_before - sum(
        p.numel() for p in reloaded.parameters()
    )
    assert saved["bytes_removed"] == 4 * sum(n for _, n in result.removed_tensors)  # fp32

    with torch.no_grad():
        logits = reloaded(ids).logits
    positions = int(compared.sum())
    assert positions > 0
    if family in EXACT:
        assert positions < compared.numel()  # some positions chose the removed reachable expert
    diff = float((logits - reference)[compared].abs().max())
    ROUND_TRIP[family] = (
        positions,
        compared.numel(),
        diff,
        result.parameters_removed,
        saved["bytes_removed"],
    )
    print(f"\n{family}: compared {positions}/{compared.numel()} positions, max abs diff {diff:.2e}, "
          f"{result.parameters_removed} parameters / {saved['bytes_removed']} bytes removed")  # fmt: skip
    torch.testing.assert_close(logits[compared], reference[compared], rtol=1e-5, atol=1e-5)


def test_plan_removes_the_same_number_per_layer():
    """The layer with the fewest never-used experts sets the number; elsewhere the least probable go; top-k
    experts always remain."""
    spec = wrap_model(unreachable_model("olmoe")[0], None).spec  # 8 experts, top-2
    load = torch.tensor([[5, 0, 0, 0, 3, 4, 2, 1], [0, 2, 2, 2, 0, 3, 3, 3]])
    mass = torch.tensor([[9.0, 0.5, 0.1, 0.3, 1, 1, 1, 1], [0.2, 1, 1, 1, 0.1, 1, 1, 1]], dtype=torch.float64)
    plan = plan_pruning(spec, ["layer0", "layer1"], load, mass)
    assert plan.pruned == [[2, 3], [0, 4]] and plan.removed_per_layer == 2
    plan = plan_pruning(spec, ["layer0"], torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8).double())
    assert plan.removed_per_layer == 6 and "top-k" in plan.limited_by


def test_grouped_routers_keep_their_groups():
    """DeepSeek-V2's groups lose the same number each; DeepSeek-V3 / GLM with groups of two lose none (a group
    is scored by its top two)."""
    spec = wrap_model(unreachable_model("deepseek_v2")[0], None).spec  # 4 groups of 2, top-2 groups
    load = torch.tensor([[0, 0, 5, 0, 5, 0, 5, 0], [5, 0, 0, 5, 0, 5, 0, 5]])
    plan = plan_pruning(spec, ["layer0", "layer1"], load, torch.zeros(2, 8, dtype=torch.float64))
    assert plan.grouped and plan.pruned == [[0, 3, 5, 7], [1, 2, 4, 6]]  # group 0 of layer 0: a tie, 0 goes
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    spec = wrap_model(model, None).spec
    plan = plan_pruning(spec, ["layer0"], torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8).double())
    assert plan.removed_per_layer == 0 and "keeps 2" in plan.limited_by


def test_the_routing_check_measures_what_pruning_changes():
    """OLMoE does not renormalize its gates: removing a reachable expert changes the gates of the tokens that
    did not choose it (the softmax loses its mass), and the check says so; Mixtral renormalizes: unchanged."""
    for family, changed in (("olmoe", True), ("mixtral", False)):
        model, _ = unreachable_model(family)
        hf = wrap_model(model, None)
        ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))
        plan = PrunePlan(["layer0", "layer1"], [[0, 1, 6], [0, 1, 6]], 8, "test")
        check = check_routing(hf, plan, [ids])
        assert check["tokens"] == ids.numel()
        for layer in ("layer0", "layer1"):
            assert check["removed_expert_chosen"][layer] > 0
            unchanged = check["routing_unchanged"][layer]
            assert unchanged + check["removed_expert_chosen"][layer] == pytest.approx(1.0) or changed
            assert (check["max_relative_gate_change"][layer] > 1e-3) == changed


# ------------------------------------------------------------------------------- counting on held-out text


def text_overrides(root) -> list[str]:
    return ["data=shipped", f"data.root={root}", f"data.domains=[{','.join(SYNTH_DOMAINS)}]"]


@pytest.fixture(scope="module")
def shipped_tokenizer():
    from testbed.data.loading import SHIPPED_TOKENIZER

    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(SHIPPED_TOKENIZER), eos_token="<|endoftext|>"
    )


def test_count_grows_until_the_never_used_set_is_stable(synth_mix, shipped_tokenizer):
    """The unreachable experts are exactly the never-used ones, found at the first doubling; a cap below
    that reports an unstable count."""
    from testbed.analysis.quiz import compose_data

    model, unreachable = unreachable_model("olmoe", vocab=4096)
    hf = wrap_model(model, shipped_tokenizer)
    data = compose_data(text_overrides(synth_mix))
    count = count_usage(hf, text_batches(data, shipped_tokenizer, 64, 4), start_tokens=256, source="synth")
    assert count.stable and count.never_used() == [unreachable, unreachable]
    assert [h["tokens"] for h in count.history] == [256, 512]  # 4 x 64 per batch: looks at 256, then 512
    assert count.tokens == 512 and count.load.sum() == 2 * 2 * 512  # 2 layers x top-2 x tokens
    assert count.mass.sum(1).tolist() == pytest.approx([512.0, 512.0])
    capped = count_usage(hf, text_batches(data, shipped_tokenizer, 64, 4), 256, max_tokens=256)
    assert not capped.stable and "cap" in capped.stop and capped.tokens == 256
    batches = list(text_batches(data, shipped_tokenizer, 64, 3))
    assert all(b.shape[1] == 64 for b in batches) and all(len(b) == 3 for b in batches[:-1])


def test_count_follows_the_attention_mask():
    model, _ = unreachable_model("olmoe")
    hf = wrap_model(model, None)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    count = count_usage(hf, [(ids, mask)], grow=False)
    assert isinstance(count, UsageCount) and count.tokens == 16 and int(count.load[0].sum()) == 32


# ------------------------------------------------------------------------------------- testbed-intervene


@pytest.fixture(scope="module")
def unreachable_dir(tmp_path_factory, shipped_tokenizer):
    """A tiny OLMoE with experts 1 and 6 unreachable, over the shipped tokenizer, saved with a quiz."""
    out = tmp_path_factory.mktemp("unreachable_olmoe")
    model, _ = unreachable_model("olmoe", vocab=4096)
    model.save_pretrained(out / "model")
    shipped_tokenizer.save_pretrained(out / "model")
    quiz = out / "quiz"
    quiz.mkdir()
    for subject in ("arithmetic", "trivia", "colors"):
        with open(quiz / f"{subject}_test.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(QUIZ)
    return out


def test_intervene_prune_writes_a_checkpoint_counted_on_held_out_text(unreachable_dir, synth_mix, tmp_path):
    from testbed.hf.intervene import main

    out = tmp_path / "pruned"
    model_dir, quiz = unreachable_dir / "model", unreachable_dir / "quiz"
    args = ["prune", "--hf", str(model_dir), "--quiz", str(quiz), "--text", *text_overrides(synth_mix)]
    args += ["--count-start-tokens", "256", "--count-seq-len", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    result = json.loads((out / "intervention.json").read_text())
    count = result["count"]
    assert count["stable"] and count["tokens"] == 1024  # 8 sequences of 64 a batch: looks at 512, 1024
    assert count["never_used"] == {"layer0": [1, 6], "layer1": [1, 6]}
    assert "held-out text" in count["source"]
    assert result["experts"] == {"layer0": [1, 6], "layer1": [1, 6]}
    assert result["plan"]["experts_after"] == 6
    # counted and removed at the same positions: on the counted text no removed expert was ever chosen
    check = result["routing_check"]
    assert check["removed_expert_chosen"] == {"layer0": 0.0, "layer1": 0.0}
    assert check["routing_unchanged"] == {"layer0": 1.0, "layer1": 1.0}
    checkpoint = result["checkpoint"]
    assert checkpoint["tokenizer_saved"] and "tokenizer.json" in checkpoint["files"]
    assert checkpoint["parameters_removed"] == 12416 == result["parameters"]["removed"]
    assert checkpoint["bytes_removed"] == 4 * 12416
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 6
    assert result["before"]["accuracy"] == result["after"]["accuracy"]
    assert result["after"]["loss"] == pytest.approx(result["before"]["loss"], abs=1e-5)
    low, high = result["effect"]["loss"]["ci95"]
    assert low <= result["effect"]["loss"]["estimate"] <= high
    text = (out / "intervention.md").read_text()
    assert "stable over a doubling" in text and "bytes removed" in text
    # the written folder is a model: pruning into it again is refused
    assert main([*args[:-3], "--out", str(out)]) == 2


def test_intervene_prune_without_a_quiz_and_with_answer_positions(
    unreachable_dir, synth_mix, tmp_path, capsys
):
    from testbed.hf.intervene import main

    model_dir, quiz = str(unreachable_dir / "model"), str(unreachable_dir / "quiz")
    out = tmp_path / "no_quiz"
    text = ["--text", *text_overrides(synth_mix), "--count-start-tokens", "256", "--count-seq-len", "64"]
    assert main(["prune", "--hf", model_dir, *text, "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    assert "before" not in result and (out / "model.safetensors").is_file()
    # answer positions: counted and removed there only, at run time; no checkpoint
    out = tmp_path / "answer"
    assert main(["prune", "--hf", model_dir, "--quiz", quiz, "--positions", "answer", "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    assert result["checkpoint"] is None and not (out / "model.safetensors").exists()
    assert all(len(experts) >= 2 for experts in result["experts"].values())
    assert "answer positions" in (out / "intervention.md").read_text()
    # every quiz prompt token: a checkpoint, counted without growing
    out = tmp_path / "all"
    assert main(["prune", "--hf", model_dir, "--quiz", quiz, "--positions", "all", "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    assert result["count"]["source"].startswith("every token of 15 quiz prompts")
    assert result["checkpoint"]["parameters_removed"] >= 12416
    capsys.readouterr()
    assert main(["reweight", "--hf", model_dir]) == 2
    assert "needs --quiz" in capsys.readouterr().err


def test_intervene_reweight_selects_on_one_split_and_scores_on_the_other(unreachable_dir, tmp_path):
    from testbed.analysis.quiz import load_quiz
    from testbed.hf.intervene import best_experts, main, split_items
    from testbed.hf.load import load_hf_model
    from testbed.hf.quiz import evaluate_hf_quiz

    model_dir, quiz = unreachable_dir / "model", unreachable_dir / "quiz"
    out = tmp_path / "reweight"
    args = ["reweight", "--hf", str(model_dir), "--quiz", str(quiz), "--min-items", "1", "--seed", "3"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads((out / "intervention.json").read_text())
    items = load_quiz(quiz)
    select, score = split_items(items, 0.5, 3)
    assert sorted(select + score) == list(range(len(items))) and not set(select) & set(score)
    splits = result["splits"]
    assert splits["selection"]["items"] == len(select) and splits["scoring"]["items"] == len(score)
    assert splits["selection"]["rows"] == [f"{items[i].source}:{items[i].row}" for i in select]
    assert "choosing the experts" in splits["selection"]["used_for"]
    assert result["before"]["items"] == result["after"]["items"] == len(score)
    # the experts are the best ones of the selection split alone
    hf = load_hf_model(str(model_dir))
    layers = evaluate_hf_quiz(hf, [items[i] for i in select]).per_layer()
    for name, table in zip(result["layers"], layers, strict=True):
        assert result["experts"][name] == best_experts(table["expert_accuracy"], table["expert_items"], 2, 1)
    effect = result["effect"]
    assert effect["bootstrap"] == {"resamples": 2000, "seed": 3, "paired": "items"}
    for key in ("loss", "accuracy"):
        low, high = effect[key]["ci95"]
        assert low <= effect[key]["estimate"] <= high
    assert effect["loss"]["estimate"] == pytest.approx(result["after"]["loss"] - result["before"]["loss"])
    out2 = tmp_path / "again"
    assert main([*args, "--out", str(out2)]) == 0
    assert json.loads((out2 / "intervention.json").read_text())["effect"] == effect  # seeded
    assert "to select the experts" in (out / "intervention.md").read_text()


def test_bootstrap_interval_and_split_rules():
    from testbed.hf.intervene import bootstrap_effect, split_items

    before, after = np.zeros(50), np.r_[np.ones(25), np.zeros(25)]
    result = bootstrap_effect(before, after, 4000, 0)
    assert result["estimate"] == 0.5 and 0.35 < result["ci95"][0] < 0.5 < result["ci95"][1] < 0.65
    assert bootstrap_effect(before, after, 4000, 0) == result
    assert bootstrap_effect(before, before, 100, 0) == {"estimate": 0.0, "ci95": [0.0, 0.0]}

    class Item:
        def __init__(self, subject):
            self.subject = subject

    items = [Item("a")] * 5 + [Item("b")] * 4 + [Item("c")]
    select, score = split_items(items, 0.5, 0)
    assert len(select) == 2 + 2 and len(score) == 3 + 2 + 1  # round(2.5) = 2; a lone item is scored


def test_best_experts_rule():
    from testbed.hf.intervene import best_experts

    accuracy = [0.5, 0.9, float("nan"), 0.9, 1.0, 0.2]
    items = [10, 4, 0, 8, 2, 10]
    assert best_experts(accuracy, items, top=2, min_items=3) == [1, 3]  # 1.0 has too few items; 0.9 tie
    assert best_experts(accuracy, items, top=1, min_items=5) == [3]


def test_saved_in_the_checkpoints_dtype_with_fp32_modules_kept(tmp_path):
    """A bf16 checkpoint analysed in fp32 is saved in bf16 again; what the family keeps in fp32 (DeepSeek-V3:
    the router weight and its correction bias) stays fp32."""
    from safetensors import safe_open

    model, unreachable = unreachable_model("deepseek_v3")
    hf = wrap_model(model, None)
    hf.stored_dtype = torch.bfloat16
    plan = PrunePlan(["layer0", "layer1"], [unreachable, unreachable], 8, "test")
    result = prune_model(hf, plan)
    saved = save_pruned(hf, tmp_path / "bf16", result)
    assert saved["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as fh:
        dtypes = {key: fh.get_slice(key).get_dtype() for key in fh.keys()}
    assert dtypes["model.layers.0.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.0.mlp.gate.weight"] == "F32"
    assert dtypes["model.layers.0.mlp.experts.0.down_proj.weight"] == "BF16"
    assert "model.layers.0.mlp.experts.6.down_proj.weight" not in dtypes  # 8 - 2 experts: ids 0 .. 5
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in dtypes
    fp32 = sum(n for name, n in result.removed_tensors if "mlp.gate." in name)
    assert saved["bytes_removed"] == 2 * sum(n for _, n in result.removed_tensors) + 2 * fp32
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.config.n_routed_experts == 6
