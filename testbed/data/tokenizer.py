"""Byte-level BPE tokenizer: training on the domain mix and loading the shipped one.

Byte-level means every UTF-8 string encodes and decodes back exactly, whatever its domain or
script, with no unknown token. ``<|endoftext|>`` (id 0) separates documents when packing.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from testbed.data.loading import build_command, missing_folder_error, resolve_data_path
from testbed.errors import DataError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 0
MIN_VOCAB = 2  # the end-of-text token and at least one token of text


def _texts(files_or_texts: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Path objects are files (``*.jsonl``/``*.jsonl.gz``: their "text" fields; else the whole
    file); plain strings are texts."""
    for item in files_or_texts:
        if not isinstance(item, os.PathLike):
            yield item
            continue
        path = Path(item)
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)["text"]
        else:
            yield path.read_text(encoding="utf-8")


def build_untrained_tokenizer() -> Tokenizer:
    """An empty byte-level BPE tokenizer (no normalizer: text round-trips byte for byte)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    files_or_texts: Iterable[str | os.PathLike],
    vocab_size: int = 4096,
    out_path: str | os.PathLike | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (``<|endoftext|>`` is id 0,
    the 256 byte symbols follow, then merges) and save it to ``out_path`` if given.

    ``files_or_texts``: ``pathlib.Path`` items are read as files (JSON lines: the "text" field),
    ``str`` items are training texts. Same input in the same order gives an identical file.
    """
    minimum = 1 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum}")
    tokenizer = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(files_or_texts), trainer=trainer)
    if tokenizer.token_to_id(END_OF_TEXT) != END_OF_TEXT_ID:
        raise RuntimeError(f"{END_OF_TEXT} did not get id {END_OF_TEXT_ID}")
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(out_path), pretty=True)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by :func:`train_tokenizer`; a clear error if missing or corrupt.
    A relative path that does not exist from the working directory is taken relative to the checkout."""
    path = resolve_data_path(path)
    if not path.is_file():
        command = build_command(path)
        if command and not path.parent.is_dir():
            raise missing_folder_error(path.parent, "data.tokenizer")
        if command:
            raise DataError(
                f"tokenizer file {path} not found; run `{command}` to build it, or set data.tokenizer"
            )
        raise DataError(
            f"data.tokenizer: tokenizer file {path} not found; set data.tokenizer to an existing "
            f"tokenizer.json, or train one on your mix with `testbed-data --out <your data folder> "
            f"--tokenizer {path}` (the shipped data/tokenizer.json fits the shipped mix)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer file {path} is not a valid tokenizers JSON file: {error}") from error
    size = tokenizer.get_vocab_size()
    if size < MIN_VOCAB:
        raise DataError(
            f"tokenizer file {path} has {size} token(s): it cannot encode text (at least {MIN_VOCAB}); "
            f"train one on your mix with `testbed-data --out <your data folder> --tokenizer {path}`"
        )
    return tokenizer
