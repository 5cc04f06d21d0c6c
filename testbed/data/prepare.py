"""From a data config to its token store (`testbed.data.store`): what the tokens depend on, the documents of
each split, and the build on first use.

Two kinds of source:
- **per-domain documents** (files under ``data.root``, ``data.sources.<domain>.path``, or a hub dataset per
  domain loaded whole): a domain's documents are read, split by a seeded permutation and, with
  ``data.dedup_paragraphs``, cleared of paragraphs shared across splits (:func:`mix_splits`);
- **a domain-labelled corpus** (``data.hub``): rows are streamed from a dataset (a hub name, or a builder
  such as ``parquet`` or ``json`` over local shards), each row's label picks its domain and a hash of its
  text its split, until every domain holds its share of tokens (``data.max_train_tokens_per_domain``,
  ``data.val_tokens_per_domain`` for validation and for test) or the rows end.

A mix folder with a ``manifest.json`` (the shipped ``data/mix``, ``data/large``) has every file's sha256
checked against it before anything is built or trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.checks import plain
from testbed.data.loading import (
    SHIPPED_TOKENIZER,
    _files,
    describe_source,
    domain_path,
    infer_format,
    load_documents,
    resolve_data_path,
)
from testbed.data.schema import DataConfig, DomainSourceConfig, HubCorpusConfig
from testbed.data.splits import SPLITS, SplitDocuments, hash_label, split_mix
from testbed.data.store import StoreEvent, TokenStore, build_store, default_store_root, file_sha256
from testbed.errors import DataError

MANIFEST = "manifest.json"


def domain_seed(config: DataConfig, index: int) -> int:
    """The permutation seed of the domain at position `index` of data.domains (depends on data.split_seed and
    the position, never on the training seed)."""
    return config.split_seed * 1000 + index


def check_manifest(path: Path, digest: str) -> None:
    """When the folder of `path` holds a manifest.json that lists the file, its sha256 must match."""
    manifest_path = path.parent / MANIFEST
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"mix manifest {manifest_path} cannot be read ({err})") from err
    entries = manifest.get("domains", {}) if isinstance(manifest, dict) else {}
    entry = next((e for e in entries.values() if isinstance(e, dict) and e.get("file") == path.name), None)
    if entry is None or "sha256" not in entry:
        return
    if entry["sha256"] != digest:
        raise DataError(
            f"data file {path}: sha256 {digest[:16]}... differs from {manifest_path} "
            f"({entry['sha256'][:16]}...): "
            "the file was changed or damaged; restore it (git checkout -- <file>) or rebuild the mix "
            "(data/SOURCES.md, Rebuilding)"
        )


def source_fingerprint(domain: str, source: DomainSourceConfig | None, root: str | None) -> dict:
    """What a domain's documents depend on: for local files, every file's name, size and sha256 (checked
    against the folder's manifest.json); for a hub dataset, its name, config, split and revision."""
    source = source or DomainSourceConfig()
    where = describe_source(domain, source, root)
    if source.hf_dataset:
        return where
    path = domain_path(domain, source, root)
    if not path.exists():
        load_documents(domain, source, root)  # raises the DataError that names the missing file
    files = []
    for file in _files(path, source.format or infer_format(path)):
        digest = file_sha256(file)
        check_manifest(file, digest)
        files.append({"name": file.name, "bytes": file.stat().st_size, "sha256": digest})
    return {**where, "files": files}


def tokenizer_path(config: DataConfig) -> Path:
    return resolve_data_path(config.tokenizer or SHIPPED_TOKENIZER)


def store_description(config: DataConfig) -> dict:
    """Everything a mix's tokens depend on (the store's key): sources, tokenizer file, split settings."""
    common = {
        "tokenizer_sha256": file_sha256(tokenizer_path(config)),
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
        "split_seed": config.split_seed,
        "dedup_paragraphs": config.dedup_paragraphs,
        "group_field": config.group_field,
    }
    if config.hub is not None:
        hub = plain(config.hub)
        for position, name in enumerate(hub.get("data_files") or []):
            local = Path(name)
            if local.is_file():
                hub["data_files"][position] = {"name": name, "sha256": file_sha256(local)}
        return {
            **common,
            "hub": hub,
            "domains": list(config.domains),
            "limits": hub_limits(config),
        }
    domains = [
        {
            "name": domain,
            "seed": domain_seed(config, index),
            **source_fingerprint(domain, config.sources.get(domain), config.root),
        }
        for index, domain in enumerate(config.domains)
    ]
    return {**common, "domains": domains}


def mix_splits(config: DataConfig) -> dict[str, SplitDocuments]:
    """Each domain's training, validation and test documents (per-domain sources only): what the token store
    holds, as text (`testbed-quiz build`, the pretrained-model analysis, tokenizer training)."""
    if config.hub is not None:
        raise DataError(
            f"data.hub ({config.hub.dataset}): a streamed corpus is only held as tokens in the token store; "
            "this command needs per-domain document files (data.root or data.sources)"
        )
    documents = {
        domain: load_documents(
            domain, config.sources.get(domain), config.root, config.cache_dir, config.group_field
        )
        for domain in config.domains
    }
    seeds = {domain: domain_seed(config, index) for index, domain in enumerate(config.domains)}
    return split_mix(documents, config.val_fraction, config.test_fraction, seeds, config.dedup_paragraphs)


@dataclass
class StoreInput:
    """The documents for the store builder, with their total size (progress) and any dedup counts."""

    events: Iterator[StoreEvent]
    total_bytes: int | None
    dedup_counts: dict[str, dict] | None


def documents_input(config: DataConfig) -> StoreInput:
    splits = mix_splits(config)

    def events() -> Iterator[StoreEvent]:
        for split in SPLITS:  # training first: the order deduplication followed
            for domain in config.domains:
                for text in splits[domain].of(split):
                    yield StoreEvent(domain, split, text)

    total = sum(len(t.encode("utf-8")) for parts in splits.values() for s in SPLITS for t in parts.of(s))
    counts = {d: parts.dedup for d, parts in splits.items()} if config.dedup_paragraphs else None
    return StoreInput(events(), total, counts)


def hub_limits(config: DataConfig) -> dict[str, int]:
    """Tokens per domain to take from a streamed corpus, per split (no entry: until the rows end)."""
    limits = {}
    if config.max_train_tokens_per_domain > 0:
        limits["train"] = config.max_train_tokens_per_domain + 1
    if config.val_tokens_per_domain > 0:
        held_out = math.ceil(config.val_tokens_per_domain / config.seq_len) * config.seq_len + 1
        limits["val"] = held_out
        if config.test_fraction > 0:
            limits["test"] = held_out
    return limits


def field_value(row: dict, dotted: str):
    """`row["a"]["b"]` for the field path "a.b"; KeyError when any part is missing."""
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def hub_rows(hub: HubCorpusConfig, cache_dir: str | None):
    """The rows of the corpus, streamed (or loaded whole with hub.streaming false) through `datasets`."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"data.hub: dataset {hub.dataset!r} needs Hugging Face `datasets` (pip install datasets)"
        ) from err
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            hub.dataset,
            hub.config,
            split=hub.split,
            revision=hub.revision,
            data_files=hub.data_files,
            streaming=hub.streaming,
            cache_dir=cache_dir,
        )
    except Exception as err:  # hub and builder errors vary; name the source and what to check
        raise DataError(
            f"data.hub: cannot load dataset {hub.dataset!r} (config {hub.config!r}, split {hub.split!r}, "
            f"data_files {hub.data_files!r}): {err}. Offline machines need local shards: "
            "data.hub.dataset=parquet "
            "(or json) with data.hub.data_files"
        ) from err


def hub_events(config: DataConfig) -> Iterator[StoreEvent]:
    """Documents of a labelled corpus as they stream: each row's label (data.hub.label_field) picks its domain
    (rows with other labels are skipped), a keyed hash of its text its split."""
    hub = config.hub
    to_domain = {}
    for domain, label in hub.labels.items():
        for value in label if isinstance(label, list) else [label]:
            to_domain[str(value)] = domain
    index = {domain: position for position, domain in enumerate(config.domains)}
    origin = f"data.hub dataset {hub.dataset!r}" + (f" ({hub.data_files})" if hub.data_files else "")
    for number, row in enumerate(hub_rows(hub, config.cache_dir), start=1):
        if hub.max_rows and number > hub.max_rows:
            return
        try:
            label = field_value(row, hub.label_field)
        except KeyError as err:
            raise DataError(
                f"{origin}, row {number}: no label field {hub.label_field!r} (missing part {err.args[0]!r}); "
                f"the row's fields are {_field_paths(row)}; set data.hub.label_field"
            ) from None
        text = row.get(hub.text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            what = (
                "no field"
                if not isinstance(row, dict) or hub.text_field not in row
                else f"{type(text).__name__} in"
            )
            raise DataError(
                f"{origin}, row {number}: {what} {hub.text_field!r} (a string is expected); "
                "the row's fields are "
                f"{_field_paths(row)}; set data.hub.text_field"
            )
        domain = to_domain.get(str(label))
        if domain is None or not text.strip():
            continue
        split = hash_label(
            text, config.val_fraction, config.test_fraction, domain_seed(config, index[domain])
        )
        yield StoreEvent(domain, split, text)


def _field_paths(row, prefix: str = "") -> list[str]:
    if not isinstance(row, dict):
        return []
    paths = []
    for key, value in row.items():
        paths.append(prefix + key)
        if isinstance(value, dict):
            paths.extend(_field_paths(value, f"{prefix}{key}."))
    return paths


def open_mix_store(config: DataConfig, tokenizer) -> TokenStore:
    """The token store of `config` (built on first use, under data.cache_dir or the user cache), checked."""
    description = store_description(config)
    if config.hub is not None:

        def prepare() -> StoreInput:
            return StoreInput(hub_events(config), None, None)

        limits, dedup = hub_limits(config), config.dedup_paragraphs
    else:

        def prepare() -> StoreInput:
            return documents_input(config)

        limits, dedup = None, False  # per-domain documents are deduplicated by mix_splits
    path = build_store(
        default_store_root(config.cache_dir),
        description,
        list(config.domains),
        tokenizer,
        prepare,
        dedup=dedup,
        limits=limits,
    )
    return TokenStore.open(path)
