"""On-disk token store: every domain's training, validation and test tokens as flat binary files, built once
per (documents, tokenizer, split settings) and read by windows, so that training holds neither text nor token
arrays in memory.

A store is a folder ``<stores>/<key>/`` with ``meta.json`` and one file per domain and split,
``<domain>.<split>.bin``: the split's documents in order, each followed by ``<|endoftext|>`` (id 0), as
little-endian ``uint16`` (``uint32`` for vocabularies over 65,536). ``key`` is a digest of what the tokens
depend on (the source files' sha256 or the hub dataset's name, config, split and revision; the tokenizer
file's sha256; the split settings), so a changed input gets a new store and nothing built is overwritten.
``meta.json`` records, per file, its token count and sha256; opening a store checks both, so a truncated or
altered file is reported by name instead of training on it.

Windows are read with ``os.pread`` (not ``mmap``): the pages go to the operating system's cache, not to the
process, so resident memory stays flat however large the store (``benchmarks/token_store.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from testbed.data.splits import SPLITS, DedupCounts, ParagraphDedup
from testbed.errors import DataError

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
META = "meta.json"
EOS_ID = 0
CACHE_ENV = "TESTBED_CACHE"
ENCODE_BATCH_BYTES = 4_000_000  # texts tokenized per encode_batch call (the tokenizer's threads share it)


def default_store_root(cache_dir: str | None = None) -> Path:
    """Where token stores live: ``<data.cache_dir>/stores``, else ``$TESTBED_CACHE/stores``, else
    ``$XDG_CACHE_HOME/moe-testbed/stores`` (``~/.cache/moe-testbed/stores``)."""
    if cache_dir:
        return Path(cache_dir) / "stores"
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "stores"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe-testbed" / "stores"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def store_key(description: dict) -> str:
    """The folder name of the store built from `description` (everything its tokens depend on)."""
    blob = json.dumps({"format": STORE_FORMAT, **description}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading


class TokenStream:
    """One domain split's token file, read at any offset with ``os.pread``. Picklable (DataLoader workers
    reopen the file); safe after ``fork`` (the descriptor is reopened in a new process)."""

    def __init__(self, path: Path, tokens: int, dtype: np.dtype):
        self.path, self.tokens, self.dtype = Path(path), int(tokens), np.dtype(dtype)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) as an array of the store's dtype."""
        if start < 0 or count < 0 or start + count > self.tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {start + count}) outside [0, {self.tokens})")
        size = self.dtype.itemsize
        data = os.pread(self._descriptor(), count * size, start * size)
        if len(data) != count * size:
            raise DataError(f"token store file {self.path} is shorter than its meta.json says; {REBUILD}")
        return np.frombuffer(data, dtype=self.dtype)

    def chunks(self, start: int, stop: int, chunk: int = 1 << 22) -> Iterator[np.ndarray]:
        for begin in range(start, stop, chunk):
            yield self.read(begin, min(chunk, stop - begin))


REBUILD = "delete the store folder to rebuild it"


class Windows:
    """The first `count` windows of `seq_len` + 1 tokens at stride `seq_len` of a stream (inputs are
    window[:-1], targets window[1:]): what training or validation reads of one domain split."""

    def __init__(self, stream: TokenStream, seq_len: int, count: int | None = None):
        available = max(0, (len(stream) - 1) // seq_len)
        self.stream, self.seq_len = stream, seq_len
        self.count = available if count is None else min(count, available)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.seq_len + 1)

    def read(self, indices: Iterable[int]) -> torch.Tensor:
        """Windows `indices` as a [len(indices), seq_len + 1] int64 tensor."""
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"window index outside [0, {self.count}) of {self.stream.path}")
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices.tolist()):
            out[row] = self.stream.read(index * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(out)

    def tensor(self) -> torch.Tensor:
        """All windows in memory (validation sets, tests)."""
        if not self.count:
            return torch.zeros(0, self.seq_len + 1, dtype=torch.long)
        flat = torch.from_numpy(self.stream.read(0, self.count * self.seq_len + 1).astype(np.int64))
        return flat.unfold(0, self.seq_len + 1, self.seq_len)

    def target_counts(self, vocab_size: int) -> np.ndarray:
        """How often each token id is a target of these windows (stream tokens 1 .. count * seq_len)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for chunk in self.stream.chunks(1, self.count * self.seq_len + 1):
            counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
        return counts


class TokenStore:
    """An opened store: its meta.json and a :class:`TokenStream` per domain and split."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self.dtype = np.dtype(meta["dtype"])

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> TokenStore:
        """Open the store at `path`, checking every file's size (and with `verify`, its sha256) against
        meta.json; a DataError names the first file that does not match."""
        path = Path(path)
        meta_path = path / META
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(f"token store {path}: no {META} (an unfinished build?); {REBUILD}") from err
        except (OSError, ValueError) as err:
            raise DataError(f"token store {meta_path} cannot be read ({err}); {REBUILD}") from err
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataError(f"token store {meta_path}: format {found!r}, expected {STORE_FORMAT}; {REBUILD}")
        store = cls(path, meta)
        for domain, entry in meta["domains"].items():
            for split, info in entry["splits"].items():
                file = path / info["file"]
                expected = info["tokens"] * store.dtype.itemsize
                size = file.stat().st_size if file.exists() else None
                if size != expected:
                    what = "is missing" if size is None else f"holds {size} bytes, expected {expected}"
                    raise DataError(
                        f"token store file {file} ({domain}, {split}) {what} per {META}; {REBUILD}"
                    )
                if verify and file_sha256(file) != info["sha256"]:
                    raise DataError(
                        f"token store file {file} ({domain}, {split}): sha256 differs from {META} "
                        f"(the file was changed or damaged); {REBUILD}"
                    )
        return store

    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    def stream(self, domain: str, split: str) -> TokenStream:
        info = self.meta["domains"][domain]["splits"][split]
        return TokenStream(self.path / info["file"], info["tokens"], self.dtype)

    def split_info(self, domain: str, split: str) -> dict:
        return self.meta["domains"][domain]["splits"][split]


# ----------------------------------------------------------------------------------------------
# Building


class _SplitWriter:
    """Appends tokenized documents (each followed by EOS) to one split file, hashing what it writes."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = self.bytes = 0

    def write(self, token_lists: list[list[int]], texts: list[str]) -> None:
        flat: list[int] = []
        for ids in token_lists:
            flat.extend(ids)
            flat.append(EOS_ID)
        data = np.asarray(flat, dtype=self.dtype).tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += len(flat)
        self.documents += len(texts)
        self.bytes += sum(len(t.encode("utf-8")) for t in texts)

    def close(self) -> dict:
        self.handle.close()
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "sha256": self.sha256.hexdigest(),
        }


@dataclass
class StoreEvent:
    """One document for the builder: its domain, split and text (already cleaned and split-assigned)."""

    domain: str
    split: str
    text: str


StoreInputLike = Any
"""An object with `events` (StoreEvent iterable), `total_bytes` and `dedup_counts` (testbed.data.prepare)."""


class _Progress:
    """Bytes tokenized so far: a Rich bar on a terminal, a log line every 10 s elsewhere (pipes, cluster
    logs)."""

    def __init__(self, total_bytes: int | None, label: str):
        self.total, self.done, self.label = total_bytes, 0, label
        self.started = self.last_log = time.monotonic()
        self.bar: Progress | None = None
        if sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total_bytes)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes)
        elif time.monotonic() - self.last_log > 10:
            self.last_log = time.monotonic()
            share = f" of {self.total / 1e6:.1f} MB" if self.total else ""
            logger.info("%s: %.1f MB%s tokenized", self.label, self.done / 1e6, share)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.stop()
        return time.monotonic() - self.started


def build_store(
    root: Path,
    description: dict,
    domains: list[str],
    tokenizer,
    prepare: Callable[[], StoreInputLike],
    *,
    dedup: bool,
    limits: dict[str, int] | None = None,
) -> Path:
    """Build (or find) the store for `description` under `root` and return its folder.

    `prepare()` is called only when the store must be built; it returns the documents in processing order
    (`events`: for deduplication, training first), their total bytes (for progress, or None) and the dedup
    counts of a caller that removed shared paragraphs itself (or None). With `dedup`, paragraphs shared
    across splits are removed here instead, in arrival order (streams). `limits` caps the tokens written per
    split name (streams stop once every domain holds its share). The store is written to a temporary folder
    and renamed into place when complete, under a lock: concurrent runs build it once, and nobody ever reads
    a half-written store."""
    key = store_key(description)
    path = root / key
    if (path / META).exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / f"{key}.lock"):
        if (path / META).exists():
            return path
        if path.exists():
            raise DataError(f"token store {path} exists but holds no {META}; {REBUILD}")
        logger.info("building the token store %s (once per mix, tokenizer and split settings)", path)
        prepared = prepare()
        temporary = root / f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            meta = _write_store(
                temporary,
                description,
                prepared.events,
                domains,
                tokenizer,
                dedup,
                prepared.total_bytes,
                limits,
            )
            if prepared.dedup_counts is not None:
                for domain, counts in prepared.dedup_counts.items():
                    meta["domains"][domain]["dedup"] = counts
            (temporary / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
    return path


def _write_store(folder, description, events, domains, tokenizer, dedup, total_bytes, limits) -> dict:
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    writers = {
        (domain, split): _SplitWriter(folder / f"{domain}.{split}.bin", dtype)
        for domain in domains
        for split in SPLITS
    }
    pending: dict[tuple[str, str], list[str]] = {key: [] for key in writers}
    pending_bytes: dict[tuple[str, str], int] = dict.fromkeys(writers, 0)
    remover = ParagraphDedup() if dedup else None
    progress = _Progress(total_bytes, "tokenizing into the token store")
    limits = limits or {}

    def flush(key: tuple[str, str]) -> None:
        texts = pending[key]
        if texts:
            writers[key].write([e.ids for e in tokenizer.encode_batch(texts)], texts)
            progress.update(pending_bytes[key])
        pending[key], pending_bytes[key] = [], 0

    def full(key: tuple[str, str]) -> bool:
        limit = limits.get(key[1])
        return limit is not None and writers[key].tokens >= limit

    try:
        for event in events:
            key = (event.domain, event.split)
            if key not in writers:
                raise DataError(f"token store: document for unknown domain {event.domain!r}")
            if full(key):
                if limits and all(full(k) for k in writers):
                    break
                continue
            text = remover.filter(event.text, event.split, event.domain) if remover else event.text
            if not text:
                continue
            pending[key].append(text)
            pending_bytes[key] += len(text.encode("utf-8"))
            limit = limits.get(event.split)
            remaining = None if limit is None else limit - writers[key].tokens
            # a token holds at least one byte: once the pending bytes reach what is left to the limit, write
            if pending_bytes[key] >= ENCODE_BATCH_BYTES or (
                remaining is not None and pending_bytes[key] >= remaining
            ):
                flush(key)
        for key in writers:
            flush(key)
    finally:
        infos = {key: writer.close() for key, writer in writers.items()}
        seconds = progress.close()
    total_tokens = sum(info["tokens"] for info in infos.values())
    logger.info("token store: %d tokens in %.1f s (%s)", total_tokens, seconds, folder.name)
    counts = remover.counts if remover else {}
    return {
        "format": STORE_FORMAT,
        "dtype": dtype.str,
        "vocab_size": vocab_size,
        "eos_id": EOS_ID,
        "description": description,
        "build_seconds": round(seconds, 2),
        "domains": {
            domain: {
                "splits": {split: infos[(domain, split)] for split in SPLITS},
                "dedup": counts.get(domain, DedupCounts()).as_dict() if dedup else None,
            }
            for domain in domains
        },
    }


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
