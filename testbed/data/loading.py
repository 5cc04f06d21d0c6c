"""Read one domain's documents: local jsonl/json/text/parquet files, or a hub dataset (`datasets`).

Local files load through `datasets` when it is installed, and otherwise with a plain reader
(`read_local_documents`: gzip/json/text, pyarrow for parquet) that yields the same documents, so a machine
without `datasets` (a bare GPU image) trains on the shipped mix.

Every problem (missing or empty file, bad encoding, missing text field) is a DataError naming the
file and what is allowed, raised before training starts.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

from testbed import PROJECT_ROOT
from testbed.data.schema import DomainSourceConfig
from testbed.errors import DataError

SHIPPED_MIX = PROJECT_ROOT / "data" / "mix"
SHIPPED_TOKENIZER = PROJECT_ROOT / "data" / "tokenizer.json"
LANGUAGES_MIX = PROJECT_ROOT / "data" / "languages"
FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}
BUILD_COMMANDS: dict[Path, str] = {
    SHIPPED_MIX: "make data-sources && make data",
    SHIPPED_TOKENIZER: "make data-sources && make data",
    LANGUAGES_MIX: "make data-languages",
}
"""Data folders and files of this checkout, and the command that builds each (for error messages)."""


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as given when it exists or is absolute; otherwise relative to the checkout, so that
    configs naming ``data/...`` work from any working directory."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        return PROJECT_ROOT / path
    return path


def build_command(path: str | Path) -> str | None:
    """The command that builds ``path`` when it is, or lies in, one of :data:`BUILD_COMMANDS`."""
    resolved = resolve_data_path(path).absolute()
    for target, command in BUILD_COMMANDS.items():
        if resolved == target or target in resolved.parents:
            return command
    return None


def missing_folder_error(root: Path, key: str = "data.root") -> DataError:
    """``key`` names a folder (or a file in a folder) that does not exist: say how to build it."""
    command = build_command(root)
    how = (
        f"run `{command}` to build it (see data/SOURCES.md)"
        if command
        else f"build a mix there with `testbed-data --out {root} --tokenizer {root / 'tokenizer.json'}` "
        "or set data.root to an existing folder"
    )
    return DataError(f"{key}: folder {root} does not exist; {how}")


def infer_format(path: Path) -> str:
    if path.is_dir():
        return "text"
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    if suffixes and suffixes[-1] in FORMATS:
        return FORMATS[suffixes[-1]]
    raise DataError(
        f"data file {path}: cannot tell its format from the name; set data.sources.<domain>.format "
        f"to one of ['json', 'text', 'parquet'] (known extensions: {sorted(FORMATS)})"
    )


TEXT_SUFFIXES = [s for s, fmt in FORMATS.items() if fmt == "text"]
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _files(path: Path, fmt: str = "text") -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data directory {path} holds no files; expected text files, one document each")
        allowed = TEXT_SUFFIXES if fmt == "text" else [s for s, f in FORMATS.items() if f == fmt]
        for file in files:
            suffixes = [s for s in file.suffixes if s not in COMPRESSIONS]
            if not suffixes or suffixes[-1] not in allowed:
                raise DataError(
                    f"data directory {path}: file {file.name} is not a {fmt} file; a directory read as "
                    f"'{fmt}' holds files ending in {allowed} (optionally compressed: {list(COMPRESSIONS)}). "
                    f"Other formats: one file per domain, one of {sorted(FORMATS)}"
                )
        return files
    return [path]


def check_json_rows(path: Path, text_field: str) -> None:
    """Every row of a json/jsonl file parses and has a string `text_field` (or lacks it entirely, which
    the missing-field error reports): a malformed row or a number, null or list as text names the row."""
    with _open_text(path) as fh:
        text = fh.read()
    if text.lstrip().startswith("["):  # one JSON document holding a list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from err
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows], start=1))
        where = "element"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                if number == 1 and len(text.splitlines()) > 1 and text.lstrip().startswith("{"):
                    try:  # one pretty-printed JSON object spread over several lines
                        numbered = [(1, json.loads(text))]
                        break
                    except json.JSONDecodeError:
                        pass
                raise DataError(
                    f"data file {path}: row {number} (line {number}) is not valid JSON ({err.msg} at column "
                    f"{err.colno}); every line of a .jsonl file must be one JSON object"
                ) from err
        where = "row"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"data file {path}: {where} {number} is {type(row).__name__}, not a JSON object")
        if text_field in row and not isinstance(row[text_field], str):
            value = row[text_field]
            kind = "null" if value is None else type(value).__name__
            raise DataError(
                f"data file {path}: {where} {number} has {text_field!r} = {json.dumps(value)[:60]} ({kind}); "
                "allowed: a string (fix or remove the row)"
            )


def check_utf8(path: Path) -> None:
    """Decode the whole file (compression-aware) so a bad byte is reported with its file and offset."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise DataError(f"data file {path}: cannot be read ({err})") from err
    if not data.strip():
        raise DataError(f"data file {path} is empty; each domain needs at least 2 documents")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data file {path} is not valid UTF-8 (byte {err.start}: {err.reason}); re-encode it as UTF-8"
        ) from err


def datasets_available() -> bool:
    """Whether Hugging Face `datasets` can be imported (it is optional for local files)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _open_text(path: Path):
    """Open a possibly compressed file as UTF-8 text (the compressions `datasets` reads by extension)."""
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    return openers.get(path.suffix, open)(path, "rt", encoding="utf-8")


def _json_records(path: Path) -> list[dict]:
    """JSON Lines (one object per line) or one JSON document (a list of objects, or one object)."""
    with _open_text(path) as fh:
        text = fh.read()
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        records = [json.loads(line) for line in lines]
        if all(isinstance(r, dict) for r in records):
            return records
    except json.JSONDecodeError:
        pass
    whole = json.loads(text)  # a malformed file raises here, with the position
    return [r for r in whole if isinstance(r, dict)] if isinstance(whole, list) else [whole]


def read_local_documents(fmt: str, files: list[Path]) -> tuple[list[dict], list[str]]:
    """Rows and column names of local files without `datasets`: json/jsonl records, one document per text
    file (`sample_by: document`), or parquet through pyarrow."""
    rows: list[dict] = []
    for file in files:
        if fmt == "json":
            rows.extend(_json_records(file))
        elif fmt == "text":
            with _open_text(file) as fh:
                rows.append({"text": fh.read()})
        else:
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(file).to_pylist())
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return rows, columns


def describe_source(domain: str, source: DomainSourceConfig | None, root: str | None) -> dict:
    """Where a domain's documents come from, as `load_documents` reads them: a hub dataset (name, config,
    split) or a local path (resolved) with its format; and the text field."""
    source = source or DomainSourceConfig()
    if source.hf_dataset:
        where = {
            "hf_dataset": source.hf_dataset,
            "hf_config": source.hf_config,
            "hf_split": source.hf_split,
            "hf_revision": source.hf_revision,
        }
    else:
        path = domain_path(domain, source, root)
        where = {"path": str(path), "format": source.format or infer_format(path)}
    return {**where, "text_field": source.text_field}


MIX_SUFFIXES = (".jsonl.gz", ".jsonl.xz")
"""A mix folder holds <domain>.jsonl.gz (the shipped sample) or <domain>.jsonl.xz (the large mix)."""


def domain_path(domain: str, source: DomainSourceConfig, root: str | None) -> Path:
    """The local file (or folder) a domain's documents are read from: data.sources.<domain>.path, else the
    mix folder's <domain>.jsonl.gz or <domain>.jsonl.xz."""
    if source.path:
        return resolve_data_path(source.path)
    folder = resolve_data_path(root or SHIPPED_MIX)
    candidates = [folder / f"{domain}{suffix}" for suffix in MIX_SUFFIXES]
    return next((path for path in candidates if path.exists()), candidates[0])


class Documents(list):
    """A domain's documents (a list of str) and, when read with a group field, each one's group: documents
    of one group (a chapter in two translations, a play in two editions) are held out together."""

    groups: list[str] | None = None


def check_cache_dir(cache_dir: str) -> None:
    """The datasets cache must be a folder this process can write (made if missing): otherwise its failure
    would surface as a parse error of the first data file."""
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(
            f"data.cache_dir {cache_dir}: cannot write there ({err.strerror or err}); "
            "set data.cache_dir to a writable folder"
        ) from err


def load_documents(
    domain: str,
    source: DomainSourceConfig | None,
    root: str | None,
    cache_dir: str | None = None,
    group_field: str | None = None,
) -> Documents:
    """All non-empty documents of one domain, in file order; with `group_field`, also each document's value
    of that field (`.groups`; a row without it is its own group)."""
    source = source or DomainSourceConfig()
    groups = None
    if cache_dir is not None:
        check_cache_dir(cache_dir)
    if source.hf_dataset:
        try:
            import datasets
        except ImportError as err:
            raise DataError(
                f"domain '{domain}': hub dataset {source.hf_dataset!r} needs Hugging Face `datasets` "
                "(pip install datasets), or a local file instead: data.sources.<domain>.path"
            ) from err
        datasets.disable_progress_bars()
        try:
            dataset = datasets.load_dataset(
                source.hf_dataset,
                source.hf_config,
                split=source.hf_split,
                revision=source.hf_revision,
                cache_dir=cache_dir,
            )
        except Exception as err:  # hub errors vary; name the source and what to check
            raise DataError(
                f"domain '{domain}': cannot load hub dataset {source.hf_dataset!r} "
                f"(config {source.hf_config!r}, split {source.hf_split!r}): {err}. Offline machines "
                "need a local file instead: data.sources.<domain>.path"
            ) from err
        origin = f"hub dataset {source.hf_dataset}"
        columns = dataset.column_names
        texts = dataset[source.text_field] if source.text_field in columns else []
        if group_field:
            groups = dataset[group_field] if group_field in columns else [None] * len(texts)
    else:
        path = domain_path(domain, source, root)
        if not source.path and not path.parent.is_dir():
            raise missing_folder_error(path.parent)
        if not path.exists():
            available = sorted(
                {p.name.split(".")[0] for suffix in MIX_SUFFIXES for p in path.parent.glob(f"*{suffix}")}
            )
            command = build_command(path.parent)
            hint = (
                f"domains available in {path.parent}: {available}; for another domain set "
                f"data.sources.{domain}.path or build it with `testbed-data --out {path.parent}`"
                + (f" (`{command}` builds this folder's mix)" if command else "")
                if not source.path
                else "check data.sources.<domain>.path"
            )
            raise DataError(f"domain '{domain}': data file {path} does not exist; {hint}")
        fmt = source.format or infer_format(path)
        if fmt not in ("json", "text", "parquet"):
            raise DataError(
                f"domain '{domain}': format {fmt!r} for {path}; allowed: ['json', 'text', 'parquet']"
            )
        files = _files(path, fmt)
        if fmt != "parquet":
            for file in files:
                check_utf8(file)
        if fmt == "json":
            for file in files:
                check_json_rows(file, source.text_field)
        try:
            if datasets_available():
                import datasets

                datasets.disable_progress_bars()
                kwargs = {"sample_by": "document"} if fmt == "text" else {}
                dataset = datasets.load_dataset(
                    fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir, **kwargs
                )
                columns = dataset.column_names
                texts = dataset[source.text_field] if source.text_field in columns else []
                if group_field:
                    groups = dataset[group_field] if group_field in columns else [None] * len(texts)
            else:
                rows, columns = read_local_documents(fmt, files)
                texts = [row.get(source.text_field) for row in rows]
                if group_field:
                    groups = [row.get(group_field) for row in rows]
        except Exception as err:
            raise DataError(f"domain '{domain}': cannot parse {path} as {fmt}: {err}") from err
        origin = f"data file {path}"
    if source.text_field not in columns:
        raise DataError(
            f"domain '{domain}': {origin} has no field {source.text_field!r}; "
            f"its fields are {columns} (set data.sources.{domain}.text_field)"
        )
    bad = next(((i, t) for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:  # parquet or hub rows (json rows are checked per file above)
        raise DataError(
            f"domain '{domain}': {origin}, row {bad[0] + 1}: {source.text_field!r} is {bad[1]!r}; "
            "allowed: a string"
        )
    kept = [i for i, t in enumerate(texts) if t.strip()]
    documents = Documents(texts[i] for i in kept)
    if groups is not None:
        documents.groups = [f"#{i}" if groups[i] is None else str(groups[i]) for i in kept]
    if len(documents) < 2 and not source.hf_dataset and fmt == "text" and not path.is_dir():
        raise DataError(
            f"domain '{domain}': {origin} is a single text file, read as one document; a domain needs at "
            "least 2 (one is held out for validation): give a directory of .txt files (one document each) "
            "or a .jsonl file with one document per row"
        )
    if len(documents) < 2:
        raise DataError(
            f"domain '{domain}': {origin} holds {len(documents)} non-empty documents; "
            "at least 2 are needed (one is held out for validation)"
        )
    return documents
