"""`testbed-analyze <checkpoint or run dir> [key=value ...]`: recompute every `spec/` metric of a trained
model on the validation set of its data config (or of overrides such as `data.root=... data.domains=[...]`),
and write `analysis.json`, the count table, plots and a short Markdown summary.

`testbed-analyze --hf <model id or directory> [data overrides]` does the same for a pretrained Hugging Face
MoE (testbed/hf/): the mix is tokenized with the model's own tokenizer and routing is reconstructed from the
router logits as the model routes. The command's entry point, `testbed.hf.cli.analyze_main`, parses the
options defined here and runs `analyze_checkpoint` or the Hugging Face path (testbed/hf/cli.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from testbed.analysis.peer_runs import add_peer_options, run_checkpoint_peers
from testbed.config import parse_config
from testbed.data.datamodule import DomainMixDataModule
from testbed.errors import CheckpointError, ConfigError, TestbedError
from testbed.metrics.per_layer import per_layer, spec_metrics
from testbed.plots import domain_expert_heatmaps, per_layer_curves
from testbed.safe_load import load_file
from testbed.train.callbacks import count_batch, new_stats, stiffness_pass
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel


def resolve_checkpoint(path: Path) -> Path:
    if path.is_dir():
        candidate = path / "checkpoints" / "last.ckpt"
        if not candidate.is_file():
            raise CheckpointError(f"{path} is a directory without checkpoints/last.ckpt; pass a .ckpt file")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_run(checkpoint: Path, overrides: list[str]):
    """The run config stored in the checkpoint, with dotted overrides applied, validated."""
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip() or key != key.strip():
            raise ConfigError(
                "testbed-analyze override",
                override,
                "key=value with a dotted config key, e.g. data.root=/my/mix",
            )
    try:  # tensors and plain containers only (testbed/safe_load.py): a crafted file runs no code
        payload = load_file(checkpoint, "")
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}; pass a .ckpt written by testbed-train (<run dir>/checkpoints/last.ckpt)"
        ) from err
    hparams = payload.get("hyper_parameters", {}) if isinstance(payload, dict) else {}
    if "run" not in hparams:
        raise CheckpointError(
            f"{checkpoint} holds no run config (hyper_parameters.run): not written by testbed-train"
        )
    try:
        cfg = OmegaConf.merge(OmegaConf.create(hparams["run"]), OmegaConf.from_dotlist(overrides))
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:  # values are parsed as YAML
        key = getattr(err, "full_key", None) or "testbed-analyze override"
        raise ConfigError(
            key, overrides, f"overrides of existing config keys ({str(err).splitlines()[0]})"
        ) from None
    cfg.init_from = None
    return parse_config(cfg)


@torch.no_grad()
def evaluate(module, datamodule, stiffness_batches: int):
    """The validation pass of training, with its routing counters (+ the stiffness pass), without a
    Trainer: the module's `validation_outputs` and the callback's `count_batch`, as in training. Returns
    (per-domain loss, stats, per-domain token count); a dense model (no MoE layers): the loss only, stats
    None."""
    module.eval()
    routing = bool(module.moe_layer_names)
    stats = new_stats(module) if routing else None
    sums = torch.zeros(len(module.domains), dtype=torch.float64, device=module.device)
    counts = torch.zeros_like(sums)
    loader = datamodule.val_dataloader()
    for batch in loader:
        batch = {k: v.to(module.device) for k, v in batch.items()}
        token_loss, records, correct = module.validation_outputs(batch)
        if routing:
            count_batch(stats, records, batch, correct)
        domains = batch["domain_ids"].reshape(-1)
        sums.index_add_(0, domains, token_loss.double())
        counts.index_add_(0, domains, torch.ones_like(token_loss, dtype=torch.float64))
    if routing and stiffness_batches > 0:
        stiffness_pass(module, [b for _, b in zip(range(stiffness_batches), loader, strict=False)], stats)
    losses = (sums / counts.clamp_min(1)).cpu().tolist()
    tokens = [int(c) for c in counts.cpu().tolist()]
    return (
        dict(zip(module.domains, losses, strict=True)),
        stats,
        dict(zip(module.domains, tokens, strict=True)),
    )


def write_report(
    out: Path,
    checkpoint,
    router: str,
    domains,
    losses,
    stats,
    layer_names,
    extra: dict | None = None,
    files: bool = True,
) -> dict:
    """analysis.json, routing_counts.pt, the heatmap, per-layer plots and summary.md (`files=False`:
    analysis.json and summary.md only, small enough to commit beside a run). `router` labels the plots (a
    testbed run's router name, a pretrained model's family); `extra` adds keys to analysis.json. `stats`
    None (a dense model: nothing routed): the losses only, analysis.json and summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    analysis = {
        "checkpoint": str(checkpoint),
        "router": router,
        "domains": domains,
        "layers": layer_names,
        "val_loss": losses,
        "val_loss_mean": sum(losses.values()) / len(losses),
    }
    if stats is None:
        analysis.update(extra or {})
        (out / "analysis.json").write_text(json.dumps(analysis, indent=2, default=float))
        (out / "summary.md").write_text(markdown_summary(analysis))
        return analysis
    layers = per_layer(stats)
    state = stats.state_dict()
    routed = state["accuracy_routed"].double()
    accuracy = torch.where(routed > 0, state["correct"].double() / routed.clamp_min(1), torch.nan)
    analysis |= {
        "metrics": spec_metrics(stats, layer_names),
        "per_layer": dict(zip(layer_names, layers, strict=True)),
        "expert_accuracy": {name: accuracy[i].tolist() for i, name in enumerate(layer_names)},
        "expert_load": {name: state["counts"][i].sum(0).tolist() for i, name in enumerate(layer_names)},
        "counts": {
            name: state["counts"][i].tolist() for i, name in enumerate(layer_names)
        },  # [domain][expert]
        **(extra or {}),
    }
    (out / "analysis.json").write_text(json.dumps(analysis, indent=2, default=float).replace("NaN", "null"))
    (out / "summary.md").write_text(markdown_summary(analysis))
    if not files:
        return analysis
    torch.save(
        {"domains": domains, "layers": layer_names, "ngram_sizes": stats.ngram_sizes, **state},
        out / "routing_counts.pt",
    )
    domain_expert_heatmaps(
        state["counts"].numpy(),
        domains,
        layer_names,
        out_path=out / "heatmap.png",
        title=f"p(expert | domain): {router}",
    )
    for metric in ("gate_entropy", "dead_experts", "expert_accuracy_spread", "purity"):
        per_layer_curves(
            {router: [m[metric] for m in layers]},
            metric,
            out_path=out / f"{metric}.png",
            title=f"{metric} per layer",
        )
    return analysis


def markdown_summary(analysis: dict) -> str:
    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    lines = [
        f"# Analysis of {analysis['checkpoint']}",
        "",
        (
            f"Router: `{analysis['router']}`"
            if analysis["router"] is not None
            else f"Model `{analysis.get('model')}` (dense: no routing to count)"
        )
        + f"; mean validation loss {analysis['val_loss_mean']:.3f} nats/token"
        + (f" over {sum(analysis['val_tokens'].values()):,} tokens." if "val_tokens" in analysis else "."),
        "",
        "| domain | val loss |",
        "|---|---|",
    ]
    lines += [f"| {d} | {v:.3f} |" for d, v in analysis["val_loss"].items()]
    if "per_layer" not in analysis:  # a dense model: no routing to count
        return "\n".join(lines) + "\n"
    metrics = sorted({k for layer in analysis["per_layer"].values() for k in layer})
    lines += [
        "",
        "| metric | " + " | ".join(analysis["layers"]) + " | mean |",
        "|---|" + "---|" * (len(analysis["layers"]) + 1),
    ]
    for metric in metrics:
        values = [analysis["per_layer"][name][metric] for name in analysis["layers"]]
        mean = analysis["metrics"].get(f"spec/{metric}/mean")
        lines.append(f"| {metric} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(mean)} |")
    lines += [
        "",
        "Plots: heatmap.png (p(expert | domain), oracle blocks outlined), gate_entropy.png, "
        "dead_experts.png, expert_accuracy_spread.png, purity.png. Per-expert accuracy: analysis.json.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The options of `testbed-analyze` (its entry point, `testbed.hf.cli.analyze_main`, dispatches to
    `analyze_checkpoint` or, with --hf, to the Hugging Face path)."""
    parser = argparse.ArgumentParser(prog="testbed-analyze", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        help="a .ckpt file, or a run directory with checkpoints/last.ckpt (not with --hf)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. data.root=/my/mix 'data.domains=[a,b]' (with --hf: Hydra-style data "
        "overrides such as data=languages)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: <run dir>/analysis)")
    parser.add_argument(
        "--stiffness-batches", type=int, default=None, help="default: metrics.stiffness_batches"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="write analysis.json and summary.md only (no plots, no routing_counts.pt): small, for a commit",
    )
    hf = parser.add_argument_group("pretrained Hugging Face MoEs (pip install -e .[hf])")
    hf.add_argument("--hf", help="a hub model id or a local model directory, instead of a checkpoint")
    hf.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's own)")
    hf.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    hf.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: data.seq_len)")
    hf.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    hf.add_argument(
        "--max-tokens-per-domain",
        type=int,
        default=None,
        help="token budget per domain (default: data.val_tokens_per_domain; 0: every validation token)",
    )
    hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_peer_options(parser)  # --peers and its settings (testbed/analysis/peer_runs.py)
    return parser


def analyze_checkpoint(args: argparse.Namespace) -> int:
    """`testbed-analyze <checkpoint or run dir> [overrides]` with parsed options (`build_parser`)."""
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        run = load_run(checkpoint, args.overrides)
        datamodule = DomainMixDataModule(run.data, seed=run.seed)
        datamodule.setup("validate")
        module = MoELanguageModel(run, datamodule.domains)
        payload = load_weights(module, checkpoint, what="testbed-analyze")
        for router in module.routers:  # a router that changes with the step (hash_steps) as trained
            router.step = int(payload.get("global_step", 0)) if isinstance(payload, dict) else 0
        if not module.moe_layer_names and not args.summary_only:
            raise TestbedError(
                f"{checkpoint}: the model ({run.model.name}) has no MoE layers, so there is no routing to "
                "analyze; give a run of an MoE model (--summary-only scores a dense run's validation loss)"
            )
        if not module.moe_layer_names and args.peers is not None:
            raise TestbedError(f"{checkpoint}: the model ({run.model.name}) has no MoE layers for --peers")
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    module.to(args.device)
    stiffness = run.metrics.stiffness_batches if args.stiffness_batches is None else args.stiffness_batches
    out = args.out or checkpoint.parent.parent / "analysis"
    losses, stats, tokens = evaluate(module, datamodule, stiffness)
    dense = stats is None  # --summary-only on a dense run: its loss, for the regime check
    write_report(
        out,
        checkpoint,
        None if dense else run.router.name,
        datamodule.domains,
        losses,
        stats,
        module.moe_layer_names,
        {"overrides": list(args.overrides), "val_tokens": tokens, "model": run.model.name},
        files=not args.summary_only,
    )
    print((out / "summary.md").read_text())
    plots = "" if args.summary_only else ", heatmap.png and per-layer plots"
    print(f"wrote {out}/analysis.json, summary.md{plots}")
    if args.peers is not None:  # the analyses of other MoE studies (testbed/analysis/peer_runs.py)
        return run_checkpoint_peers(args, module, datamodule, out, resolve_checkpoint, load_run)
    return 0
