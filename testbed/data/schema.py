"""The data section of a run (`data`): its dataclasses, their typing from a plain dict and their checks.

Defined beside the data code, so that the data package needs nothing above it; `testbed.config` places
`DataConfig` in a run's `RunConfig` (and re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from testbed.checks import integer, positive, strict_bool, structured
from testbed.errors import ConfigError

DEFAULT_MIX: tuple[str, ...] = (
    "code",
    "fiction",
    "drama",
    "formal_math",
    "biomedical",
    "legal",
    "speeches",
    "spanish",
)
"""The domains the default training mix uses (their sources: testbed/data/corpora.py)."""


class BatchComposition(StrEnum):
    mixed = "mixed"  # every micro-batch draws from all domains
    homogeneous = "homogeneous"  # every micro-batch holds sequences of one domain


@dataclass
class DomainSourceConfig:
    """Where one domain's documents come from: a local file/dir, or a Hugging Face hub dataset."""

    path: str | None = None  # jsonl / json(.gz) / txt / parquet file, or a directory of .txt files
    format: str | None = None  # json | text | parquet (inferred from the file name when null)
    text_field: str = "text"
    hf_dataset: str | None = None  # hub name, for users with internet
    hf_config: str | None = None
    hf_split: str = "train"
    hf_revision: str | None = None  # a commit or tag of the hub dataset (null: its main branch)


@dataclass
class HubCorpusConfig:
    """One dataset whose rows carry a domain label (a Pile-style corpus keyed by its subset name), streamed
    into the token store: each row's label picks its domain, a hash of its text its split."""

    dataset: str = ""  # hub name (monology/pile-uncopyrighted), or a builder (parquet, json) with data_files
    config: str | None = None
    split: str = "train"
    revision: str | None = None  # a commit or tag (null: the main branch)
    data_files: list[str] | None = None  # local or remote shards for a builder name
    text_field: str = "text"
    label_field: str = "meta.pile_set_name"  # dotted path into each row
    labels: dict[str, Any] = field(default_factory=dict)  # domain -> label value (or a list of values)
    streaming: bool = True  # false: download and prepare the whole split first (datasets' cache)
    max_rows: int = 0  # stop after reading this many rows (0: read until every domain is full or the end)


@dataclass
class DataConfig:
    name: str = "shipped"
    root: str | None = None  # directory holding <domain>.jsonl.gz; null = the shipped data/mix
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_MIX))
    weights: list[float] | None = None  # mixture weights per domain; null = balanced
    # per-domain overrides: {domain: DomainSourceConfig fields}, typed in parse_data (open in the schema, so
    # that `+data.sources.<domain>.path=...` can create an entry on the command line)
    sources: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # tokenizer.json; null = the shipped data/tokenizer.json
    seq_len: int = 128
    batch_size: int = 16
    batch_composition: BatchComposition = BatchComposition.mixed  # mixed | homogeneous
    val_fraction: float = 0.1  # documents held out per domain
    test_fraction: float = 0.0  # documents held out per domain for testing (never trained or validated on)
    split_seed: int = 0  # which documents are held out: fixed, so every training seed validates on the same
    dedup_paragraphs: bool = False  # remove paragraphs shared across splits (testbed/data/splits.py)
    group_field: str | None = None  # documents with one value of this field stay in one split (null: none)
    val_tokens_per_domain: int = 8192  # cap on validation tokens per domain (0 = all)
    max_train_tokens_per_domain: int = 0  # 0 = all
    num_workers: int = 0
    cache_dir: str | None = None  # Hugging Face datasets cache and token stores (<cache_dir>/stores); null =
    # datasets' own cache and $TESTBED_CACHE/stores or ~/.cache/moe-testbed/stores
    # a domain-labelled corpus streamed into the token store: HubCorpusConfig fields (null: per-domain files)
    hub: dict[str, Any] | None = None

    def validate(self, max_seq_len: int | None = None) -> None:
        """Raise ConfigError for values that cannot work; `max_seq_len`: the model's, which data.seq_len
        must not exceed (None: no model to fit, e.g. `testbed-data`)."""
        positive("data.seq_len", self.seq_len)
        positive("data.batch_size", self.batch_size)
        if max_seq_len is not None and self.seq_len > max_seq_len:
            raise ConfigError("data.seq_len", self.seq_len, f"at most model.max_seq_len={max_seq_len}")
        if not self.domains:
            raise ConfigError("data.domains", self.domains, "a non-empty list of domain names")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError("data.domains", self.domains, "a list without repeated names")
        if self.weights is not None and (
            len(self.weights) != len(self.domains)
            or any(w < 0 for w in self.weights)
            or sum(self.weights) <= 0
        ):
            raise ConfigError(
                "data.weights",
                self.weights,
                f"null (balanced) or {len(self.domains)} non-negative numbers, one per data.domains entry",
            )
        integer("data.val_tokens_per_domain", self.val_tokens_per_domain, 0)
        integer("data.max_train_tokens_per_domain", self.max_train_tokens_per_domain, 0)
        integer("data.split_seed", self.split_seed, 0, 2**32 - 1)
        integer("data.num_workers", self.num_workers, 0)
        if not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction", self.val_fraction, "a fraction in (0, 1)")
        if not 0 <= self.test_fraction < 1 - self.val_fraction:
            raise ConfigError(
                "data.test_fraction",
                self.test_fraction,
                f"a fraction in [0, 1 - data.val_fraction = {1 - self.val_fraction:g})",
            )
        strict_bool("data.dedup_paragraphs", self.dedup_paragraphs)
        if self.group_field is not None and (not isinstance(self.group_field, str) or not self.group_field):
            raise ConfigError(
                "data.group_field", self.group_field, "null or the name of a field of the documents"
            )
        if self.hub is not None:
            validate_hub(self)
        unknown_sources = sorted(set(self.sources) - set(self.domains))
        if unknown_sources:
            raise ConfigError(
                f"data.sources.{unknown_sources[0]}",
                unknown_sources[0],
                f"a domain listed in data.domains {self.domains}",
            )


def validate_hub(d: DataConfig) -> None:
    """A hub corpus supplies every domain: each one has a label, no label names another domain, and
    per-domain sources are not mixed in."""
    hub = d.hub
    if not hub.dataset:
        raise ConfigError(
            "data.hub.dataset", hub.dataset, "a hub dataset name, or parquet / json with data.hub.data_files"
        )
    if not hub.text_field or not hub.label_field:
        key = "data.hub.text_field" if not hub.text_field else "data.hub.label_field"
        raise ConfigError(key, "", "a field name (dotted for nested fields: meta.pile_set_name)")
    if not isinstance(hub.labels, dict) or not hub.labels:
        raise ConfigError("data.hub.labels", hub.labels, "a mapping {domain: label value or [values]}")
    missing = [domain for domain in d.domains if domain not in hub.labels]
    if missing:
        raise ConfigError(
            f"data.hub.labels.{missing[0]}",
            None,
            f"the label value(s) of every domain in data.domains {d.domains}",
        )
    extra = sorted(set(hub.labels) - set(d.domains))
    if extra:
        raise ConfigError(
            f"data.hub.labels.{extra[0]}",
            hub.labels[extra[0]],
            f"a domain listed in data.domains {d.domains}",
        )
    values = [v for label in hub.labels.values() for v in (label if isinstance(label, list) else [label])]
    if len(set(map(str, values))) != len(values):
        raise ConfigError("data.hub.labels", hub.labels, "each label value mapped to one domain only")
    if d.sources:
        raise ConfigError("data.sources", d.sources, "{} when data.hub supplies the domains")
    integer("data.hub.max_rows", hub.max_rows, 0)


def parse_data(node: Any) -> DataConfig:
    """The `data` section of a composed config as a typed `DataConfig`: its per-domain sources and its hub
    corpus typed too (open in the schema, so that the command line can add entries)."""
    data = structured("data", DataConfig, node)
    if not isinstance(data.sources, dict):
        raise ConfigError("data.sources", data.sources, "a mapping {domain: {path: ..., format: ...}}")
    for domain, source in data.sources.items():
        data.sources[domain] = structured(f"data.sources.{domain}", DomainSourceConfig, source)
    if data.hub is not None:
        data.hub = structured("data.hub", HubCorpusConfig, data.hub)
    return data
