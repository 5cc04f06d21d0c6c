"""``testbed-data``: build a domain mix (gzip JSON lines per domain) and its tokenizer.

    testbed-data --out data/mix --tokenizer data/tokenizer.json      # the shipped sample
    testbed-data --out /tmp/big --bytes-per-domain 30000000          # a larger mix
    testbed-data --list                                              # domains and availability

Each domain's documents are taken whole, in source order, spread over the whole source (not just
its beginning), until about ``--bytes-per-domain`` UTF-8 bytes. The same sources give
byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from testbed.data.corpora import SHIPPED_DOMAINS, SOURCES, SourceMissingError, iter_domain_documents
from testbed.data.tokenizer import train_tokenizer

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


def balanced_training_texts(out_dir: Path, domains: Sequence[str]) -> list[str]:
    """The written documents of ``domains``, each domain capped at the smallest domain's byte
    count (whole documents, in file order), so no domain dominates the BPE merges."""
    per_domain: dict[str, list[str]] = {}
    for domain in domains:
        with gzip.open(out_dir / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as handle:
            per_domain[domain] = [json.loads(line)["text"] for line in handle if line.strip()]
    budget = min(sum(len(t.encode("utf-8")) for t in texts) for texts in per_domain.values())
    texts: list[str] = []
    for domain in domains:
        texts.extend(select_documents(per_domain[domain], budget))
    return texts


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
