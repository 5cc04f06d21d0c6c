"""Data module: loading formats (with and without `datasets`), holdout,
single-domain packing, batch composition."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from testbed.config import DataConfig, DomainSourceConfig, parse_config
from testbed.data import loading
from testbed.data.datamodule import DomainBatchSampler, DomainMixDataModule, pack, split_documents
from testbed.data.loading import load_documents
from tests.conftest import SYNTH_DOMAINS, compose, synth_overrides


def test_pack_within_one_stream():
    packed = pack([[5, 6, 7], [8, 9]], seq_len=3)
    # stream: 5 6 7 EOS 8 9 EOS -> windows of 4 with stride 3
    assert packed.tolist() == [[5, 6, 7, 0], [0, 8, 9, 0]]


def test_split_documents_holds_out_whole_documents():
    docs = [f"d{i}" for i in range(20)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=3) == (train, val)


def test_loads_jsonl_text_dir_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i}"}) for i in range(3)))
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i in range(3):
        (text_dir / f"{i}.txt").write_text(f"line one of {i}\nline two of {i}\n")
    pq.write_table(pa.table({"content": ["p0", "p1", "p2"]}), tmp_path / "c.parquet")
    assert load_documents("a", DomainSourceConfig(path=str(tmp_path / "a.jsonl")), None) == [
        "json doc 0",
        "json doc 1",
        "json doc 2",
    ]
    texts = load_documents("b", DomainSourceConfig(path=str(text_dir)), None)
    assert sorted(texts) == [f"line one of {i}\nline two of {i}\n" for i in range(3)]
    assert load_documents(
        "c", DomainSourceConfig(path=str(tmp_path / "c.parquet"), text_field="content"), None
    ) == ["p0", "p1", "p2"]


def test_hub_source_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load hub dataset 'no-such-user/no-such-set'"):
        load_documents("x", DomainSourceConfig(hf_dataset="no-such-user/no-such-set"), None)


def make_sampler(composition, weights=(1, 1, 1), batch_size=6, seed=0, batches=300):
    offsets = np.array([0, 40, 90, 130])
    return DomainBatchSampler(
        offsets, np.asarray(weights, float), batch_size, composition, seed, batches
    ), offsets


def domain_of(index, offsets):
    return int(np.searchsorted(offsets, index, side="right") - 1)


def test_homogeneous_batches_hold_one_domain_and_rotate():
    sampler, offsets = make_sampler("homogeneous")
    batches = list(sampler)
    domains = [{domain_of(i, offsets) for i in batch} for batch in batches]
    assert all(len(d) == 1 for d in domains)
    firsts = [d.pop() for d in domains]
    for start in range(0, 30, 3):  # consecutive micro-batches (one accumulation group) see different domains
        assert sorted(firsts[start : start + 3]) == [0, 1, 2]


def test_mixed_batches_follow_weights():
    sampler, offsets = make_sampler("mixed", weights=(2, 1, 1))
    counts = np.zeros(3)
    mixed_batches = 0
    for batch in sampler:
        doms = [domain_of(i, offsets) for i in batch]
        counts += np.bincount(doms, minlength=3)
        mixed_batches += len(set(doms)) > 1
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.25, 0.25], atol=0.03)
    assert mixed_batches > 250


def test_sampler_is_deterministic_and_covers_each_domain_without_repeats():
    a, _ = make_sampler("mixed", seed=1)
    b, _ = make_sampler("mixed", seed=1)
    assert list(a) == list(b)
    sampler, offsets = make_sampler("homogeneous", batch_size=10, batches=4)
    seen = [i for batch in sampler for i in batch]
    first_domain = [i for i in seen[:10]]
    assert len(set(first_domain)) == 10  # no repeats within a pass over a domain


def test_datamodule_sequences_are_single_domain(synth_mix):
    run = parse_config(compose(synth_overrides(synth_mix)))
    dm = DomainMixDataModule(run.data, seed=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) == batch["domain_ids"].shape
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    assert torch.all(batch["domain_ids"] == batch["domain_ids"][:, :1])
    # synthetic domains use disjoint alphabets: each sequence decodes to its own domain's letters only
    letters = {0: set("abcdef"), 1: set("ghijkl"), 2: set("mnopqr")}
    for row, domain in zip(batch["input_ids"], batch["domain_ids"][:, 0].tolist(), strict=True):
        text = dm.tokenizer.decode(row.tolist())
        assert set(text.replace(" ", "")) <= letters[domain]
    val_batches = [b["domain_ids"][:, 0] for b in dm.val_dataloader()]
    assert set(torch.cat(val_batches).tolist()) == {0, 1, 2}
    assert val_batches[0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]  # interleaved: every batch mixes domains
    assert [d["domain"] for d in dm.describe()] == SYNTH_DOMAINS


def test_shipped_mix_loads():
    dm = DomainMixDataModule(DataConfig(val_tokens_per_domain=1024, max_train_tokens_per_domain=4096))
    dm.setup()
    assert dm.vocab_size() == 4096
    assert [d["domain"] for d in dm.describe()] == DataConfig().domains
    assert all(d["val_documents"] >= 1 and d["train_tokens"] > 0 for d in dm.describe())


def test_training_seeds_share_one_validation_set(synth_mix):
    """Which documents are held out depends on data.split_seed only, so losses compare across seeds."""
    modules = []
    for seed in (0, 1):
        run = parse_config(compose(synth_overrides(synth_mix, f"seed={seed}")))
        dm = DomainMixDataModule(run.data, seed=run.seed)
        dm.setup()
        modules.append(dm)
    assert torch.equal(modules[0].val_set.tokens, modules[1].val_set.tokens)
    first = [next(iter(dm.train_dataloader()))["input_ids"] for dm in modules]
    assert not torch.equal(first[0], first[1])  # the training order does follow the seed
    run = parse_config(compose(synth_overrides(synth_mix, "data.split_seed=5")))
    other = DomainMixDataModule(run.data)
    other.setup()
    assert not torch.equal(other.val_set.tokens, modules[0].val_set.tokens)


def test_local_files_load_without_datasets_to_the_same_token_ids(tmp_path, monkeypatch):
    """With `datasets` not installed (a bare GPU image), the shipped jsonl.gz mix, json, jsonl and text
    folders load through the plain reader: the same documents, hence the same token ids and batches."""
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}", "n": i}) for i in range(3)))
    (tmp_path / "b.json").write_text(json.dumps([{"text": "one"}, {"text": " "}, {"text": "two"}]))
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i in range(3):
        (text_dir / f"{i}.txt").write_text(f"line one of {i}\n\nline two\n")
    sources = {
        "a": DomainSourceConfig(path=str(tmp_path / "a.jsonl")),
        "b": DomainSourceConfig(path=str(tmp_path / "b.json")),
        "t": DomainSourceConfig(path=str(text_dir)),
        "x": DomainSourceConfig(path=str(tmp_path / "a.jsonl"), text_field="body"),
    }
    config = DataConfig(val_tokens_per_domain=1024, max_train_tokens_per_domain=8192)
    with_datasets = {name: load_documents(name, sources[name], None) for name in "abt"}
    missing_field = pytest.raises(ValueError, match=r"no field 'body'; its fields are \['text', 'n'\]")
    with missing_field:
        load_documents("x", sources["x"], None)
    reference = DomainMixDataModule(config)
    reference.setup()

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert not loading.datasets_available()
    assert {name: load_documents(name, sources[name], None) for name in "abt"} == with_datasets
    assert with_datasets["b"] == ["one", "two"]
    with missing_field:
        load_documents("x", sources["x"], None)
    with pytest.raises(ValueError, match="needs Hugging Face `datasets`"):
        load_documents("h", DomainSourceConfig(hf_dataset="some/set"), None)
    plain = DomainMixDataModule(config)
    plain.setup()
    for ours, theirs in zip(plain.splits, reference.splits, strict=True):
        assert torch.equal(ours.train.tensor(), theirs.train.tensor())
        assert torch.equal(ours.val.tensor(), theirs.val.tensor())
