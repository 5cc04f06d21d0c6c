"""The shipped byte-level BPE tokenizer: size, exact round trips, deterministic training."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from testbed.data.corpora import SHIPPED_DOMAINS
from testbed.data.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, load_tokenizer, train_tokenizer
from testbed.errors import DataError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TOKENIZER = DATA_DIR / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


def first_documents(domain: str, count: int = 3) -> list[str]:
    with gzip.open(DATA_DIR / "mix" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(next(handle))["text"] for _ in range(count)]


def test_shipped_tokenizer_vocabulary(tokenizer):
    assert tokenizer.get_vocab_size() == 4096
    assert tokenizer.token_to_id(END_OF_TEXT) == END_OF_TEXT_ID == 0


@pytest.mark.parametrize("domain", SHIPPED_DOMAINS)
def test_round_trip_each_domain(tokenizer, domain):
    for text in first_documents(domain):
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # merges actually compress


def test_round_trip_unseen_scripts_and_whitespace(tokenizer):
    text = "  tabs\tand  spaces \n\n日本語 — ünïcödé 🙂 <|endoftext|>\n"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert END_OF_TEXT_ID in ids  # the special token is recognised, not split into bytes


def test_training_is_deterministic(tmp_path):
    texts = [f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(300)]
    first = train_tokenizer(texts, vocab_size=300, out_path=tmp_path / "a.json")
    train_tokenizer(texts, vocab_size=300, out_path=tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert first.get_vocab_size() == 300
    assert first.token_to_id(END_OF_TEXT) == 0
    assert first.decode(first.encode(texts[5]).ids) == texts[5]


def test_training_reads_jsonl_files(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(50):
            handle.write(json.dumps({"text": f"alpha beta gamma {i}", "domain": "d", "source": "s"}) + "\n")
    tok = train_tokenizer([path], vocab_size=270)
    assert "Ġbeta" in tok.get_vocab()


def test_too_small_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="testbed-data"):
        load_tokenizer(tmp_path / "absent.json")


def test_corrupt_tokenizer_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        load_tokenizer(path)
