"""Domain-mix data module: per-domain document holdout, packing within one domain, batch composition.

Every sequence comes from one domain, so each token carries its domain id. A micro-batch mixes domains
(`mixed`) or holds one (`homogeneous`); with `homogeneous`, consecutive micro-batches (those accumulated
into one optimizer step) come from different domains (SPEC "Balancing scope").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shlex
import statistics
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from testbed.config import DataConfig, DomainSourceConfig
from testbed.data.loading import (
    SHIPPED_MIX,
    SHIPPED_TOKENIZER,
    infer_format,
    load_documents,
    resolve_data_path,
)
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
    """Packed sequences of one domain: tokens [N, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    train_documents: int
    val_documents: int
    bytes_per_token: float = math.nan  # UTF-8 bytes of the training documents per token (EOS not counted)
    source: dict = field(default_factory=dict)  # where the documents came from (describe_source)


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
    """Hold out whole documents for validation, chosen by a seeded permutation (at least one each side)."""
    order = np.random.default_rng(seed).permutation(len(documents))
    num_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    val_idx = set(order[:num_val].tolist())
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


def holdout(documents: list[str], config: DataConfig, domain_index: int) -> tuple[list[str], list[str]]:
    """(train, validation) documents of the domain at position `domain_index` of `config.domains`: the one
    holdout every consumer (training, `testbed-quiz build`) uses. Depends on data.split_seed, val_fraction
    and the domain's position, never on `seed`."""
    return split_documents(documents, config.val_fraction, config.split_seed * 1000 + domain_index)


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


def describe_source(domain: str, source: DomainSourceConfig | None, root: str | None) -> dict:
    """Where a domain's documents come from, as `load_documents` reads them: a hub dataset (name, config,
    split) or a local path (resolved) with its format; and the text field."""
    source = source or DomainSourceConfig()
    if source.hf_dataset:
        where = {"hf_dataset": source.hf_dataset, "hf_config": source.hf_config, "hf_split": source.hf_split}
    else:
        path = resolve_data_path(source.path or Path(root or SHIPPED_MIX) / f"{domain}.jsonl.gz")
        where = {"path": str(path), "format": source.format or infer_format(path)}
    return {**where, "text_field": source.text_field}


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


class PackedSequences(Dataset):
    """All domains' sequences in one tensor; item i -> (tokens [S+1], domain id)."""

    def __init__(self, parts: list[torch.Tensor]):
        self.tokens = torch.cat(parts) if parts else torch.zeros(0, 1, dtype=torch.long)
        self.domain = torch.cat([torch.full((len(p),), d, dtype=torch.long) for d, p in enumerate(parts)])
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int):
        return self.tokens[index], self.domain[index]


def collate(items) -> dict[str, torch.Tensor]:
    tokens = torch.stack([t for t, _ in items])
    domain = torch.stack([d for _, d in items])
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
        for domain in np.unique(domains):
            batch.extend(self._take(int(domain), int((domains == domain).sum())))
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


def _read_token_cache(path: Path) -> list[list[int]]:
    with np.load(path) as cached:
        ids, lengths = cached["ids"], cached["lengths"]
    return [chunk.tolist() for chunk in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []


def encode_documents(tokenizer, documents: list[str], cache_dir: str | None) -> list[list[int]]:
    """Token ids of each document. With `data.cache_dir` set, cached in <cache_dir>/tokens/<sha256>.npz,
    keyed by the tokenizer's JSON and the exact documents (a sweep tokenizes its data once).

    Safe for concurrent runs (`testbed-experiment --jobs N`, packed GPU grids): the first process to take
    the lock file encodes and writes (to a temporary file of its own, then an atomic rename); the others
    wait on the lock and read what it wrote. Without `fcntl` (not POSIX) the rename alone keeps readers
    from ever seeing a half-written file."""
    if not cache_dir:
        return [e.ids for e in tokenizer.encode_batch(documents)]
    digest = hashlib.sha256(tokenizer.to_str().encode("utf-8"))
    for document in documents:
        digest.update(len(document).to_bytes(8, "little"))
        digest.update(document.encode("utf-8"))
    path = Path(cache_dir) / "tokens" / f"{digest.hexdigest()}.npz"
    if path.exists():
        logger.debug("token cache: read %s", path)
        return _read_token_cache(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_suffix(".lock")):
        if path.exists():  # another process wrote it while this one waited
            logger.debug("token cache: read %s", path)
            return _read_token_cache(path)
        encoded = [e.ids for e in tokenizer.encode_batch(documents)]
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp.npz")
        ids = np.fromiter((i for doc in encoded for i in doc), dtype=np.int32)
        np.savez(temporary, ids=ids, lengths=np.array([len(doc) for doc in encoded], dtype=np.int64))
        os.replace(temporary, path)  # atomic: parallel runs never read a half-written file
        logger.info("token cache: wrote %s", path)
    return encoded


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive advisory lock on `lock_path` (POSIX fcntl; a no-op where it is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        splits = []
        for index, domain in enumerate(cfg.domains):
            documents = load_documents(domain, cfg.sources.get(domain), cfg.root, cfg.cache_dir)
            train_docs, val_docs = holdout(documents, cfg, index)
            train_ids = encode_documents(self.tokenizer, train_docs, cfg.cache_dir)
            train = pack(train_ids, cfg.seq_len)
            val = pack(encode_documents(self.tokenizer, val_docs, cfg.cache_dir), cfg.seq_len)
            if cfg.max_train_tokens_per_domain > 0:
                train = train[: max(1, cfg.max_train_tokens_per_domain // cfg.seq_len)]
            if cfg.val_tokens_per_domain > 0:
                val = val[: max(1, math.ceil(cfg.val_tokens_per_domain / cfg.seq_len))]
            if len(train) == 0 or len(val) == 0:
                raise DataError(
                    f"domain '{domain}': too little text for data.seq_len={cfg.seq_len} "
                    f"({len(train)} train and {len(val)} validation sequences); add documents "
                    "or lower data.seq_len"
                )
            splits.append(
                DomainSplit(
                    domain,
                    train,
                    val,
                    len(train_docs),
                    len(val_docs),
                    bytes_per_token(train_docs, train_ids),
                    describe_source(domain, cfg.sources.get(domain), cfg.root),
                )
            )
        self.splits = splits
        self.train_set = PackedSequences([s.train for s in splits])
        self.val_set = PackedSequences([s.val for s in splits])

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
        return [
            {
                "domain": s.name,
                "train_documents": s.train_documents,
                "val_documents": s.val_documents,
                "train_sequences": int(s.train.shape[0]),
                "train_tokens": int(s.train.shape[0] * (s.train.shape[1] - 1)),
                "val_tokens": int(s.val.shape[0] * (s.val.shape[1] - 1)),
                "bytes_per_token": round(s.bytes_per_token, 4),
                "source": s.source,
            }
            for s in (self.splits or [])
        ]
