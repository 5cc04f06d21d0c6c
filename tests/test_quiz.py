"""testbed-quiz (experiment X5): MMLU-format files, the quiz built from held-out documents, option scoring,
the routing analysis (dead experts, gate entropy, per-expert accuracy) and the CLI end to end."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from testbed.analysis import quiz as Q
from testbed.hf.cli import quiz_main
from testbed.routing.base import routing_from_choices
from tests.conftest import SYNTH_DOMAINS, compose, synth_overrides

BUILD = ["--items-per-domain", "8", "--prefix-tokens", "16", "--answer-tokens", "4"]


# ------------------------------------------------------------------------------------------- files


def test_csv_round_trip_keeps_commas_quotes_and_line_breaks(tmp_path):
    items = [
        Q.QuizItem(
            "tricky",
            'He said, "stop, now"\nand left,\r\nthen "quoted" again',
            (' "A", with comma', "line\nbreak", "", "plain"),
            2,
        ),
        Q.QuizItem("tricky", "What is 2+2?", ("3", "4", "5", "6"), 1),
    ]
    path = tmp_path / "tricky_test.csv"
    Q.write_quiz_csv(path, items)
    back = Q.read_quiz_csv(path)
    assert [(i.subject, i.question, i.options, i.answer) for i in back] == [
        (i.subject, i.question, i.options, i.answer) for i in items
    ]
    assert [(i.source, i.row) for i in back] == [(str(path), 1), (str(path), 2)]
    with open(path, newline="", encoding="utf-8") as fh:  # plain CSV, no header, 6 columns
        rows = list(csv.reader(fh))
    assert [len(r) for r in rows] == [6, 6] and [r[5] for r in rows] == ["C", "B"]
    assert path.read_text().splitlines()[-1] == "What is 2+2?,3,4,5,6,B"  # quoted only where needed


def test_loader_reads_the_mmlu_layout(tmp_path):
    test_dir = tmp_path / "data" / "test"
    test_dir.mkdir(parents=True)
    (test_dir / "astronomy_test.csv").write_text(
        '"Which planet is largest?",Mars,Jupiter,Venus,Earth,B\n"Sun, a star?",no,maybe,yes,"""yes""",C\n'
    )
    (test_dir / "abstract_algebra_test.csv").write_text("Order of Z_4?,1,2,3,4,D\n\n")
    (tmp_path / "data" / "dev").mkdir()
    (tmp_path / "data" / "dev" / "astronomy_dev.csv").write_text("x,1,2,3,4,A\n")
    items = Q.load_quiz(tmp_path)  # the hendrycks checkout: data/test/*_test.csv only
    assert [(i.subject, i.answer) for i in items] == [
        ("abstract_algebra", 3),
        ("astronomy", 1),
        ("astronomy", 2),
    ]
    assert items[2].question == "Sun, a star?" and items[2].options[3] == '"yes"'
    assert Q.load_quiz(test_dir) == items
    assert Q.load_quiz([test_dir / "astronomy_test.csv"]) == items[1:]
    assert Q.load_quiz(tmp_path / "data" / "dev" / "astronomy_dev.csv")[0].subject == "astronomy_dev"


@pytest.mark.parametrize(
    "content, message",
    [
        ("q,a,b,c,d,A\nq,a,b,c,B\n", "row 2 (line 2): 5 columns; MMLU format has 6"),
        ("q,a,b,c,d,A\nq,a,b,c,d,e,A\n", "row 2 (line 2): 7 columns"),
        ('"multi\nline",a,b,c,d,A\nq,a,b,c,d,E\n', "row 2 (line 3): answer 'E' is not one of A, B, C, D"),
        ("question,A,B,C,D,answer\n", "answer 'answer' is not one of A, B, C, D (a header row?"),
        ("q,a,b,c,d,\n", "row 1 (line 1): answer '' is not one of"),
        ("", "holds no items"),
    ],
)
def test_loader_errors_name_the_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad_test.csv"
    path.write_text(content)
    with pytest.raises(Q.QuizError) as err:
        Q.load_quiz(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_loader_errors_for_paths_and_encoding(tmp_path):
    with pytest.raises(Q.QuizError, match="does not exist"):
        Q.load_quiz(tmp_path / "missing_test.csv")
    with pytest.raises(Q.QuizError, match=r"holds no \*_test.csv files"):
        Q.load_quiz(tmp_path)
    latin = tmp_path / "latin_test.csv"
    latin.write_bytes("caf\xe9,a,b,c,d,A\n".encode("latin-1"))
    with pytest.raises(Q.QuizError, match="latin_test.csv is not valid UTF-8"):
        Q.load_quiz(latin)


# ------------------------------------------------------------------------------------------- build


def build(root, out, *extra):
    assert quiz_main(["build", *synth_overrides(root), "--out", str(out), *BUILD, *extra]) == 0
    return out


def test_build_is_deterministic(synth_mix, tmp_path):
    first, again = build(synth_mix, tmp_path / "a"), build(synth_mix, tmp_path / "b")
    other = build(synth_mix, tmp_path / "c", "--seed", "1")
    names = sorted(p.name for p in first.iterdir())
    assert names == ["alpha_test.csv", "beta_test.csv", "gamma_test.csv", "manifest.json", "provenance.jsonl"]
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "alpha_test.csv").read_bytes() != (other / "alpha_test.csv").read_bytes()
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["data"]["domains"] == SYNTH_DOMAINS and manifest["data"]["split_seed"] == 0
    assert {d: m["items"] for d, m in manifest["domains"].items()} == dict.fromkeys(SYNTH_DOMAINS, 8)


def test_every_true_answer_continues_a_validation_document(synth_mix, tmp_path):
    from testbed.data.datamodule import DomainMixDataModule
    from testbed.data.prepare import mix_splits

    out = build(synth_mix, tmp_path / "quiz")
    data = Q.compose_data(synth_overrides(synth_mix))
    datamodule = DomainMixDataModule(data)
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    items = Q.load_quiz(out)
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert len(items) == len(provenance) == 24
    letters = set()
    for index, domain in enumerate(SYNTH_DOMAINS):
        val_docs = mix_splits(data)[domain].val
        train = datamodule.splits[index].train.tensor()  # what training reads: the domain's training stream
        train_text = tokenizer.decode(torch.cat([train[:, :-1].reshape(-1), train[-1, -1:]]).tolist())
        val_ids = [tokenizer.encode(doc).ids for doc in val_docs]
        for item, source in zip(
            [i for i in items if i.subject == domain],
            [p for p in provenance if p["subject"] == domain],
            strict=True,
        ):
            truth = item.options[item.answer]
            letters.add(item.letter)
            assert source["answer"] == item.letter
            doc, start = source["document"], source["answer_start"]
            ids = val_ids[doc]
            assert tokenizer.decode(ids[start - 16 : start]) == item.question  # the passage prefix
            assert tokenizer.decode(ids[start : start + 4]) == truth  # ... and its real next 4 tokens
            assert item.question + truth in val_docs[doc]
            assert item.question + truth not in train_text  # never training text
            assert len(set(item.options)) == 4
            distractors = sorted(o for k, o in enumerate(item.options) if k != item.answer)
            # distractors: 4-token spans of validation documents of the same domain, outside the passage
            assert distractors == sorted(
                tokenizer.decode(val_ids[d][p : p + 4]) for d, p in source["distractors"]
            )
            for d, p in source["distractors"]:
                assert d != doc or p + 4 <= start - 16 or p >= start + 4
            assert all(o[0].isspace() for o in item.options)  # every option starts at a word boundary
    assert len(letters) > 1  # the answer letter is shuffled


# ------------------------------------------------------------------------------------------- scoring


def test_pack_items_shares_the_question():
    item = Q.EncodedItem(0, [5, 6], [[7], [8, 9], [1], [2]], [1, 2, 1, 1], 0)
    short = Q.EncodedItem(0, [3], [[4], [4], [4], [4]], [1, 1, 1, 1], 0)
    packed = Q.pack_items([item, short])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2], [3, 4, 4, 4, 4, 0, 0]]
    assert packed["segment"].tolist() == [[0, 0, 1, 2, 2, 3, 4], [0, 1, 2, 3, 4, -1, -1]]
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 2, 3, 2, 2]
    visible = packed["attention_mask"][0]
    assert visible[4].nonzero().flatten().tolist() == [0, 1, 3, 4]  # token 9: the question and option B
    assert visible[6].nonzero().flatten().tolist() == [0, 1, 6]
    assert visible[1].nonzero().flatten().tolist() == [0, 1]
    assert packed["predictors"].tolist() == [1, 1, 3, 1, 1, 0, 0, 0, 0]
    assert packed["targets"].tolist() == [7, 8, 9, 1, 2, 4, 4, 4, 4]
    assert packed["slots"].tolist() == [0, 1, 1, 2, 3, 4, 5, 6, 7]


def test_model_with_a_causal_mask_and_default_positions_is_the_plain_model():
    from testbed.config import ModelConfig, MoEConfig
    from testbed.model import MoETransformer
    from testbed.routing.topk_softmax import TopKSoftmaxConfig

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=2, moe=MoEConfig(num_experts=4, expert_hidden=16)
    )
    model = MoETransformer(config, TopKSoftmaxConfig()).eval()
    ids = torch.randint(0, 50, (3, 10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril().expand(3, 10, 10)
    positions = torch.arange(10).expand(3, 10)
    with torch.no_grad():
        plain = model(ids)[0]
        masked = model(ids, attention_mask=causal, position_ids=positions)[0]
        shifted = model(ids, attention_mask=causal, position_ids=positions + 7)[0]
        spread = model(ids, attention_mask=causal, position_ids=2 * positions)[0]
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted, plain, rtol=1e-4, atol=1e-4)  # rotary: only distances count
    assert not torch.allclose(spread, plain, atol=1e-3)  # ... and they are used


def test_scoring_sums_option_log_probs_and_picks_the_highest():
    # a bigram stub: p(next | current) from a fixed table, so every option's log-likelihood is hand-computable
    probs = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.10, 0.20, 0.30, 0.40],
            [0.70, 0.10, 0.10, 0.10],
            [0.40, 0.30, 0.20, 0.10],
        ]
    )

    def forward(ids, domains, **packing):
        return probs.log()[ids], []

    items = [
        Q.EncodedItem(0, [1], [[3], [2, 0], [0], [1, 1, 1]], [1, 2, 1, 3], 0),
        Q.EncodedItem(0, [2, 2], [[1], [2], [3], [0]], [4, 1, 1, 1], 3),
    ]
    logprob, lengths = Q.score_items(forward, items, batch_items=1)
    log = math.log
    expected = [
        [log(0.4), log(0.3) + log(0.7), log(0.1), log(0.2) + log(0.2) + log(0.2)],
        [log(0.1), log(0.1), log(0.1), log(0.7)],
    ]
    np.testing.assert_allclose(logprob, expected, rtol=1e-6)
    assert lengths.tolist() == [[1, 2, 1, 3], [1, 1, 1, 1]]
    np.testing.assert_allclose(Q.score_items(forward, items, batch_items=2)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(
        Q.score_items(forward, items[::-1], batch_items=2)[0], expected[::-1], rtol=1e-6
    )
    assert Q.choose(logprob).tolist() == [0, 3]  # sum: A (log .4) beats B (log .21); D for the second
    per_byte = logprob / np.array([[1, 2, 1, 3], [4, 1, 1, 1]])
    assert Q.choose(per_byte).tolist() == [1, 3]  # per byte B wins: log(.21)/2 > log(.4)
    assert Q.choose(np.array([[-1.0, -1.0, -2.0, -3.0]])).tolist() == [0]  # ties: the earlier letter


def test_join_separates_only_when_needed():
    assert Q.join("Capital of France?", "Paris") == " Paris"
    assert Q.join("The cat", " sat") == " sat"
    assert Q.join("Answer: ", "B") == "B"
    assert Q.join("line\n", "next") == "next"


# ------------------------------------------------------------------------------------------- routing


def routing(experts, probs):
    probs = torch.tensor(probs, dtype=torch.float32)
    chosen = torch.tensor(experts).reshape(len(experts), -1)
    return routing_from_choices(probs.log(), probs, chosen, torch.ones(chosen.shape))


def test_dead_experts_entropy_and_per_expert_accuracy_by_hand():
    uniform, onehot = [0.25] * 4, [1.0 - 3e-9, 1e-9, 1e-9, 1e-9]
    # 7 tokens, top-1: items 0, 1, 2 own the question tokens 0-1, 2-3, 4-5; token 6 is an option token of
    # item 2 and token 5 is padding (not counted: expert 3 gets no counted token)
    experts = [0, 0, 1, 1, 0, 3, 2]
    r = routing(experts, [uniform, onehot, uniform, onehot, uniform, uniform, onehot])
    counted = torch.tensor([1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    subject = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    question_item = torch.tensor([0, 0, 1, 1, 2, -1, -1])
    collected = Q.QuizRouting(1, 2, 4, 3)
    collected.add(0, r, counted, subject, question_item)
    (layer,) = Q.layer_report(collected, np.array([True, False, True]))
    assert layer["expert_load"] == [3, 2, 1, 0]
    assert layer["dead_experts"] == 0.25  # expert 3 only got the padding token
    assert layer["tokens"] == 6 and layer["assignments"] == 6
    assert layer["gate_entropy"] == pytest.approx(3 / 6, abs=1e-6)  # 3 uniform (1) and 3 one-hot (0) tokens
    assert collected.item_experts[0].tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0]]
    # items 0 and 2 (both right) go to expert 0, item 1 (wrong) to expert 1
    assert layer["expert_items"] == [2, 1, 0, 0]
    assert layer["expert_accuracy"][:2] == [1.0, 0.0] and all(
        math.isnan(a) for a in layer["expert_accuracy"][2:]
    )
    assert layer["experts_with_items"] == 2
    assert layer["expert_accuracy_spread"] == pytest.approx(0.5)  # std of (1, 0)
    assert layer["expert_accuracy_range"] == pytest.approx(1.0)
    assert collected.stats.counts[0].tolist() == [[2, 0, 0, 0], [1, 2, 1, 0]]  # subject x expert


def test_items_go_to_their_majority_expert_lowest_id_on_ties():
    item_experts = np.array([[1, 1, 0], [0, 2, 3], [0, 0, 0], [4, 0, 4]])
    correct, items = Q.expert_item_accuracy(item_experts, [True, True, True, False])
    assert items.tolist() == [2, 0, 1]  # item 2 has no assignment and is left out
    assert correct.tolist() == [1, 0, 1]


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_build_and_eval_a_trained_run(synth_mix, tmp_path, capsys):
    from testbed.analysis.analyze import load_run, resolve_checkpoint
    from testbed.train.checkpoint import load_weights
    from testbed.train.cli import run_training
    from testbed.train.module import MoELanguageModel

    run_dir = tmp_path / "run"
    run_training(
        compose(synth_overrides(synth_mix, "trainer.max_steps=8", "metrics.plots=false")), run_dir, quiet=True
    )
    quiz_dir = build(synth_mix, tmp_path / "quiz")
    assert quiz_main(["eval", str(run_dir), "--quiz", str(quiz_dir), "--batch-items", "5"]) == 0
    out = run_dir / "quiz"
    result = json.loads((out / "quiz.json").read_text())
    assert result["items"] == 24 and result["layers"] == ["layer0", "layer1"]
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["accuracy_norm"] <= 1.0
    assert {s: r["items"] for s, r in result["per_subject"].items()} == dict.fromkeys(SYNTH_DOMAINS, 8)
    assert result["holdout"] == {"checked": True, "matches": True, "problems": []}
    for name in result["layers"]:
        layer = result["per_layer"][name]
        load = np.array(layer["expert_load"])
        assert len(load) == 6
        assert layer["dead_experts"] == pytest.approx(float((load == 0).mean()))
        assert layer["tokens"] == 24 * (16 + 4 * 4)  # each question once, every option: 32 tokens per item
        assert load.sum() == 2 * layer["tokens"]  # top-2 routing
        assert sum(layer["expert_items"]) == 24
        assert layer["experts_with_items"] == sum(n > 0 for n in layer["expert_items"])
        used = [a for a in layer["expert_accuracy"] if a is not None]
        assert layer["expert_accuracy_spread"] == pytest.approx(float(np.std(used)))
        assert 0.0 < layer["gate_entropy"] <= 1.0
    markdown = (out / "quiz.md").read_text()
    assert "| layer0 |" in markdown and "| all | 24 |" in markdown

    # packed scoring (one row per item) equals scoring each question + option as its own sequence
    checkpoint = resolve_checkpoint(run_dir)
    run = load_run(checkpoint, [])
    module = MoELanguageModel(run, SYNTH_DOMAINS)
    load_weights(module, checkpoint)
    module.eval()
    tokenizer = Q.load_tokenizer_of(run)
    items = Q.load_quiz(quiz_dir)[:6]
    encoded, _ = Q.encode_items(tokenizer, items, SYNTH_DOMAINS, 1024)
    packed, _ = Q.score_items(module.model, encoded)
    with torch.no_grad():
        for i, item in enumerate(encoded):
            for k, option in enumerate(item.options):
                logits, _ = module.model(torch.tensor([item.context + option]))
                logp = torch.log_softmax(logits[0].float(), -1)
                q = len(item.context)
                separate = sum(float(logp[q - 1 + j, t]) for j, t in enumerate(option))
                assert packed[i, k] == pytest.approx(separate, abs=1e-4)
    assert result["accuracy"] == pytest.approx(
        np.mean([r["accuracy"] for r in result["per_subject"].values()])
    )

    # --positions answer: one counted token per item (its last question token), given to its top-1 expert
    assert (
        quiz_main(
            [
                "eval",
                str(run_dir),
                "--quiz",
                str(quiz_dir),
                "--positions",
                "answer",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    answer = json.loads((tmp_path / "a" / "quiz.json").read_text())
    assert answer["positions"] == "answer" and answer["accuracy"] == result["accuracy"]
    all_items = Q.load_quiz(quiz_dir)
    encoded_all, _ = Q.encode_items(tokenizer, all_items, SYNTH_DOMAINS, 1024)
    expected_top1 = {name: np.zeros(6, dtype=int) for name in answer["layers"]}
    with torch.no_grad():
        for item in encoded_all:
            _, outs = module.model(torch.tensor([item.context]))
            for name, out in zip(answer["layers"], outs, strict=True):
                expected_top1[name][int(out.routing.probs[len(item.context) - 1].argmax())] += 1
    for name in answer["layers"]:
        layer = answer["per_layer"][name]
        assert layer["tokens"] == 24 and sum(layer["expert_load"]) == 2 * 24  # one token per item, top-2
        assert layer["expert_items"] == expected_top1[name].tolist()

    # a quiz held out with another split seed may hold training text: eval says so
    other = build(synth_mix, tmp_path / "other", "data.split_seed=1")
    capsys.readouterr()
    assert quiz_main(["eval", str(run_dir), "--quiz", str(other), "--out", str(tmp_path / "o")]) == 0
    assert "quiz holdout differs" in capsys.readouterr().err
    checked = json.loads((tmp_path / "o" / "quiz.json").read_text())["holdout"]
    assert checked["matches"] is False and any("split_seed" in p for p in checked["problems"])
    assert quiz_main(["eval", str(tmp_path / "nothing"), "--quiz", str(quiz_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
