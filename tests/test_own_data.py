"""Own data: `testbed-data tokenizer` trains a tokenizer on a run's domains; the data module warns when its
tokenizer packs a domain badly, reports how often each domain is repeated, and summary.json records the
sources."""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import shlex
import statistics

import pytest

from testbed.config import DataConfig, DomainSourceConfig
from testbed.data.build import main as data_main
from testbed.data.datamodule import PACKING_RATIO, DomainMixDataModule, badly_packed, repetition_epochs
from testbed.data.loading import SHIPPED_MIX
from testbed.data.tokenizer import END_OF_TEXT_ID, load_tokenizer
from testbed.train.cli import run_training
from tests.conftest import SYNTH_DOMAINS, compose, synth_overrides

DATAMODULE_LOG = "testbed.data.datamodule"


def write_rare_unicode_domain(path, documents: int = 12) -> None:
    """Words of Linear B syllables (U+10000..U+1007F, 4 UTF-8 bytes each): a tokenizer trained on Latin
    letters has no merge for any of their bytes, so every byte is one token: exactly 1 byte per token."""
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(documents):
            words = ("".join(chr(rng.randint(0x10000, 0x1007F)) for _ in range(3)) for _ in range(120))
            fh.write(json.dumps({"text": " ".join(words)}) + "\n")


def synth_config(root, **changes) -> DataConfig:
    fields = dict(
        root=str(root),
        tokenizer=str(root / "tokenizer.json"),
        domains=list(SYNTH_DOMAINS),
        seq_len=32,
        batch_size=8,
        val_tokens_per_domain=512,
    )
    return DataConfig(**{**fields, **changes})


def packing_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == DATAMODULE_LOG and r.levelno == logging.WARNING
    ]


def test_badly_packed_against_the_median():
    # median of (3.0, 2.9, 3.1, 1.9) is 2.95; 0.65 x 2.95 = 1.9175: only 1.9 is below
    assert badly_packed({"a": 3.0, "b": 2.9, "c": 3.1, "d": 1.9}) == ["d"]
    assert badly_packed({"a": 3.0, "b": 2.9, "c": 3.1, "d": 1.95}) == []
    assert badly_packed({"only": 0.5}) == []  # nothing to compare with


def test_repetition_epochs_by_hand():
    # 12 steps x 8 sequences = 96 drawn; weights 2:1:1 give 48, 24, 24 over 10, 10 and 4 sequences
    assert repetition_epochs([10, 10, 4], [2.0, 1.0, 1.0], 96) == pytest.approx([4.8, 2.4, 6.0])
    assert repetition_epochs([32, 16], None, 64) == pytest.approx([1.0, 2.0])  # null weights: balanced


def test_packing_warning_names_the_badly_packed_domain(synth_mix, tmp_path, caplog):
    write_rare_unicode_domain(tmp_path / "linear_b.jsonl")
    config = synth_config(
        synth_mix,
        domains=[*SYNTH_DOMAINS, "linear_b"],
        sources={"linear_b": DomainSourceConfig(path=str(tmp_path / "linear_b.jsonl"))},
    )
    with caplog.at_level(logging.INFO, logger=DATAMODULE_LOG):
        datamodule = DomainMixDataModule(config)
        datamodule.setup("fit")
    figures = {d["domain"]: d["bytes_per_token"] for d in datamodule.describe()}
    assert figures["linear_b"] == 1.0  # every byte one token (see write_rare_unicode_domain)
    assert all(figures[d] > 1.3 for d in SYNTH_DOMAINS)  # the synthetic words are merged
    (message,) = packing_warnings(caplog)
    assert "packs linear_b at fewer bytes per token" in message
    assert "linear_b 1.00" in message and f"alpha {figures['alpha']:.2f}" in message
    assert f"median over domains ({statistics.median(figures.values()):.2f})" in message

    # the command in the warning trains a tokenizer on exactly these domains, and it packs linear_b better
    command = re.search(r"`(testbed-data tokenizer [^`]+)`", message).group(1)
    argv = shlex.split(command)[1:]
    out = tmp_path / "own" / "tokenizer.json"
    argv[argv.index("--out") + 1] = str(out)
    assert f"++data.sources.linear_b.path={tmp_path / 'linear_b.jsonl'}" in argv
    assert data_main([*argv, "--vocab-size", "400"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=DATAMODULE_LOG):
        retrained = DomainMixDataModule(
            DataConfig(**{**vars(config), "tokenizer": str(out)})
        )  # the same domains with their own tokenizer
        retrained.setup("fit")
    assert {d["domain"]: d["bytes_per_token"] for d in retrained.describe()}["linear_b"] > 1.0
    assert packing_warnings(caplog) == []


def test_no_packing_warning_without_a_badly_packed_domain(synth_mix, caplog):
    with caplog.at_level(logging.INFO, logger=DATAMODULE_LOG):
        DomainMixDataModule(synth_config(synth_mix)).setup("fit")
    assert packing_warnings(caplog) == []


def test_shipped_mix_is_packed_evenly_and_its_sources_are_described(caplog):
    with caplog.at_level(logging.INFO, logger=DATAMODULE_LOG):
        datamodule = DomainMixDataModule(DataConfig())
        datamodule.setup("fit")
    assert packing_warnings(caplog) == []
    described = datamodule.describe()
    figures = [d["bytes_per_token"] for d in described]
    assert min(figures) >= PACKING_RATIO * statistics.median(figures)
    assert [d["source"] for d in described] == [
        {"path": str(SHIPPED_MIX / f"{domain}.jsonl.gz"), "format": "json", "text_field": "text"}
        for domain in DataConfig().domains
    ]


def test_tokenizer_command_output_loads_and_encodes(synth_mix, tmp_path, capsys):
    out = tmp_path / "tok" / "tokenizer.json"
    argv = ["tokenizer", f"data.root={synth_mix}", "data.domains=[alpha,beta]", "--out", str(out)]
    assert data_main([*argv, "--vocab-size", "300"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^alpha\s+22\s", printed, re.M) and re.search(r"^beta\s+22\s", printed, re.M)
    assert "gamma" not in printed  # only the run's domains (22 training documents each: 24 minus 2 held out)
    tokenizer = load_tokenizer(out)
    assert tokenizer.get_vocab_size() == 300 and tokenizer.token_to_id("<|endoftext|>") == END_OF_TEXT_ID
    with gzip.open(synth_mix / "alpha.jsonl.gz", "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"]
    ids = tokenizer.encode(text).ids
    # round trip; 43 merges (300 - 256 bytes - EOS) already pack the 2-6 letter words below 1 token per byte
    assert tokenizer.decode(ids) == text and len(ids) < 0.75 * len(text.encode())
    assert data_main(["tokenizer", "data.domains=[nope]", "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.slow
def test_summary_records_sources_and_repetition(synth_mix, tmp_path, caplog):
    copy = tmp_path / "gamma_elsewhere.jsonl.gz"
    copy.write_bytes((synth_mix / "gamma.jsonl.gz").read_bytes())
    overrides = synth_overrides(
        synth_mix,
        "data.weights=[2,1,1]",
        "data.max_train_tokens_per_domain=320",  # 320 // seq_len 32 = 10 training sequences per domain
        f"+data.sources.gamma.path={copy}",
    )
    with caplog.at_level(logging.INFO, logger=DATAMODULE_LOG):
        summary = run_training(compose(overrides), tmp_path / "run", quiet=True)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["data"] == summary["data"]
    data = {d["domain"]: d for d in on_disk["data"]}
    assert data["alpha"]["source"] == {
        "path": str(synth_mix / "alpha.jsonl.gz"),
        "format": "json",
        "text_field": "text",
    }
    assert data["gamma"]["source"]["path"] == str(copy)
    assert on_disk["tokenizer"] == str(synth_mix / "tokenizer.json")
    # 12 steps x 8 sequences = 96 drawn, weights 2:1:1 -> 48, 24, 24 sequences over 10 each
    assert all(d["train_sequences"] == 10 for d in data.values())
    assert {k: d["epochs_at_max_steps"] for k, d in data.items()} == {"alpha": 4.8, "beta": 2.4, "gamma": 2.4}
    assert on_disk["tokens_seen"] == 96 * 32
    reports = [r.getMessage() for r in caplog.records if "epochs over each domain" in r.getMessage()]
    assert reports == [
        "epochs over each domain's training tokens in 12 steps: alpha 4.80, beta 2.40, gamma 2.40"
    ]
