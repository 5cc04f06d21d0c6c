"""``testbed-data``: build a domain mix (gzip JSON lines per domain) and its tokenizer.

    testbed-data --out data/mix --tokenizer data/tokenizer.json      # the shipped sample
    testbed-data --out /tmp/big --bytes-per-domain 30000000          # a larger mix
    testbed-data --list                                              # domains and availability
    testbed-data tokenizer data.domains=[a,b] +data.sources.a.path=a.jsonl ... --out my/tokenizer.json
                                                                     # a tokenizer for a run's own domains
    testbed-data distinguish data=large --out data/large/distinguish  # how separable the domains are
    testbed-data large                                               # the large mix, data/large

Each domain's documents are taken whole, in source order, spread over the whole source (not just
its beginning), until about ``--bytes-per-domain`` UTF-8 bytes. The same sources give
byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from testbed import CONF_DIR
from testbed.checks import refuse_non_finite
from testbed.data import distinguish
from testbed.data.corpora import SHIPPED_DOMAINS, SOURCES, SourceMissingError, iter_domain_documents
from testbed.data.datamodule import badly_packed, bytes_per_token
from testbed.data.large import LARGE_BYTES_PER_DOMAIN, LARGE_MIX, large_domain_documents
from testbed.data.loading import SHIPPED_TOKENIZER
from testbed.data.prepare import mix_splits, open_mix_store
from testbed.data.schema import DataConfig, parse_data
from testbed.data.tokenizer import load_tokenizer, train_tokenizer
from testbed.errors import ConfigError, DataError, TestbedError
from testbed.plots import confusion_figure

MANIFEST = "manifest.json"


def spread_order(count: int) -> list[int]:
    """Indices ``0..count-1`` in bit-reversed (van der Corput) order: every prefix of the order
    is spread evenly over the whole range, so taking a prefix samples the whole source."""
    bits = max(1, (count - 1).bit_length())
    return sorted(range(count), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def select_documents(documents: Sequence[str], bytes_budget: int) -> list[str]:
    """Whole documents totalling about ``bytes_budget`` UTF-8 bytes (the last one may overshoot
    by at most one document), spread over ``documents`` and returned in their original order."""
    sizes = [len(document.encode("utf-8")) for document in documents]
    if sum(sizes) <= bytes_budget:
        return list(documents)
    chosen, total = [], 0
    for index in spread_order(len(documents)):
        if total >= bytes_budget:
            break
        chosen.append(index)
        total += sizes[index]
    return [documents[index] for index in sorted(chosen)]


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Write JSON lines with gzip and a fixed header (no name, no timestamp): reproducible bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    temporary.replace(path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_domain(domain: str, out_dir: Path, bytes_per_domain: int) -> dict:
    """Extract, sample and write one domain; returns its manifest entry."""
    source = SOURCES[domain]
    documents = list(iter_domain_documents(domain))
    selected = select_documents(documents, bytes_per_domain)
    path = out_dir / f"{domain}.jsonl.gz"
    write_jsonl_gz(path, [{"text": text, "domain": domain, "source": source.source_id} for text in selected])
    return {
        "file": path.name,
        "documents": len(selected),
        "bytes": sum(len(text.encode("utf-8")) for text in selected),
        "sha256": sha256_of(path),
        "source_documents": len(documents),
        "source_bytes": sum(len(text.encode("utf-8")) for text in documents),
        "source_id": source.source_id,
        "source_version": source.version(),
        "origin": source.origin,
        "licence": source.licence,
        "document_unit": source.document_unit,
    }


def balanced_texts(per_domain: dict[str, list[str]]) -> list[str]:
    """Each domain's documents capped at the smallest domain's byte count (whole documents, spread
    over the domain, in order), so no domain dominates the BPE merges."""
    budget = min(sum(len(t.encode("utf-8")) for t in texts) for texts in per_domain.values())
    texts: list[str] = []
    for documents in per_domain.values():
        texts.extend(select_documents(documents, budget))
    return texts


def balanced_training_texts(out_dir: Path, domains: Sequence[str]) -> list[str]:
    """The written documents of ``domains``, balanced by :func:`balanced_texts`."""
    per_domain: dict[str, list[str]] = {}
    for domain in domains:
        with gzip.open(out_dir / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as handle:
            per_domain[domain] = [json.loads(line)["text"] for line in handle if line.strip()]
    return balanced_texts(per_domain)


@dataclass
class DataOnly:
    """What `testbed-data` composes: a run's data section alone, typed as in a run (testbed.config's
    `run_schema` holds every section; this module sits below it)."""

    data: DataConfig = field(default_factory=DataConfig)


DATA_SCHEMA = "data_schema"
ConfigStore.instance().store(name=DATA_SCHEMA, node=DataOnly)


def default_data_option(conf_dir: str = CONF_DIR) -> str:
    """The data option a run uses unless told otherwise: the `data:` entry of conf/config.yaml's defaults."""
    config = OmegaConf.to_container(OmegaConf.load(Path(conf_dir) / "config.yaml"))
    for entry in config.get("defaults", []):
        if isinstance(entry, dict) and "data" in entry:
            return str(entry["data"])
    raise DataError(f"{Path(conf_dir) / 'config.yaml'} selects no data option (a `- data: <name>` default)")


def data_config(overrides: Sequence[str]) -> DataConfig:
    """The data config a `testbed-train` run with these data overrides would use (data=<option>,
    data.<key>=..., +data.sources.<domain>.<key>=...): the data group composed on its own, then typed and
    validated as a run's data section (the model's bound on data.seq_len aside: no model here)."""
    option, rest = default_data_option(), []
    for override in overrides:
        key, _, value = override.partition("=")
        name = key.lstrip("+~")
        if name == "data":
            option = value
        elif name.startswith("data."):
            rest.append(override)
        else:
            raise ConfigError(name, value, "a data override (data=<option> or data.<key>=<value>)")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(DATA_SCHEMA, overrides=[f"+data={option}", *rest])
    raw = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["data"]
    refuse_non_finite(raw, "data")
    config = parse_data(raw)
    config.validate()
    return config


def training_documents(config: DataConfig) -> dict[str, list[str]]:
    """Each domain's training documents: what a run with `config` trains on (its validation documents are
    held out here too, so that the tokenizer never sees them)."""
    return {domain: parts.train for domain, parts in mix_splits(config).items()}


def packing(tokenizer, per_domain: dict[str, list[str]]) -> dict[str, float]:
    """Bytes per token of each domain's documents under `tokenizer`."""
    return {
        domain: bytes_per_token(documents, [e.ids for e in tokenizer.encode_batch(documents)])
        for domain, documents in per_domain.items()
    }


def tokenizer_main(argv: Sequence[str]) -> int:
    """``testbed-data tokenizer``: a byte-level BPE tokenizer trained on a run's own domains."""
    parser = argparse.ArgumentParser(
        prog="testbed-data tokenizer",
        description="Train a byte-level BPE tokenizer on the training documents of a run's domains, "
        "each domain capped at the smallest domain's bytes.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the run's data overrides, as given to testbed-train: data=..., data.domains=[...], "
        "+data.sources.<domain>.path=...",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write tokenizer.json")
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="vocabulary size (default 4096; keep <= 8k on CPU)"
    )
    args = parser.parse_args(argv)
    try:
        config = data_config(args.overrides)
        per_domain = training_documents(config)
        current_path = config.tokenizer or SHIPPED_TOKENIZER
        try:
            current = packing(load_tokenizer(current_path), per_domain)
        except DataError:  # the run's tokenizer is not built: nothing to compare with
            current = dict.fromkeys(per_domain, math.nan)
        tokenizer = train_tokenizer(balanced_texts(per_domain), args.vocab_size, args.out)
    except (TestbedError, ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {str(error).strip()}", file=sys.stderr)
        return 2
    trained = packing(tokenizer, per_domain)
    print(f"bytes per token of the training documents: now ({current_path}) and with {args.out}")
    print(f"{'domain':<14} {'documents':>9} {'now':>7} {'new':>7}")
    for domain, documents in per_domain.items():
        print(f"{domain:<14} {len(documents):>9} {current[domain]:>7.2f} {trained[domain]:>7.2f}")
    vocab = tokenizer.get_vocab_size()
    print(f"tokenizer: {args.out} (vocab {vocab})")
    print(f"train with: data.tokenizer={args.out} model.vocab_size={vocab} (and the same data overrides)")
    if badly_packed(trained):
        print(f"note: still packed badly by the new tokenizer: {', '.join(badly_packed(trained))}")
    return 0


def distinguish_main(argv: Sequence[str]) -> int:
    """``testbed-data distinguish``: the distinguishability report of a data config
    (testbed.data.distinguish); its token store is built if needed."""
    parser = argparse.ArgumentParser(
        prog="testbed-data distinguish",
        description="Accuracy of a bag-of-tokens classifier on held-out windows of each domain, and the "
        "confusion matrix (distinguish.json, confusion.png).",
    )
    parser.add_argument("overrides", nargs="*", help="data overrides as for testbed-train (data=large ...)")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for distinguish.json and confusion.png"
    )
    parser.add_argument(
        "--window", type=int, default=distinguish.WINDOW, help=f"tokens per window ({distinguish.WINDOW})"
    )
    parser.add_argument("--max-windows", type=int, default=None, help="held-out windows per domain and split")
    args = parser.parse_args(argv)
    try:
        if args.window < 1:
            raise DataError(f"--window: got {args.window}; allowed: a positive number of tokens")
        config = data_config(args.overrides)
        store = open_mix_store(config, load_tokenizer(config.tokenizer or SHIPPED_TOKENIZER))
        result = distinguish.report(store, config.domains, args.window, args.max_windows)
    except (TestbedError, ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {str(error).strip()}", file=sys.stderr)
        return 2
    result["data"] = {"name": config.name, "tokenizer": config.tokenizer or str(SHIPPED_TOKENIZER)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distinguish.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{config.name}: bag-of-tokens classifier on {args.window}-token held-out windows"
    confusion_figure(result["domains"], np.asarray(result["confusion"]), args.out / "confusion.png", title)
    print(distinguish.markdown(result))
    print(f"wrote {args.out / 'distinguish.json'} and {args.out / 'confusion.png'}")
    return 0


def write_jsonl_xz(path: Path, records: list[dict]) -> None:
    """JSON lines, xz-compressed (preset 9, no timestamps in the format): reproducible bytes."""
    import lzma

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    payload = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    temporary.write_bytes(lzma.compress(payload, preset=9))
    temporary.replace(path)


def replace_file(built: Path, target: Path, force: bool) -> None:
    """Move `built` onto `target`; an existing, different `target` is replaced only with `force` (else a
    DataError names both files and `built` is left for inspection)."""
    if target.exists() and not force and sha256_of(target) != sha256_of(built):
        raise DataError(
            f"{target} exists and differs from the rebuilt file ({built}: other sources or versions?); "
            "compare them, then rerun with --force to replace it"
        )
    built.replace(target)


def build_large_domain(domain: str, out_dir: Path, bytes_per_domain: int, force: bool = False) -> dict:
    """One domain of the large mix: its components' documents (testbed.data.large), spread-sampled to about
    `bytes_per_domain`, written as <domain>.jsonl.xz with each document's source and group (an existing,
    different file is replaced only with `force`)."""
    documents, counts = large_domain_documents(domain)
    texts = [d.text for d in documents]
    chosen = set(map(id, select_documents(texts, bytes_per_domain)))
    selected = [d for d in documents if id(d.text) in chosen]
    path = out_dir / f"{domain}.jsonl.xz"
    records = [{"text": d.text, "domain": domain, "source": d.source_id, "group": d.group} for d in selected]
    built = out_dir / f"{domain}.jsonl.xz.new"
    write_jsonl_xz(built, records)
    replace_file(built, path, force)
    components = []
    for component in LARGE_MIX[domain]:
        kept = [d for d in selected if d.source_id == component.source_id]
        components.append(
            {
                "source_id": component.source_id,
                "version": component.version(),
                "origin": component.origin,
                "licence": component.licence,
                "document_unit": component.document_unit,
                "documents": len(kept),
                "bytes": sum(len(d.text.encode("utf-8")) for d in kept),
                "source": counts[component.source_id],
            }
        )
    return {
        "file": path.name,
        "documents": len(selected),
        "bytes": sum(len(d.text.encode("utf-8")) for d in selected),
        "groups": len({d.group for d in selected if d.group is not None}),
        "sha256": sha256_of(path),
        "source_documents": len(documents),
        "source_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "components": components,
    }


def large_main(argv: Sequence[str]) -> int:
    """``testbed-data large``: build the large mix (data/large) and train its tokenizer on its training
    split (conf/data/large.yaml's split settings)."""
    parser = argparse.ArgumentParser(prog="testbed-data large", description="Build the large offline mix.")
    parser.add_argument("--out", type=Path, default=Path("data/large"), help="output folder (data/large)")
    parser.add_argument("--bytes-per-domain", type=int, default=LARGE_BYTES_PER_DOMAIN)
    parser.add_argument("--domains", default=",".join(LARGE_MIX), help="comma-separated large domains")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--no-tokenizer", action="store_true", help="keep the folder's tokenizer.json")
    parser.add_argument("--force", action="store_true", help="replace existing files that differ")
    args = parser.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = [d for d in domains if d not in LARGE_MIX]
    if unknown or not domains:
        parser.error(f"--domains: unknown {unknown}; allowed: {', '.join(LARGE_MIX)}")
    out_dir: Path = args.out
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = manifest.get("domains", {})
    print(f"{'domain':<14} {'documents':>9} {'bytes':>12} {'xz bytes':>10}")
    for domain in domains:
        try:
            entry = build_large_domain(domain, out_dir, args.bytes_per_domain, args.force)
        except SourceMissingError as error:
            print(f"error: {error} (make data-sources-large installs every source)", file=sys.stderr)
            return 1
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        entries[domain] = entry
        size = (out_dir / entry["file"]).stat().st_size
        print(f"{domain:<14} {entry['documents']:>9} {entry['bytes']:>12} {size:>10}")
    manifest = {"domains": dict(sorted(entries.items())), "tokenizer": manifest.get("tokenizer")}
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if not args.no_tokenizer:
        overrides = ["data=large", f"data.root={out_dir}", f"data.domains=[{','.join(sorted(entries))}]"]
        per_domain = training_documents(data_config(overrides))
        path = out_dir / "tokenizer.json"
        built = out_dir / "tokenizer.json.new"
        train_tokenizer(balanced_texts(per_domain), args.vocab_size, built)
        try:
            replace_file(built, path, args.force)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        manifest["tokenizer"] = {
            "file": path.name,
            "vocab_size": args.vocab_size,
            "trained_on": sorted(per_domain),
            "split": "training documents of conf/data/large.yaml's split, each domain capped at the smallest",
            "sha256": sha256_of(path),
        }
        manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        print(f"tokenizer: {path} (vocab {args.vocab_size}, trained on {len(per_domain)} domains)")
    return 0


def list_domains() -> None:
    print(f"{'domain':<14} {'shipped':<8} {'available':<10} licence / install")
    for name, source in SOURCES.items():
        available = "yes" if source.available() else "no"
        shipped = "yes" if source.shipped else "no"
        print(f"{name:<14} {shipped:<8} {available:<10} {source.licence}")
        print(f"{'':<34} {source.description}; install: {source.install}")


def parse_domains(parser: argparse.ArgumentParser, value: str | None) -> list[str]:
    if value is None:
        return list(SHIPPED_DOMAINS)
    domains = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in domains if name not in SOURCES]
    if unknown or not domains:
        parser.error(f"--domains: unknown domain(s) {unknown or value!r}; allowed: {', '.join(SOURCES)}")
    return list(dict.fromkeys(domains))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed-data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/mix"), help="output folder (default data/mix)")
    parser.add_argument(
        "--bytes-per-domain", type=int, default=1_000_000, help="UTF-8 bytes of text per domain (default 1e6)"
    )
    parser.add_argument(
        "--domains", default=None, help=f"comma-separated domains (default: {','.join(SHIPPED_DOMAINS)})"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="also train a tokenizer and save it here"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="tokenizer vocabulary size (default 4096)"
    )
    parser.add_argument(
        "--skip-missing", action="store_true", help="skip domains whose source is not installed"
    )
    parser.add_argument("--list", action="store_true", help="list domains with availability and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tokenizer"]:
        return tokenizer_main(argv[1:])
    if argv[:1] == ["distinguish"]:
        return distinguish_main(argv[1:])
    if argv[:1] == ["large"]:
        return large_main(argv[1:])
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.list:
        list_domains()
        return 0
    domains = parse_domains(parser, args.domains)
    if args.bytes_per_domain <= 0:
        parser.error(f"--bytes-per-domain must be positive, got {args.bytes_per_domain}")

    out_dir: Path = args.out
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries: dict[str, dict] = manifest.get("domains", {})
    built: list[str] = []
    print(f"{'domain':<14} {'documents':>9} {'bytes':>12}  note")
    for domain in domains:
        try:
            entry = build_domain(domain, out_dir, args.bytes_per_domain)
        except SourceMissingError as error:
            if args.skip_missing:
                print(f"{domain:<14} {'-':>9} {'-':>12}  skipped: {error}")
                continue
            print(f"error: {error}", file=sys.stderr)
            return 1
        entry["bytes_requested"] = args.bytes_per_domain
        entries[domain] = entry
        built.append(domain)
        note = ""
        if entry["source_bytes"] < args.bytes_per_domain:
            note = f"source has only {entry['source_bytes']} bytes: took all of it"
        print(f"{domain:<14} {entry['documents']:>9} {entry['bytes']:>12}  {note}")
    # Keep entries of earlier runs only while their files are unchanged.
    entries = {
        name: entry
        for name, entry in sorted(entries.items())
        if (out_dir / entry["file"]).exists() and sha256_of(out_dir / entry["file"]) == entry["sha256"]
    }
    manifest = {"domains": entries, "tokenizer": manifest.get("tokenizer")}

    if args.tokenizer is not None and built:
        train_tokenizer(balanced_training_texts(out_dir, built), args.vocab_size, args.tokenizer)
        manifest["tokenizer"] = {
            "file": str(args.tokenizer),
            "vocab_size": args.vocab_size,
            "trained_on": built,
            "sha256": sha256_of(args.tokenizer),
        }
        print(f"tokenizer: {args.tokenizer} (vocab {args.vocab_size}, trained on {len(built)} domains)")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
