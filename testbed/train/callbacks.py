"""Lightning callback: specialization metrics from streaming routing counters.

- every `metrics.train_every_n_steps` steps: the routing of one training step, logged as
  `train/spec/<metric>/mean` (layer means only, to keep the number of keys bounded);
- at each validation: every specialization metric (docs/metrics.md, "Metric keys") as
  `spec/<metric>/layer<i>` and `spec/<metric>/mean`, including routing stiffness from a second, perturbed
  pass over a fixed subset of validation batches; the layer x domain x expert count table is saved to
  `<run_dir>/routing/counts_step<N>.pt` and drawn as heatmaps in `<run_dir>/plots/` (also sent to
  TensorBoard / W&B when those loggers are on); beside it, `train_counts_step<N>.pt` sums the count tables
  of the last `metrics.train_counts_window` measured training steps, so that a choice (an expert path) can
  be made on training data and scored on validation.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from testbed.metrics.per_layer import spec_metrics
from testbed.metrics.stats import RoutingStats
from testbed.plots import domain_expert_heatmaps, per_layer_curves
from testbed.train.sharding import full_tensor


def count_batch(stats: RoutingStats, records: list, batch: dict, correct: torch.Tensor | None = None) -> None:
    """Add one batch's routing of every MoE layer (the model's `LayerRecord`s) to `stats`: the training and
    validation counters and testbed-analyze all count through here."""
    ids = batch["input_ids"]
    stats.add_batch(
        [record.routing for record in records],
        batch["domain_ids"].reshape(-1),
        tuple(ids.shape),
        expert_outputs=[record.expert_outputs for record in records],
        correct=correct,
    )


def top1_experts(records: list) -> torch.Tensor:
    """[layers, tokens] int16 top-1 expert of every token (routing_change compares it across validations)."""
    return torch.stack([record.routing.probs.argmax(-1) for record in records]).to(torch.int16)


def new_stats(module) -> RoutingStats:
    return RoutingStats(
        len(module.model.moe_layers),
        len(module.domains),
        module.run_config.model.moe.num_experts,
        module.device,
        tuple(module.run_config.metrics.ngram_sizes),
    )


def perturbed_prefix(input_ids: torch.Tensor, domain_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the first half of each sequence by the first half of another sequence of the same domain in
    the batch (the next one, cyclically). Returns (perturbed ids, mask [B, S] of the tokens to compare:
    second halves of the rows that found a partner)."""
    batch, seq = input_ids.shape
    half = seq // 2
    row_domain = domain_ids[:, 0]
    candidates = (
        torch.arange(batch, device=input_ids.device).unsqueeze(1)
        + torch.arange(1, batch, device=input_ids.device).unsqueeze(0)
    ) % batch  # [B, B-1]
    same = row_domain[candidates] == row_domain.unsqueeze(1)
    has_partner = same.any(dim=1)
    partner = candidates.gather(1, same.float().argmax(dim=1, keepdim=True)).squeeze(1)
    perturbed = input_ids.clone()
    perturbed[:, :half] = input_ids[partner, :half]
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=input_ids.device)
    mask[:, half:] = True
    return perturbed, mask & has_partner.unsqueeze(1)


@torch.no_grad()
def stiffness_pass(module, batches, stats: RoutingStats) -> None:
    """Routing Stiffness (DBES RSS): route each batch twice, with the original and a perturbed context
    prefix, and count how much of the routing of the compared tokens is kept."""
    cfg = module.run_config.metrics
    for batch in batches:
        ids = batch["input_ids"].to(module.device)
        domains = batch["domain_ids"].to(module.device)
        _, original = module.model(ids, domains)
        if cfg.stiffness_perturbation == "noise":
            half = ids.shape[1] // 2
            embed = full_tensor(module.model.embed.weight).detach()
            offset = torch.randn(*ids.shape, embed.shape[1], device=module.device)
            offset = offset * cfg.stiffness_noise_std * embed.pow(2).mean().sqrt()
            offset[:, half:] = 0
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, half:] = True
            _, perturbed = module.model(ids, domains, embedding_offset=offset)
        else:
            perturbed_ids, mask = perturbed_prefix(ids, domains)
            _, perturbed = module.model(perturbed_ids, domains)
        for moe_index, (a, b) in enumerate(zip(original, perturbed, strict=True)):
            stats.update_stiffness(moe_index, a.routing, b.routing, mask.reshape(-1))


def routing_change_metrics(
    before: torch.Tensor, after: torch.Tensor, layer_names: list[str]
) -> dict[str, float]:
    """Per layer, the fraction of tokens whose top-1 expert changed; before/after: [layers, tokens]."""
    changed = (before != after).double().mean(dim=1).tolist()
    out = {f"spec/routing_change/{name}": value for name, value in zip(layer_names, changed, strict=True)}
    out["spec/routing_change/mean"] = sum(changed) / len(changed)
    return out


class SpecializationMetrics(L.Callback):
    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.last_metrics: dict[str, float] = {}
        self.history: list[dict] = []  # (step, per-layer gate entropy ...) for end-of-run plots
        self.train_stats_step = 0
        self.train_counts: deque = deque()  # (step, counts [L, D, E], tokens [L, D]) of measured steps
        self.previous_top1: torch.Tensor | None = (
            None  # [layers, tokens] top-1 experts at the last validation
        )
        self.stats: RoutingStats | None = None  # the current validation's counters
        self.top1_record: list[torch.Tensor] = []  # the current validation's top-1 experts, per batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Saved in checkpoints: a resumed run computes routing_change against the last validation before the
        interruption and keeps the metrics history."""
        return {
            "last_metrics": dict(self.last_metrics),
            "history": list(self.history),
            "previous_top1": self.previous_top1,
            "train_counts": list(self.train_counts),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.history = list(state_dict.get("history", []))
        self.previous_top1 = state_dict.get("previous_top1")
        self.train_counts = deque(state_dict.get("train_counts", []))

    # ------------------------------------------------------------------ training-time routing stats
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """The module hands over the layer records of measured micro-batches (`measures_routing`)."""
        records = outputs.get("routing") if isinstance(outputs, dict) else None
        if records is None:
            return
        self.train_stats_step = outputs["routing_step"]  # the step measured (Lightning's step index)
        stats = new_stats(pl_module)
        count_batch(stats, records, batch)
        metrics = spec_metrics(stats, pl_module.moe_layer_names, prefix="train/spec")
        window = pl_module.run_config.metrics.train_counts_window
        if window > 0:
            reduce = trainer.strategy.reduce
            counts = reduce(stats.counts.clone(), reduce_op="sum").cpu()
            tokens = reduce(stats.tokens.clone(), reduce_op="sum").cpu()
            self.train_counts.append((self.train_stats_step, counts, tokens))
            while len(self.train_counts) > window:
                self.train_counts.popleft()
        means = {k: v for k, v in metrics.items() if k.endswith("/mean")}
        # straight to the loggers, once, at the step measured: self.log would write the value again at
        # every logging step until the next collection (a flat, stale curve between measurements)
        for logger in trainer.loggers:
            logger.log_metrics(means, step=self.train_stats_step)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.stats = new_stats(pl_module)
        self.top1_record = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.stats is None or not isinstance(outputs, dict) or outputs.get("routing") is None:
            return
        count_batch(self.stats, outputs["routing"], batch, outputs.get("correct"))
        self.top1_record.append(top1_experts(outputs["routing"]))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        stats, self.stats = self.stats, None
        if stats is None or trainer.sanity_checking:
            return
        count = pl_module.run_config.metrics.stiffness_batches
        if count > 0:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, list | tuple) else loader
            batches = [b for _, b in zip(range(count), loader, strict=False)]
            stiffness_pass(pl_module, batches, stats)
        for name in RoutingStats.NAMES:
            setattr(stats, name, trainer.strategy.reduce(getattr(stats, name), reduce_op="sum"))
        metrics = spec_metrics(stats, pl_module.moe_layer_names)
        metrics.update(self._routing_change(pl_module.moe_layer_names))
        pl_module.log_dict(metrics)
        self.last_metrics = metrics
        self.history.append({"step": trainer.global_step, **metrics})
        if self.run_dir is not None and trainer.is_global_zero:
            self._save(trainer, pl_module, stats)

    def _routing_change(self, layer_names: list[str]) -> dict[str, float]:
        """`spec/routing_change`: fraction of validation tokens whose top-1 expert differs from the previous
        validation's (StableMoE's routing fluctuation, Dai et al. 2022). The validation set and its order are
        fixed, so token i is the same token at every validation."""
        if not self.top1_record:
            return {}
        top1 = torch.cat(self.top1_record, dim=1).cpu()  # [layers, tokens]
        self.top1_record = []
        previous, self.previous_top1 = self.previous_top1, top1
        if previous is None or previous.shape != top1.shape:
            return {}
        return routing_change_metrics(previous, top1, layer_names)

    def on_train_end(self, trainer, pl_module) -> None:
        """Per-layer curves of the last validation (gate entropy, dead experts, purity, ...)."""
        if self.run_dir is None or not self.last_metrics or not trainer.is_global_zero:
            return
        if not pl_module.run_config.metrics.plots:
            return

        layers = pl_module.moe_layer_names
        series = {}
        for metric in ("gate_entropy", "dead_experts", "purity", "routing_stiffness"):
            values = [self.last_metrics.get(f"spec/{metric}/{name}") for name in layers]
            if all(v is not None for v in values):
                series[metric] = values
        step = trainer.global_step
        for metric, values in series.items():
            path = self.run_dir / "plots" / f"{metric}_per_layer.png"
            figure = per_layer_curves(
                {pl_module.run_config.router.name: values},
                metric,
                out_path=path,
                title=f"{metric} per layer, step {step}",
            )
            log_figure(trainer, f"layers/{metric}", figure, path, step)

    def _save(self, trainer, pl_module, stats: RoutingStats) -> None:
        step = trainer.global_step
        out = self.run_dir / "routing"
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "step": step,
                "domains": pl_module.domains,
                "layers": pl_module.moe_layer_names,
                "ngram_sizes": stats.ngram_sizes,
                **stats.state_dict(),
            },
            out / f"counts_step{step}.pt",
        )
        if self.train_counts:
            torch.save(
                {
                    "step": step,
                    "domains": pl_module.domains,
                    "layers": pl_module.moe_layer_names,
                    "train_steps": [s for s, _, _ in self.train_counts],
                    "counts": sum(c for _, c, _ in self.train_counts),
                    "tokens": sum(t for _, _, t in self.train_counts),
                },
                out / f"train_counts_step{step}.pt",
            )
        if not pl_module.run_config.metrics.plots:
            return

        path = self.run_dir / "plots" / f"heatmap_step{step}.png"
        figure = domain_expert_heatmaps(
            stats.counts.cpu().numpy(),
            pl_module.domains,
            pl_module.moe_layer_names,
            out_path=path,
            title=f"p(expert | domain), step {step}",
        )
        log_figure(trainer, "routing/heatmap", figure, path, step)


def log_figure(trainer, key: str, figure, path: Path, step: int) -> None:
    """Send a figure to the image-capable loggers (TensorBoard, W&B); CSV keeps only the PNG file."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure, global_step=step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
