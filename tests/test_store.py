"""Token store and clean splits: windows equal the packed encoding, one build under concurrency, corrupt
stores and manifest mismatches reported by name, paragraph deduplication across splits, and the hub path
(a domain-labelled corpus streamed through `datasets`) on local Parquet and JSONL shards."""

import gzip
import json
import logging
import multiprocessing
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from testbed.config import ConfigError, DataConfig, HubCorpusConfig, validate_hub
from testbed.data import build, distinguish
from testbed.data.datamodule import DomainMixDataModule, pack, split_documents
from testbed.data.prepare import mix_splits, open_mix_store
from testbed.data.splits import ParagraphDedup, hash_label, permutation_labels, split_mix
from testbed.data.store import TokenStore
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import DataError
from tests.conftest import SYNTH_DOMAINS

LETTERS = {"alpha": set("abcdef"), "beta": set("ghijkl"), "gamma": set("mnopqr")}


def synth_config(synth_mix, tmp_path, **kw) -> DataConfig:
    return DataConfig(
        domains=list(SYNTH_DOMAINS),
        root=str(synth_mix),
        tokenizer=str(synth_mix / "tokenizer.json"),
        seq_len=32,
        val_tokens_per_domain=0,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_permutation_keeps_validation_when_a_test_split_is_added():
    without = permutation_labels(50, 0.1, 0.0, seed=7)
    with_test = permutation_labels(50, 0.1, 0.1, seed=7)
    assert without.count("val") == with_test.count("val") == 5 and with_test.count("test") == 5
    assert [i for i, s in enumerate(without) if s == "val"] == [
        i for i, s in enumerate(with_test) if s == "val"
    ]
    docs = [f"d{i}" for i in range(50)]
    train, val = split_documents(docs, 0.1, seed=7)
    assert val == [d for d, s in zip(docs, without, strict=True) if s == "val"] and len(train) == 45
    # every side keeps a document even when the fractions round to nothing or to everything
    assert sorted(permutation_labels(3, 0.01, 0.01, seed=0)) == ["test", "train", "val"]


def test_groups_stay_in_one_split():
    """Two editions of 30 chapters: a chapter's two documents always share a split, and the shares match
    the fractions; unique groups give exactly the ungrouped permutation."""
    groups = [f"chapter {i % 30}" for i in range(60)]
    labels = permutation_labels(60, 0.1, 0.1, seed=1, groups=groups)
    by_group = {}
    for group, label in zip(groups, labels, strict=True):
        by_group.setdefault(group, set()).add(label)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert labels.count("val") == 6 and labels.count("test") == 6
    unique = [f"g{i}" for i in range(50)]
    assert permutation_labels(50, 0.1, 0.1, 7, unique) == permutation_labels(50, 0.1, 0.1, 7)


def test_hash_split_depends_on_the_text_only():
    labels = [hash_label(f"document {i}", 0.2, 0.1, seed=3) for i in range(4000)]
    assert abs(labels.count("val") / 4000 - 0.2) < 0.03 and abs(labels.count("test") / 4000 - 0.1) < 0.03
    assert hash_label("document 5", 0.2, 0.1, seed=3) == labels[5]
    assert [hash_label(f"document {i}", 0.2, 0.1, seed=4) for i in range(4000)] != labels


def test_paragraph_dedup_counts_by_hand():
    shared = "This paragraph is long enough to count as shared text."
    dedup = ParagraphDedup()
    assert dedup.filter(f"intro of the first training document\n\n{shared}", "train", "a").endswith(shared)
    assert dedup.filter(f"{shared}\n\nanother training paragraph, long enough", "train", "a").startswith(
        shared
    )
    # validation: the shared paragraph goes, the short one stays (below MIN_PARAGRAPH_BYTES)
    assert dedup.filter(f"Amen.\n\n{shared}\n\nits own validation paragraph here", "val", "b") == (
        "Amen.\n\nits own validation paragraph here"
    )
    assert dedup.filter(shared, "test", "b") == ""  # nothing left: the document is dropped
    counts = dedup.counts
    assert counts["a"].repeated_within["train"] == 1
    assert counts["b"].removed_paragraphs == {"train": 0, "val": 1, "test": 1}
    assert counts["b"].removed_bytes["val"] == len(shared)
    assert counts["b"].removed_documents == {"train": 0, "val": 0, "test": 1}


def test_split_mix_leaves_no_paragraph_shared_across_splits():
    verse = "For God so loved the world, that he gave his only begotten Son."
    documents = {"x": [f"chapter {i} opening words, quite a few of them\n\n{verse}" for i in range(20)]}
    parts = split_mix(documents, 0.2, 0.2, {"x": 0}, dedup=True)["x"]
    assert sum(verse in t for t in parts.train) == 12 and not any(verse in t for t in parts.val + parts.test)
    assert parts.dedup["removed_paragraphs"] == {"train": 0, "val": 4, "test": 4}
    plain = split_mix(documents, 0.2, 0.2, {"x": 0}, dedup=False)["x"]
    assert all(verse in t for t in plain.val) and plain.dedup is None


def test_store_windows_are_the_packed_encoding(synth_mix, tmp_path):
    """Training windows read from the store equal the old in-memory packing of the same documents, test
    documents are disjoint from training, and the unigram target counts equal a bincount."""
    config = synth_config(synth_mix, tmp_path, test_fraction=0.1)
    dm = DomainMixDataModule(config)
    dm.setup()
    tokenizer = load_tokenizer(config.tokenizer)
    splits = mix_splits(config)
    for index, domain in enumerate(SYNTH_DOMAINS):
        ids = {
            s: [e.ids for e in tokenizer.encode_batch(splits[domain].of(s))] for s in ("train", "val", "test")
        }
        part = dm.splits[index]
        assert torch.equal(part.train.tensor(), pack(ids["train"], 32))
        assert torch.equal(part.val.tensor(), pack(ids["val"], 32))
        assert torch.equal(part.test.tensor(), pack(ids["test"], 32))
        assert part.train_documents == 20 and part.val_documents == 2 and part.test_documents == 2
        assert not set(splits[domain].train) & set(splits[domain].test + splits[domain].val)
        rows = np.array([3, 0, len(part.train) - 1])
        assert torch.equal(part.train.read(rows), part.train.tensor()[rows])
        targets = part.val.tensor()[:, 1:].reshape(-1)
        assert np.array_equal(part.val.target_counts(400), np.bincount(targets.numpy(), minlength=400))
    assert len(dm.test_set) == sum(len(p.test) for p in dm.splits)
    described = dm.describe()[0]
    assert described["test_documents"] == 2 and described["token_store"].startswith(str(tmp_path / "cache"))


def _open_in_child(config, barrier, results):
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("testbed.data.store").addHandler(handler)
    logging.getLogger("testbed.data.store").setLevel(logging.INFO)
    barrier.wait()  # all processes ask for the same store at once
    store = open_mix_store(config, load_tokenizer(config.tokenizer))
    results.put((str(store.path), [m for m in records if m.startswith("building")]))


def test_store_is_built_once_by_concurrent_processes(synth_mix, tmp_path):
    config = synth_config(synth_mix, tmp_path)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    children = [context.Process(target=_open_in_child, args=(config, barrier, results)) for _ in range(3)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len({path for path, _ in outcomes}) == 1
    assert sum(len(built) for _, built in outcomes) == 1  # one process built it, two read it
    stores = tmp_path / "cache" / "stores"
    assert sorted(p.suffix for p in stores.iterdir()) == ["", ".lock"]  # no temporary folder left


def test_corrupt_or_truncated_store_is_named(synth_mix, tmp_path):
    config = synth_config(synth_mix, tmp_path)
    store = open_mix_store(config, load_tokenizer(config.tokenizer))
    file = store.path / "beta.train.bin"
    data = bytearray(file.read_bytes())
    data[10] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=r"beta\.train\.bin \(beta, train\): sha256 differs.*delete the store"
    ):
        DomainMixDataModule(config).setup()
    file.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=rf"{file.name} \(beta, train\) holds {len(data) - 2} bytes"):
        TokenStore.open(store.path, verify=False)
    (store.path / "meta.json").write_text("{")
    with pytest.raises(DataError, match="meta.json cannot be read"):
        TokenStore.open(store.path)


def test_manifest_mismatch_is_refused_before_building(synth_mix, tmp_path):
    mix = tmp_path / "mix"
    shutil.copytree(synth_mix, mix)
    config = synth_config(mix, tmp_path)
    manifest = {"domains": {d: {"file": f"{d}.jsonl.gz", "sha256": "0" * 64} for d in SYNTH_DOMAINS}}
    (mix / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"alpha\.jsonl\.gz: sha256 [0-9a-f]{16}\.\.\. differs from .*manifest"
    ):
        DomainMixDataModule(config).setup()
    assert not (tmp_path / "cache" / "stores").exists()  # nothing was built


def test_too_little_text_for_the_test_split(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    with gzip.open(folder / "solo.jsonl.gz", "wt") as handle:
        for i in range(2):
            handle.write(json.dumps({"text": f"document {i} " * 200}) + "\n")
    config = DataConfig(
        domains=["solo"], root=str(folder), test_fraction=0.2, seq_len=32, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(
        DataError, match=r"domain 'solo' .*too little text .* in its test split \(train: 1 doc"
    ):
        DomainMixDataModule(config).setup()


def _corpus_rows(rows_per_domain=40):
    rng = np.random.default_rng(0)
    labels = {"alpha": "Wiki", "beta": "Books", "gamma": "Code"}
    rows = []
    for i in range(rows_per_domain):
        for domain, letters in LETTERS.items():
            words = ["".join(rng.choice(sorted(letters), size=rng.integers(2, 6))) for _ in range(120)]
            rows.append({"text": " ".join(words), "meta": {"pile_set_name": labels[domain]}, "id": i})
    rows.append({"text": "an unlabelled domain we do not train on", "meta": {"pile_set_name": "Other"}})
    return rows


def hub_data(synth_mix, tmp_path, builder, files, **hub) -> DataConfig:
    """The synthetic domains supplied by a labelled corpus in local shards (data.hub), validated."""
    data = DataConfig(
        domains=list(SYNTH_DOMAINS),
        tokenizer=str(synth_mix / "tokenizer.json"),
        seq_len=32,
        val_fraction=0.2,
        test_fraction=0.2,
        val_tokens_per_domain=0,
        cache_dir=str(tmp_path / "cache"),
    )
    labels = hub.pop("labels", {"alpha": "Wiki", "beta": ["Books", "Books3"], "gamma": "Code"})
    data.hub = HubCorpusConfig(dataset=builder, data_files=[str(f) for f in files], labels=labels, **hub)
    validate_hub(data)
    return data


@pytest.mark.parametrize("builder", ["parquet", "json"])
def test_hub_corpus_streams_into_the_token_store(synth_mix, tmp_path, builder):
    """A Pile-style corpus (text, meta.pile_set_name) in local shards, read through `datasets` exactly as a
    hub dataset would be: every domain's windows hold only its own rows' text, split by a hash of the text."""
    rows = _corpus_rows()
    files = [tmp_path / f"shard{i}.{builder if builder == 'parquet' else 'jsonl'}" for i in range(2)]
    for file, part in zip(files, (rows[::2], rows[1::2]), strict=True):
        if builder == "parquet":
            pq.write_table(pa.Table.from_pylist(part), file)
        else:
            file.write_text("".join(json.dumps(r) + "\n" for r in part))
    data = hub_data(synth_mix, tmp_path, builder, files)
    dm = DomainMixDataModule(data)
    dm.setup()
    for index, domain in enumerate(SYNTH_DOMAINS):
        part = dm.splits[index]
        assert len(part.train) > 0 and len(part.val) > 0 and len(part.test) > 0
        for windows in (part.train, part.val, part.test):
            text = dm.tokenizer.decode(windows.tensor().reshape(-1).tolist())
            assert set(text.replace(" ", "")) <= LETTERS[domain]
        label = data.hub.labels[domain]
        mine = [
            r["text"]
            for r in rows
            if r["meta"]["pile_set_name"] in (label if isinstance(label, list) else [label])
        ]
        assert len(mine) == 40
        seed = data.split_seed * 1000 + index
        expected = {
            s: sum(hash_label(t, data.val_fraction, 0.2, seed) == s for t in mine)
            for s in ("train", "val", "test")
        }
        assert {
            "train": part.train_documents,
            "val": part.val_documents,
            "test": part.test_documents,
        } == expected
    assert dm.describe()[0]["source"]["hub"] == builder


def test_hub_corpus_without_the_label_field_names_the_fields(synth_mix, tmp_path):
    file = tmp_path / "shard.jsonl"
    file.write_text(json.dumps({"text": "abc", "meta": {"set": "Wiki"}}) + "\n")
    data = hub_data(synth_mix, tmp_path, "json", [file])
    with pytest.raises(
        DataError, match=r"row 1: no label field 'meta.pile_set_name'.*\['text', 'meta', 'meta.set'\]"
    ):
        DomainMixDataModule(data).setup()
    with pytest.raises(ConfigError, match="data.hub.labels.gamma"):
        hub_data(synth_mix, tmp_path, "json", [file], labels={"alpha": "Wiki", "beta": "Books"})


def test_naive_bayes_by_hand():
    """Two domains over tokens {EOS, 1, 2, 3}: p(v | d) = (count + 1) / (N_d + 4), EOS ignored."""
    counts = np.array([[9, 6, 1, 1], [9, 1, 1, 6]])  # EOS counts are dropped
    log_p = distinguish.fit(counts)
    np.testing.assert_allclose(np.exp(log_p[0, 1:]), [7 / 12, 2 / 12, 2 / 12])
    np.testing.assert_allclose(np.exp(log_p[1, 1:]), [2 / 12, 2 / 12, 7 / 12])
    windows = np.array([[1, 1, 2, 0], [3, 0, 0, 2], [2, 2, 1, 3], [0, 0, 0, 3]])
    # [2, 2, 1, 3]: 2 log(2/12) + log(7/12) + log(2/12) in both domains: a tie goes to the first
    assert distinguish.classify(log_p, windows).tolist() == [0, 1, 0, 1]
    matrix = distinguish.confusion(log_p, [windows[:2], windows[2:]])
    assert matrix.tolist() == [[1, 1], [1, 1]]
    assert distinguish.confusable_pairs(["a", "b"], matrix) == [
        {"pair": ["a", "b"], "a_as_b": 0.5, "b_as_a": 0.5}
    ]
    assert distinguish.confusable_pairs(["a", "b"], np.array([[99, 1], [0, 100]])) == []


def test_distinguish_command_on_the_synthetic_mix(synth_mix, tmp_path, capsys):
    out = tmp_path / "report"
    overrides = [
        f"data.root={synth_mix}",
        f"data.tokenizer={synth_mix / 'tokenizer.json'}",
        f"data.domains=[{','.join(SYNTH_DOMAINS)}]",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert build.main(["distinguish", *overrides, "--out", str(out), "--window", "16"]) == 0
    result = json.loads((out / "distinguish.json").read_text())
    assert result["accuracy"] == dict.fromkeys(SYNTH_DOMAINS, 1.0)  # disjoint alphabets
    assert result["confusable_pairs"] == [] and (out / "confusion.png").stat().st_size > 10_000
    assert "Mean accuracy 100.0%" in capsys.readouterr().out
    assert build.main(["distinguish", *overrides, "--out", str(out), "--window", "0"]) == 2


def test_pile_config_composes_and_fails_offline_with_a_clear_error(monkeypatch):
    from testbed.config import parse_config
    from testbed.data.prepare import hub_rows
    from tests.conftest import compose

    data = parse_config(compose(["data=pile"])).data
    assert data.hub.label_field == "meta.pile_set_name" and data.hub.labels["legal"] == "FreeLaw"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'monology/pile-uncopyrighted'.*local shards"):
        next(iter(hub_rows(data.hub, None)))


def test_train_cli_exits_2_on_a_corrupt_store_naming_the_file(synth_mix, tmp_path):
    """The whole path: testbed-train stops before training, exit code 2, the damaged file named."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from testbed.config import parse_config
    from tests.conftest import compose, synth_overrides

    overrides = synth_overrides(synth_mix, f"data.cache_dir={tmp_path / 'cache'}", "trainer.num_threads=1")
    data = parse_config(compose(overrides)).data
    store = open_mix_store(data, load_tokenizer(data.tokenizer))
    damaged = store.path / "gamma.val.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])
    train = Path(sys.executable).with_name("testbed-train")
    done = subprocess.run(
        [str(train), *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: token store file {damaged} (gamma, val) holds" in done.stderr
    assert "delete the store folder to rebuild it" in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
