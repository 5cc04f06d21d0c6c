"""Token store loader: resident memory and throughput on a generated store of >= 200 M tokens.

Writes a store of random uint16 tokens (8 domains x 25 M tokens = 200 M by default, 400 MB on disk) in the
format of testbed.data.store, opens it as training does (TokenStore.open with its sha256 check,
WindowDataset, DomainBatchSampler, the DataLoader and collate of testbed.data.datamodule), then draws
batches on one core (num_workers=0, one torch thread) and reports tokens served per second and the growth of
the process's resident memory (RSS, /proc/self/statm) from after opening to the end of the run. Shapes: the
default CPU run (16 x 128 tokens) and a GPU-like batch (32 x 1024).

    python benchmarks/token_store.py [--tokens-per-domain 25000000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.data.datamodule import DomainBatchSampler, WindowDataset, collate  # noqa: E402
from testbed.data.splits import SPLITS  # noqa: E402
from testbed.data.store import META, STORE_FORMAT, TokenStore, Windows  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def generate(folder: Path, domains: int, tokens: int, vocab: int = 4096, chunk: int = 1 << 24) -> float:
    """A store of random tokens: `tokens` training tokens per domain, 1 % of that for val and test."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    meta = {"format": STORE_FORMAT, "dtype": "<u2", "vocab_size": vocab, "eos_id": 0, "domains": {}}
    for d in range(domains):
        splits = {}
        for split in SPLITS:
            count = tokens if split == "train" else tokens // 100
            digest = hashlib.sha256()
            path = folder / f"d{d}.{split}.bin"
            with open(path, "wb") as handle:
                for start in range(0, count, chunk):
                    data = rng.integers(1, vocab, min(chunk, count - start), dtype=np.uint16).tobytes()
                    handle.write(data)
                    digest.update(data)
            splits[split] = {
                "file": path.name,
                "tokens": count,
                "documents": 1,
                "bytes": 0,
                "sha256": digest.hexdigest(),
            }
        meta["domains"][f"d{d}"] = {"splits": splits, "dedup": None}
    (folder / META).write_text(json.dumps(meta))
    return time.perf_counter() - started


def serve(store: TokenStore, batch_size: int, seq_len: int, seconds: float) -> dict:
    domains = store.domains()
    dataset = WindowDataset([Windows(store.stream(d, "train"), seq_len) for d in domains])
    sampler = DomainBatchSampler(
        dataset.offsets, np.ones(len(domains)), batch_size, "mixed", seed=0, batches_per_epoch=10**9
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    before = rss_mb()
    peak, tokens, batches = before, 0, 0
    started = time.perf_counter()
    for batch in loader:
        tokens += batch["input_ids"].numel()
        batches += 1
        if batches % 256 == 0:
            peak = max(peak, rss_mb())
            if time.perf_counter() - started > seconds:
                break
    elapsed = time.perf_counter() - started
    return {
        "batch": f"{batch_size} x {seq_len}",
        "batches": batches,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed),
        "rss_start_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - before, 1),
        "windows_available": len(dataset),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--tokens-per-domain", type=int, default=25_000_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="per batch shape")
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write the store (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "token_store.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        write_s = generate(folder, args.domains, args.tokens_per_domain)
        rss_before_open = rss_mb()
        started = time.perf_counter()
        store = TokenStore.open(folder, verify=True)
        open_s = time.perf_counter() - started
        total = sum(i["tokens"] for e in store.meta["domains"].values() for i in e["splits"].values())
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
            "store_tokens": total,
            "store_bytes": sum(p.stat().st_size for p in folder.glob("*.bin")),
            "generate_s": round(write_s, 1),
            "open_with_sha256_s": round(open_s, 2),
            "rss_open_growth_mb": round(rss_mb() - rss_before_open, 1),
            "runs": [serve(store, 16, 128, args.seconds), serve(store, 32, 1024, args.seconds)],
        }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
