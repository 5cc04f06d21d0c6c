"""Lightning callbacks: specialization metrics from streaming routing counters at each validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from testbed.metrics.stats import RoutingStats
from testbed.metrics.summary import spec_metrics


class SpecializationMetrics(L.Callback):
    """Fills on-device routing counters during validation, then logs the SPEC metrics.

    Keys: `spec/<metric>/layer<i>` and `spec/<metric>/mean`. The layer x domain x expert count table
    of each validation is saved to `<run_dir>/routing/counts_step<N>.pt` for plots and re-analysis.
    """

    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        num_experts = pl_module.run_config.model.moe.num_experts
        stats = RoutingStats(
            len(pl_module.model.moe_layers), len(pl_module.domains), num_experts, pl_module.device
        )
        pl_module.routing_stats = stats

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        stats: RoutingStats = pl_module.routing_stats
        pl_module.routing_stats = None
        if stats is None or trainer.sanity_checking:
            return
        for name in ("counts", "prob_sums", "entropy_sums", "tokens", "dropped"):
            setattr(stats, name, trainer.strategy.reduce(getattr(stats, name), reduce_op="sum"))
        metrics = spec_metrics(stats, pl_module.moe_layer_names)
        pl_module.log_dict(metrics)
        self.last_metrics = metrics
        if self.run_dir is not None and trainer.is_global_zero:
            out = self.run_dir / "routing"
            out.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "step": trainer.global_step,
                    "domains": pl_module.domains,
                    "layers": pl_module.moe_layer_names,
                    **stats.state_dict(),
                },
                out / f"counts_step{trainer.global_step}.pt",
            )
