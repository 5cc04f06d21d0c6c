"""Domain-mix data module: per-domain document holdout, packing within one domain, batch composition.

Every sequence comes from one domain, so each token carries its domain id. A micro-batch mixes domains
(`mixed`) or holds one (`homogeneous`); with `homogeneous`, consecutive micro-batches (those accumulated
into one optimizer step) come from different domains (docs/data.md, "Validation holdout and batch
composition").
"""

from __future__ import annotations

import logging
import math
import shlex
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from testbed.data.loading import SHIPPED_TOKENIZER, describe_source, resolve_data_path
from testbed.data.prepare import open_mix_store
from testbed.data.schema import DataConfig, DomainSourceConfig
from testbed.data.splits import permutation_labels
from testbed.data.store import Windows
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import DataError

logger = logging.getLogger(__name__)

EOS_ID = 0  # "<|endoftext|>" separates documents inside a packed domain stream
PACKING_RATIO = 0.65
"""A domain whose bytes per token fall below this fraction of the median over domains is packed badly by the
run's tokenizer: its sequences hold much less text, and its loss is not comparable with the others'. Not
0.75: on the shipped mix with its own tokenizer, formal_math (dense symbols and labels) is at 0.71."""


@dataclass
class DomainSplit:
    """One domain's windows of seq_len + 1 tokens (inputs [:-1], targets [1:]) per split, in the store."""

    name: str
    train: Windows
    val: Windows
    train_documents: int
    val_documents: int
    bytes_per_token: float = math.nan  # UTF-8 bytes of the training documents per token (EOS not counted)
    source: dict = field(default_factory=dict)  # where the documents came from (loading.describe_source)
    test: Windows | None = None  # with data.test_fraction > 0
    test_documents: int = 0
    dedup: dict | None = None  # paragraphs removed across splits (data.dedup_paragraphs)


def pack(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """Join documents with EOS separators; cut into windows of seq_len + 1 tokens (stride seq_len)."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(EOS_ID)
    num = (len(stream) - 1) // seq_len
    if num < 1:
        return torch.zeros(0, seq_len + 1, dtype=torch.long)
    tokens = torch.tensor(stream[: num * seq_len + 1], dtype=torch.long)
    return tokens.unfold(0, seq_len + 1, seq_len)


def split_documents(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole documents for validation, chosen by a seeded permutation (at least one each side; the
    permutation of testbed.data.splits, without a test split or deduplication)."""
    labels = permutation_labels(len(documents), val_fraction, 0.0, seed)
    train = [d for d, label in zip(documents, labels, strict=True) if label == "train"]
    val = [d for d, label in zip(documents, labels, strict=True) if label == "val"]
    return train, val


def bytes_per_token(documents: list[str], token_lists: list[list[int]]) -> float:
    """UTF-8 bytes per token of `documents` under the tokenizer that gave `token_lists` (how densely it
    packs them)."""
    tokens = sum(len(ids) for ids in token_lists)
    return sum(len(d.encode("utf-8")) for d in documents) / tokens if tokens else math.nan


def badly_packed(figures: dict[str, float], ratio: float = PACKING_RATIO) -> list[str]:
    """Domains whose bytes per token are below `ratio` times the median over all domains."""
    if len(figures) < 2:
        return []
    median = statistics.median(figures.values())
    return [domain for domain, value in figures.items() if value < ratio * median]


def repetition_epochs(
    train_sequences: Sequence[int], weights: Sequence[float] | None, sequences_drawn: int
) -> list[float]:
    """Per domain, how many times its training sequences are seen when `sequences_drawn` sequences are drawn
    in all (max_steps x accumulate_grad_batches x ranks x batch_size): each domain gets its weight's share of
    the draws (the expected count for mixed batches; homogeneous batches follow the weights in rounds)."""
    shares = np.asarray(weights if weights is not None else [1.0] * len(train_sequences), dtype=np.float64)
    shares = shares / shares.sum()
    pairs = zip(shares, train_sequences, strict=True)
    return [float(sequences_drawn * share / count) for share, count in pairs]


def tokenizer_command(config: DataConfig, out: str) -> str:
    """The `testbed-data tokenizer` command that trains a tokenizer on this data config's domains."""
    overrides = [f"data.domains=[{','.join(config.domains)}]"]
    if config.root:
        overrides.append(f"data.root={config.root}")
    defaults = DomainSourceConfig()
    for domain, source in config.sources.items():
        for key, value in vars(source).items():
            if value != getattr(defaults, key):
                overrides.append(f"++data.sources.{domain}.{key}={value}")
    return shlex.join(["testbed-data", "tokenizer", *overrides, "--out", out])


def interleave(offsets: np.ndarray) -> list[int]:
    """Dataset indices taking one sequence of each domain in turn (round robin) until all are used."""
    sizes = np.diff(offsets)
    return [
        int(offsets[d] + i)
        for i in range(int(sizes.max(initial=0)))
        for d in range(len(sizes))
        if i < sizes[d]
    ]


class WindowDataset(Dataset):
    """All domains' windows of one split: item i -> (tokens [S+1], domain id). A batch is read in one call
    (`__getitems__`, which the DataLoader uses when present), straight from the token store."""

    def __init__(self, parts: list[Windows]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> torch.Tensor:
        """All windows in memory, [len, seq_len + 1] (tests, small validation sets)."""
        return torch.cat([p.tensor() for p in self.parts])

    def __getitem__(self, index: int):
        tokens, domains = self.__getitems__([index])
        return tokens[0], domains[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window index outside [0, {len(self)})")
        domains = np.searchsorted(self.offsets, indices, side="right") - 1
        local = (indices - self.offsets[domains]).tolist()
        width = self.parts[0].seq_len + 1 if self.parts else 1
        tokens = np.empty((len(indices), width), dtype=np.int64)
        for row, (domain, index) in enumerate(zip(domains.tolist(), local, strict=True)):
            part = self.parts[domain]
            tokens[row] = part.stream.read(index * part.seq_len, width)
        return torch.from_numpy(tokens), torch.from_numpy(domains)


def collate(items) -> dict[str, torch.Tensor]:
    """A batch from `WindowDataset.__getitems__` ((tokens, domains)) or from items [(tokens, domain)]."""
    if isinstance(items, tuple):
        tokens, domain = items
    else:
        tokens = torch.stack([t for t, _ in items])
        domain = torch.stack([torch.as_tensor(d) for _, d in items])
    return {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "domain_ids": domain.unsqueeze(1).expand(-1, tokens.shape[1] - 1).contiguous(),
    }


class DomainBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices with the configured domain mixture and composition.

    Within each domain, sequences are drawn without replacement from a permutation that is reshuffled
    when used up. Deterministic given the seed; each new iteration (epoch) continues the random stream.

    Data parallel: every rank draws the same global stream of micro-batches and keeps those with
    index % world_size == rank, so ranks see distinct batches and N ranks see exactly the micro-batches
    one process would see with N times the gradient accumulation (with `homogeneous`, consecutive
    batches of the stream, hence the ranks' batches of one step, come from different domains).
    """

    def __init__(
        self,
        offsets: np.ndarray,
        weights: np.ndarray,
        batch_size: int,
        composition: str,
        seed: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.offsets, self.batch_size, self.composition = offsets, batch_size, composition
        self.weights = weights / weights.sum()
        self.batches_per_epoch = batches_per_epoch
        self.rng = np.random.default_rng(seed)
        self.sizes = np.diff(offsets)
        self.perms = [self.rng.permutation(n) for n in self.sizes]
        self.cursor = np.zeros(len(self.sizes), dtype=np.int64)
        self.schedule: list[int] = []
        self.start_batch = 0  # set by skip() when resuming

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _take(self, domain: int, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor[domain] >= self.sizes[domain]:
                self.perms[domain] = self.rng.permutation(self.sizes[domain])
                self.cursor[domain] = 0
            take = min(count - len(out), self.sizes[domain] - self.cursor[domain])
            chosen = self.perms[domain][self.cursor[domain] : self.cursor[domain] + take]
            out.extend((self.offsets[domain] + chosen).tolist())
            self.cursor[domain] += take
        return out

    def _next_domain(self) -> int:
        """Homogeneous batches: rounds in which each domain appears in proportion to its weight."""
        if not self.schedule:
            active = np.flatnonzero(self.weights > 0)
            if np.allclose(self.weights[active], self.weights[active][0]):
                self.schedule = self.rng.permutation(active).tolist()
            else:
                round_len = 10 * len(active)
                counts = np.floor(self.weights * round_len).astype(int)
                remainder = self.weights * round_len - counts
                counts[np.argsort(-remainder)[: round_len - counts.sum()]] += 1
                self.schedule = self.rng.permutation(np.repeat(np.arange(len(counts)), counts)).tolist()
        return self.schedule.pop(0)

    def _next_batch(self) -> list[int]:
        """The next micro-batch of the global stream (shared by all ranks)."""
        if self.composition == "homogeneous":
            return self._take(self._next_domain(), self.batch_size)
        domains = self.rng.choice(len(self.sizes), size=self.batch_size, p=self.weights)
        batch = []
        for domain, count in enumerate(np.bincount(domains, minlength=len(self.sizes)).tolist()):
            if count:
                batch.extend(self._take(domain, count))
        return batch

    def skip(self, batches: int) -> None:
        """Resume: the next iteration continues the stream after `batches` micro-batches of this rank (drawn
        again from the seed and discarded: cheap index arithmetic) and yields only the rest of that epoch,
        so every later epoch starts where it did in the uninterrupted run."""
        self.start_batch = batches

    def __iter__(self) -> Iterator[list[int]]:
        skipped, self.start_batch = self.start_batch, 0
        for _ in range(skipped * self.world_size):
            self._next_batch()
        for _ in range(self.batches_per_epoch - skipped % self.batches_per_epoch):
            # one micro-batch per rank from the global stream; this rank keeps its own
            batches = [self._next_batch() for _ in range(self.world_size)]
            yield batches[self.rank]


def data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of this process among the data-parallel ranks; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DomainMixDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig, seed: int = 0):
        super().__init__()
        self.config, self.seed = config, seed
        self.splits: list[DomainSplit] | None = None
        self.train_start_batch = 0  # resume: micro-batches (of this rank) trained before the checkpoint
        self.tokenizer = None
        self.planned_epochs: dict[str, float] | None = None  # set at setup("fit") under a Trainer

    @property
    def domains(self) -> list[str]:
        return list(self.config.domains)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self._load()
            self.warn_bad_packing()
        if stage == "fit" and self.trainer is not None and self.planned_epochs is None:
            t = self.trainer
            drawn = t.max_steps * t.accumulate_grad_batches * t.world_size * self.config.batch_size
            self.planned_epochs = dict(zip(self.domains, self.repetition(drawn), strict=True))
            self.report_repetition(t.max_steps)

    def repetition(self, sequences_drawn: int) -> list[float]:
        """Per domain: epochs over its training sequences when `sequences_drawn` sequences are drawn."""
        return repetition_epochs([len(s.train) for s in self.splits], self.config.weights, sequences_drawn)

    @rank_zero_only
    def report_repetition(self, max_steps: int) -> None:
        figures = ", ".join(f"{domain} {epochs:.2f}" for domain, epochs in self.planned_epochs.items())
        logger.info("epochs over each domain's training tokens in %d steps: %s", max_steps, figures)

    @rank_zero_only
    def warn_bad_packing(self) -> None:
        """Warn when the tokenizer packs some domain much worse than the others (bytes per token below
        PACKING_RATIO x the median), with the figures and the command that trains a tokenizer on these
        domains."""
        figures = {s.name: s.bytes_per_token for s in self.splits}
        bad = badly_packed(figures)
        if not bad:
            return
        tokenizer = resolve_data_path(self.config.tokenizer or SHIPPED_TOKENIZER)
        out = str(Path(self.config.root or ".") / "tokenizer.json")
        logger.warning(
            "the tokenizer %s packs %s at fewer bytes per token than %.2f x the median over domains "
            "(%.2f); bytes/token per domain: %s. Its sequences hold less text and its losses are not "
            "comparable. Train a tokenizer on these domains: `%s`, then data.tokenizer=%s",
            tokenizer,
            ", ".join(bad),
            PACKING_RATIO,
            statistics.median(figures.values()),
            ", ".join(f"{domain} {value:.2f}" for domain, value in figures.items()),
            tokenizer_command(self.config, out),
            out,
        )

    def _load(self) -> None:
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer or SHIPPED_TOKENIZER)
        self.store = open_mix_store(cfg, self.tokenizer)
        logger.info("reading the token store %s", self.store.path)
        held_out = train_cap = None
        if cfg.val_tokens_per_domain:
            held_out = max(1, math.ceil(cfg.val_tokens_per_domain / cfg.seq_len))
        if cfg.max_train_tokens_per_domain:
            train_cap = max(1, cfg.max_train_tokens_per_domain // cfg.seq_len)
        splits = []
        for domain in cfg.domains:
            caps = {"train": train_cap, "val": held_out, "test": held_out}
            windows = {
                split: Windows(self.store.stream(domain, split), cfg.seq_len, caps[split]) for split in caps
            }
            info = {split: self.store.split_info(domain, split) for split in windows}
            needed = ["train", "val"] + (["test"] if cfg.test_fraction > 0 else [])
            empty = [split for split in needed if len(windows[split]) == 0]
            source = (
                describe_source(domain, cfg.sources.get(domain), cfg.root)
                if cfg.hub is None
                else {"hub": cfg.hub.dataset, "label_field": cfg.hub.label_field}
            )
            if empty:
                figures = ", ".join(
                    f"{split}: {info[split]['documents']} documents, {info[split]['tokens']} tokens"
                    for split in needed
                )
                raise DataError(
                    f"domain '{domain}' ({source}): too little text for data.seq_len={cfg.seq_len} in its "
                    f"{' and '.join(empty)} split ({figures}; a split needs at least seq_len + 1 = "
                    f"{cfg.seq_len + 1} tokens); add documents, lower data.seq_len or raise the split's "
                    "fraction"
                )
            train_info = info["train"]
            text_tokens = train_info["tokens"] - train_info["documents"]  # EOS not counted
            splits.append(
                DomainSplit(
                    domain,
                    windows["train"],
                    windows["val"],
                    train_info["documents"],
                    info["val"]["documents"],
                    train_info["bytes"] / text_tokens if text_tokens > 0 else math.nan,
                    source,
                    windows["test"] if cfg.test_fraction > 0 else None,
                    info["test"]["documents"],
                    self.store.meta["domains"][domain].get("dedup"),
                )
            )
        self.splits = splits
        self.train_set = WindowDataset([s.train for s in splits])
        self.val_set = WindowDataset([s.val for s in splits])
        self.test_set = WindowDataset([s.test for s in splits]) if cfg.test_fraction > 0 else None

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def train_dataloader(self) -> DataLoader:
        weights = np.asarray(
            self.config.weights if self.config.weights is not None else [1.0] * len(self.domains),
            dtype=np.float64,
        )
        rank, world_size = data_parallel_rank()
        batches = max(1, len(self.train_set) // (self.config.batch_size * world_size))
        sampler = DomainBatchSampler(
            self.train_set.offsets,
            weights,
            self.config.batch_size,
            self.config.batch_composition,
            self.seed,
            batches,
            rank=rank,
            world_size=world_size,
        )
        sampler.skip(self.train_start_batch)  # > 0 when resuming: micro-batches this rank already trained on
        return DataLoader(
            self.train_set,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.config.num_workers,
            # its own generator: starting an epoch draws no number from torch's global RNG, so a resumed run's
            # random stream (router jitter, noise) does not depend on where the epochs of the first part fell
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        # Fixed order, the same validation tokens for every run and seed. Domains are interleaved so that
        # every batch mixes them: routers whose choice depends on the batch (expert-choice) are not scored
        # on single-domain batches, which would force each expert to take tokens from every domain.
        order = interleave(self.val_set.offsets)
        batches = [
            order[i : i + self.config.batch_size] for i in range(0, len(order), self.config.batch_size)
        ]
        return DataLoader(
            self.val_set, batch_sampler=batches, collate_fn=collate, num_workers=self.config.num_workers
        )

    def describe(self) -> list[dict]:
        """Per domain: documents, sequences and tokens of each split, bytes per token, source, paragraphs
        removed across splits (with data.dedup_paragraphs) and the token store read."""
        out = []
        for s in self.splits or []:
            entry = {
                "domain": s.name,
                "train_documents": s.train_documents,
                "val_documents": s.val_documents,
                "train_sequences": len(s.train),
                "train_tokens": len(s.train) * s.train.seq_len,
                "val_tokens": len(s.val) * s.val.seq_len,
                "bytes_per_token": round(s.bytes_per_token, 4),
                "source": s.source,
            }
            if s.test is not None:
                entry.update(test_documents=s.test_documents, test_tokens=len(s.test) * s.test.seq_len)
            if s.dedup is not None:
                entry["dedup"] = s.dedup
            entry["token_store"] = str(self.store.path)
            out.append(entry)
        return out
