"""summary.json of a run and the table printed at the end of `make train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from testbed.config import plain
from testbed.data.datamodule import data_parallel_rank, repetition_epochs
from testbed.data.loading import SHIPPED_TOKENIZER, resolve_data_path
from testbed.metrics.per_layer import HEADLINE
from testbed.metrics.regime import ROLES, epochs_trained, read_summaries, regime_check, repeated_domains

CHECKOUT = Path(__file__).resolve().parents[2]


def baseline_roots(run_dir: Path) -> list[Path]:
    """Where a finished run looks for its baselines: the runs of its own sweep or experiment (the folder
    above the Hydra sweep folder, or the parent of a single run's date folder) and the committed runs under
    experiments/. A folder that contains the checkout itself is never searched."""
    run_dir = Path(run_dir).resolve()
    levels = 2 if (run_dir.parent / "multirun.yaml").exists() else 1
    roots = [run_dir.parents[levels]] if len(run_dir.parents) > levels else []
    roots.append(CHECKOUT / "experiments")
    return [r for r in roots if r != CHECKOUT and r not in CHECKOUT.parents]


def unigram_entropies(datamodule) -> dict[str, float]:
    """Per domain: cross-entropy (nats/token) of its validation tokens under its own training unigram
    distribution (add-one smoothed). The bar a trained LM must get clearly below."""
    out = {}
    vocab = datamodule.vocab_size()
    for split in datamodule.splits:
        train_counts = torch.from_numpy(split.train.target_counts(vocab)).double() + 1
        log_p = (train_counts / train_counts.sum()).log()
        val_counts = torch.from_numpy(split.val.target_counts(vocab)).double()
        out[split.name] = float(-(val_counts * log_p).sum() / val_counts.sum())
    return out


def with_repetition(run, data: list[dict]) -> list[dict]:
    """`data` (the data module's `describe()`) with each domain's epochs over its training tokens at the
    configured trainer.max_steps (all ranks' micro-batches counted)."""
    if not data:
        return data
    t = run.trainer
    drawn = t.max_steps * t.accumulate_grad_batches * data_parallel_rank()[1] * run.data.batch_size
    epochs = repetition_epochs([entry["train_sequences"] for entry in data], run.data.weights, drawn)
    return [{**entry, "epochs_at_max_steps": round(e, 6)} for entry, e in zip(data, epochs, strict=True)]


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
    status: str = "finished",
) -> dict:
    """`status`: finished (the results), or interrupted / failed: then the last validation's losses and
    metrics go under `last_validation` only, so that nothing reads them as the run's results."""
    finished = status == "finished"
    metrics = {**val_metrics, **{k: v for k, v in spec.items() if k.endswith("/mean")}}
    summary = {
        "run_name": run.run_name,
        "status": status,
        "config": choices
        or {"router": run.router.name, "balance": run.balance.name, "model": run.model.name},
        "seed": run.seed,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "wall_time_s": round(wall_time, 2),
        **(metrics if finished else {"last_validation": metrics}),
        "unigram_entropy": unigram,
        "coefficients": coefficients or {},  # loss weights actually used (after `auto` calibration)
        **(extra or {}),
        "data": with_repetition(run, data),  # per domain: source, sizes, bytes/token, epochs
        "tokenizer": str(resolve_data_path(run.data.tokenizer or SHIPPED_TOKENIZER)),
        "init_from": run.init_from,
        "resolved": {
            "model": plain(run.model),
            "data": plain(run.data),
            "optim": plain(run.optim),
            "trainer": plain(run.trainer),
            "router": plain(run.router),
            "balance": plain(run.balance),
            "aux_loss": {k: plain(v) for k, v in run.aux_loss.items()},
        },
    }
    if finished:
        summary.update(regime_check(summary, read_summaries(baseline_roots(run_dir), exclude=Path(run_dir))))
    summary = strict_json(summary)
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def strict_json(value):
    """`value` with NaN / infinity as None and numpy or torch scalars as Python numbers: strict JSON."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return strict_json(value.item())
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number.is_integer() and "int" in type(value).__name__:
        return int(number)
    return strict_json(number)


def print_titled(console, title: str, table) -> None:
    """`table` under `title` as one line of its own: a Rich table title wraps at the table's width (three
    lines over a narrow table), and a notice is one line."""
    console.print(title, soft_wrap=True, highlight=False)
    console.print(table)


def print_summary(summary: dict) -> None:
    console = Console()
    title = (
        f"validation loss per domain (nats/token) after {summary['steps']} steps, "
        f"{summary['tokens_seen']:,} tokens, {summary['wall_time_s']:.0f} s"
    )
    table = Table()
    table.add_column("domain")
    table.add_column("val loss", justify="right")
    table.add_column("unigram entropy", justify="right")
    table.add_column("epochs", justify="right")  # times its training tokens were read
    epochs = epochs_trained(summary)
    for domain, unigram in summary["unigram_entropy"].items():
        loss = summary.get(f"val/loss/{domain}", math.nan)
        read = f"{epochs[domain]:.2f}" if domain in epochs else ""
        table.add_row(domain, f"{loss:.3f}", f"{unigram:.3f}", read)
    table.add_row("mean", f"{summary.get('val/loss', math.nan):.3f}", "", "")
    print_titled(console, title, table)
    spec = Table()
    spec.add_column("metric")
    spec.add_column("value", justify="right")
    for metric in HEADLINE:
        value = summary.get(f"spec/{metric}/mean")
        if value is not None:
            spec.add_row(metric, f"{value:.4f}")
    if spec.row_count:
        print_titled(console, "specialization (mean over MoE layers)", spec)
    print_regime(console, summary)


def print_regime(console, summary: dict) -> None:
    """The regime check next to the losses: unigram gap and gains over the baselines found (or how to get
    them)."""
    table = Table()
    table.add_column("against")
    table.add_column("their val loss", justify="right")
    table.add_column("gain", justify="right")
    gap = summary.get("regime/gap_to_unigram")
    if gap is not None:
        table.add_row("unigram entropy (mean over domains)", "", f"{gap:+.3f}")
    baselines = summary.get("regime/baselines", {})
    for role in ROLES:
        if role in baselines:
            found = baselines[role]
            plural = "s" if found["runs"] > 1 else ""
            note = f" ({found['runs']} run{plural}{', same seed' if found['paired'] else ''})"
            table.add_row(
                role.replace("_", "-") + note,
                f"{found['val/loss']:.3f}",
                f"{summary[f'regime/gain_over_{role}']:+.3f}",
            )
    print_titled(console, "regime check (validation loss, nats/token; gain > 0: this run is better)", table)
    repeated = repeated_domains(summary)
    if repeated:
        console.print(
            "[bold]repeated data[/bold]: this run read the training tokens of "
            + ", ".join(f"{d} {e:.2f} times" for d, e in repeated.items())
            + "; its losses mix generalisation with memorisation (a larger mix: data=large)",
            soft_wrap=True,
        )
    elif epochs_trained(summary):
        most = max(epochs_trained(summary).values())
        console.print(
            f"no data repeated: every domain's training tokens read at most once (max {most:.2f})",
            soft_wrap=True,
            highlight=False,
        )
    model = summary.get("resolved", {}).get("model", {})
    missing = [r for r in ROLES if r not in baselines]
    if model.get("dense_layers", 0) < model.get("n_layers", 0) and missing:
        name = summary.get("config", {}).get("model", model.get("name", "<model>"))
        hints = {
            "dense_active": f"model={name}_dense",
            "dense_total": f"model={name}_dense_total",
            "hash": "router=hash balance=none",
        }
        console.print(
            "no baseline runs yet for: "
            + ", ".join(f"{r} ({hints[r]})" for r in missing)
            + "; train them with the same other overrides (README: regime check)",
            soft_wrap=True,
            highlight=False,
        )
