"""summary.json of a run and the table printed at the end of `make train`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from testbed.metrics.summary import HEADLINE


def unigram_entropies(datamodule) -> dict[str, float]:
    """Per domain: cross-entropy (nats/token) of its validation tokens under its own training unigram
    distribution (add-one smoothed). The bar a trained LM must get clearly below."""
    out = {}
    vocab = datamodule.vocab_size()
    for split in datamodule.splits:
        train_counts = torch.bincount(split.train[:, 1:].reshape(-1), minlength=vocab).double() + 1
        log_p = (train_counts / train_counts.sum()).log()
        out[split.name] = float(-log_p[split.val[:, 1:].reshape(-1)].mean())
    return out


def write_summary(
    run_dir: Path,
    *,
    run,
    choices: dict,
    steps: int,
    tokens_seen: int,
    wall_time: float,
    val_metrics: dict,
    spec: dict,
    unigram: dict,
    data: list[dict],
    coefficients: dict | None = None,
    extra: dict | None = None,
) -> dict:
    summary = {
        "run_name": run.run_name,
        "config": choices
        or {"router": run.router.name, "balance": run.balance.name, "model": run.model.name},
        "seed": run.seed,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "wall_time_s": round(wall_time, 2),
        **{k: v for k, v in val_metrics.items()},
        **{k: v for k, v in spec.items() if k.endswith("/mean")},
        "unigram_entropy": unigram,
        "coefficients": coefficients or {},  # loss weights actually used (after `auto` calibration)
        **(extra or {}),
        "data": data,
        "resolved": {
            "router": dataclasses.asdict(run.router),
            "balance": dataclasses.asdict(run.balance),
            "aux_loss": {k: dataclasses.asdict(v) for k, v in run.aux_loss.items()},
        },
    }
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=f"validation loss per domain (nats/token) after {summary['steps']} steps, "
        f"{summary['tokens_seen']:,} tokens, {summary['wall_time_s']:.0f} s"
    )
    table.add_column("domain")
    table.add_column("val loss", justify="right")
    table.add_column("unigram entropy", justify="right")
    for domain, unigram in summary["unigram_entropy"].items():
        loss = summary.get(f"val/loss/{domain}", math.nan)
        table.add_row(domain, f"{loss:.3f}", f"{unigram:.3f}")
    table.add_row("mean", f"{summary.get('val/loss', math.nan):.3f}", "")
    console.print(table)
    spec = Table(title="specialization (mean over MoE layers)")
    spec.add_column("metric")
    spec.add_column("value", justify="right")
    for metric in HEADLINE:
        value = summary.get(f"spec/{metric}/mean")
        if value is not None:
            spec.add_row(metric, f"{value:.4f}")
    console.print(spec)
