"""LightningModule: LM loss + weighted auxiliary losses, per-domain validation loss, optimizer schedule."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from testbed.config import RunConfig, plain
from testbed.errors import CheckpointError
from testbed.losses import AUX_LOSSES, BALANCE, AuxLoss, layer_loss_terms
from testbed.model import LayerRecord, MoETransformer
from testbed.model.lm_loss import linear_cross_entropy
from testbed.routing.base import Router
from testbed.scope import GlobalScopeState
from testbed.train.checkpoint import TrainingDiverged
from testbed.train.doc_bootstrap import DocumentLosses
from testbed.train.finetune import apply_finetune
from testbed.train.schedule import lr_factor
from testbed.train.sharding import shard_model

logger = logging.getLogger(__name__)


def build_losses(run: RunConfig) -> list[AuxLoss]:
    """The balancing method (unless it adds no term and keeps no state: `none`) followed by the auxiliary
    losses, in config order."""
    losses = []
    balance_cls, _ = BALANCE.get(run.balance.name)
    if balance_cls.adds_term or balance_cls.stateful:
        losses.append(balance_cls(run.balance))
    for name, options in run.aux_loss.items():
        loss_cls, _ = AUX_LOSSES.get(name)
        losses.append(loss_cls(options))
    return losses


def aux_loss_terms(per_layer: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Unweighted value of each loss, averaged over MoE layers (`per_layer`: one dict per layer)."""
    names = {name for terms in per_layer for name in terms}
    return {
        name: torch.stack([terms[name] for terms in per_layer if name in terms]).mean()
        for name in sorted(names)
    }


def model_loss_terms(
    model: MoETransformer,
    losses: list[AuxLoss],
    records: list[LayerRecord],
    input_ids: torch.Tensor,
    domain_ids: torch.Tensor | None = None,
    scope_state: GlobalScopeState | None = None,
    observe: bool = False,
) -> dict[str, torch.Tensor]:
    """Every loss on every MoE layer's record of one forward pass, averaged over layers: the model computes
    none of them itself. `scope_state` must be the one the forward pass saw. With `observe`, stateful losses
    (expert bias) also add each layer's load to their step statistics."""
    context = model.routing_context(input_ids, domain_ids, scope_state)
    per_layer = []
    for layer, record in zip(model.moe_layers, records, strict=True):
        layer_context = layer.layer_context(context)
        if observe:
            for loss in losses:
                if loss.stateful:
                    loss.observe(layer.moe_index, record.routing, layer_context)
        per_layer.append(layer_loss_terms(losses, record.routing, layer_context, record.expert_outputs))
    return aux_loss_terms(per_layer)


def numpy_rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]))


class NonFiniteGuard:
    """Remembers, on the device, the first training step whose loss terms were not all finite, and which term
    and value it was: no host sync per step. `check` reads it on the host (every log_every_n_steps steps
    and before each checkpoint) and raises TrainingDiverged."""

    def __init__(self):
        self.first_step: torch.Tensor | None = None  # -1: every step so far finite
        self.term: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.names: list[str] = []

    @torch.no_grad()
    def update(self, terms: dict[str, torch.Tensor], step: int) -> None:
        self.names = list(terms)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        bad = ~torch.isfinite(values)
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self.term = torch.zeros((), dtype=torch.long, device=values.device)
            self.value = torch.zeros((), dtype=torch.float32, device=values.device)
        new = (self.first_step < 0) & bad.any()
        index = bad.int().argmax()
        self.first_step = torch.where(new, torch.full_like(self.first_step, step), self.first_step)
        self.term = torch.where(new, index, self.term)
        # gather, not values[index]: a 0-dim index tensor used as a Python index is read on the host
        self.value = torch.where(new, values.gather(0, index.reshape(1)).reshape(()), self.value)

    def check(self, detected_at: int, checkpoint: str) -> None:
        if self.first_step is None or int(self.first_step) < 0:
            return
        step, term = int(self.first_step), self.names[int(self.term)]
        raise TrainingDiverged(
            f"training diverged: non-finite loss at step {step}: {term} = {float(self.value)} (the first "
            f"non-finite term of {self.names}; detected at step {detected_at}); "
            + (
                f"the last good checkpoint is kept ({checkpoint})"
                if checkpoint and Path(checkpoint).is_file()
                else "no checkpoint was written before it"
            )
            + "; lower optim.lr, raise optim.warmup_steps or set trainer.gradient_clip_val",
            step,
            term,
        )


def compile_blocks(model, backend: str) -> None:
    """torch.compile each transformer block, in place. Blocks share their code, so
    identical blocks reuse one compiled graph (compile time does not grow with depth), and each block is
    compiled with fullgraph=True, so a graph break is an error rather than a silent slowdown; routers
    that read the device on the host (`host_sync`, the balanced-assignment auction) compile with breaks."""
    for block in model.blocks:
        ffn_router = getattr(block.ffn, "router", None)
        block.compile(backend=backend, fullgraph=not getattr(ffn_router, "host_sync", False))


class MoELanguageModel(L.LightningModule):
    def __init__(self, run: RunConfig, domains: list[str]):
        super().__init__()
        self.run_config = run
        self.domains = list(domains)
        self.save_hyperparameters({"run": plain(run), "domains": self.domains})
        self.losses = build_losses(run)
        self.loss_coefficients = {loss.name: loss.coefficient for loss in self.losses}
        self.model = MoETransformer(run.model, run.router, num_domains=len(domains))
        if run.optim.router_init_scale != 1.0:  # the same draws, scaled: every other weight is unchanged
            with torch.no_grad():
                for name, parameter in self.model.named_parameters():
                    if ".router." in name:
                        parameter.mul_(run.optim.router_init_scale)
        self.masked_parameters = apply_finetune(self.model, run.finetune)
        self.routers = [m for m in self.model.modules() if isinstance(m, Router)]
        if run.trainer.compile:  # in place: parameter names (and checkpoints) stay the same
            compile_blocks(self.model, run.trainer.compile_backend)
        # Global balancing scope: running counts over the micro-batches of one optimizer step.
        self.scope_state = GlobalScopeState()
        self.tokens_seen = 0
        self.initial_metrics: dict[str, float] = {}  # init_from: the starting point's validation (init/...)
        self.batches_seen = 0  # micro-batches of this rank trained on: the data position when resuming
        self.nonfinite = NonFiniteGuard()
        self.checkpoint_path = "none saved yet"  # named by the divergence error
        self._resume_rng: dict | None = None  # RNG states from a checkpoint, restored when training starts
        self._checked_step = -1
        self.last_val_metrics: dict[str, float] = {}
        self.doc_losses: DocumentLosses | None = None  # per validation document (bootstrap interval)
        self.last_val_step = -1
        self.register_buffer(
            "val_loss_sums", torch.zeros(len(domains), dtype=torch.float64), persistent=False
        )
        self.register_buffer(
            "val_token_counts", torch.zeros(len(domains), dtype=torch.float64), persistent=False
        )

    def configure_model(self) -> None:
        """`trainer.strategy=fsdp2`: shard the model over the data-parallel mesh (set by the strategy);
        nothing for any other strategy."""
        mesh = self.device_mesh
        if mesh is not None:
            shard_model(self.model, mesh["data_parallel"])

    @property
    def data_parallel_size(self) -> int:
        """Processes training on distinct micro-batches (1 without a Trainer: the benchmarks)."""
        return self._trainer.world_size if self._trainer is not None else 1

    @property
    def moe_layer_names(self) -> list[str]:
        return [f"layer{layer.layer_index}" for layer in self.model.moe_layers]

    def forward(self, input_ids, domain_ids=None, **model_kwargs):
        """`MoETransformer.forward`, with its keyword-only arguments."""
        return self.model(input_ids, domain_ids, **model_kwargs)

    def lm_loss(
        self, input_ids, domain_ids, targets, scope_state: GlobalScopeState | None = None
    ) -> tuple[torch.Tensor, list[LayerRecord]]:
        """Mean next-token cross-entropy and the MoE layers' records; chunked (no [N, V] logits) unless
        `trainer.chunked_cross_entropy=false`."""
        targets = targets.reshape(-1)
        if self.run_config.trainer.chunked_cross_entropy:
            hidden, records = self.model(input_ids, domain_ids, scope_state=scope_state, return_hidden=True)
            return linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head.weight, targets), records
        logits, records = self.model(input_ids, domain_ids, scope_state=scope_state)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets), records

    def advance_scope(self, batch_idx: int) -> GlobalScopeState:
        """The global scope's running counts, started afresh at the first micro-batch of each optimizer step
        and advanced to this micro-batch otherwise."""
        if batch_idx % self.run_config.trainer.accumulate_grad_batches == 0:
            self.scope_state.start_step()
        else:
            self.scope_state.next_micro_batch()
        return self.scope_state

    def measures_routing(self, batch_idx: int) -> bool:
        """Whether this micro-batch's routing goes to the training-time specialization metrics: the first
        micro-batch of every `metrics.train_every_n_steps`-th optimizer step."""
        every = self.run_config.metrics.train_every_n_steps
        first = batch_idx % self.run_config.trainer.accumulate_grad_batches == 0
        return every > 0 and first and self.global_step % every == 0

    def calibrate_coefficients(self, terms: dict[str, torch.Tensor]) -> None:
        """`coefficient: auto` losses get w = 10^round(log10(target / |L|)) from the first batch (Guo et al.);
        one host read, once per run."""
        for loss in self.losses:
            if self.loss_coefficients.get(loss.name) == "auto" and loss.name in terms:
                value = loss.calibrate(float(terms[loss.name].detach()))
                self.loss_coefficients[loss.name] = value
                first = float(terms[loss.name].detach())
                logger.info("calibrated %s: first value %.4g -> coefficient %g", loss.name, first, value)

    def after_optimizer_step(self) -> None:
        """Stateful losses act once per optimizer step, outside autograd, on the step's statistics (expert
        bias: each MoE layer's router moves its `expert_bias` buffer); an optimizer step hook."""
        routers = [layer.router for layer in self.model.moe_layers]
        for loss in self.losses:
            if loss.stateful:
                loss.after_optimizer_step(routers)

    def set_router_step(self) -> None:
        """Routers that change with the step (router.hash_steps) read it here: a host integer, no sync."""
        for router in self.routers:
            router.step = self.global_step

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.set_router_step()

    def training_step(self, batch, batch_idx):
        ids, domains = batch["input_ids"], batch["domain_ids"]
        scope_state = self.advance_scope(batch_idx)
        lm_loss, records = self.lm_loss(ids, domains, batch["targets"], scope_state)
        terms = model_loss_terms(self.model, self.losses, records, ids, domains, scope_state, observe=True)
        self.calibrate_coefficients(terms)
        weighted = [
            self.loss_coefficients[name] * value
            for name, value in terms.items()
            if self.loss_coefficients[name]
        ]  # a zero-weight term is logged, kept out of the backward
        aux_total = sum(weighted, start=torch.zeros((), device=lm_loss.device))
        loss = lm_loss + aux_total
        self.tokens_seen += batch["input_ids"].numel() * self.data_parallel_size  # all ranks (same size)
        # not prog_bar: the bar would turn the loss into a Python float (a host sync) on every step;
        # the loggers read it only every log_every_n_steps
        self.batches_seen += 1
        # 1-based number of the optimizer step this micro-batch belongs to
        self.nonfinite.update({"lm_loss": lm_loss, **terms, "loss": loss}, self.global_step + 1)
        self.log("train/loss", loss)
        self.log("train/lm_loss", lm_loss)
        for name, value in terms.items():
            self.log(f"train/aux/{name}", value)
        # the records go to the metrics callback (on_train_batch_end) on measured micro-batches only
        measured = self.measures_routing(batch_idx)
        return {"loss": loss, "routing": records if measured else None, "routing_step": self.global_step}

    def check_finite(self) -> None:
        """Host read of the non-finite guard; raises TrainingDiverged naming the step and the term."""
        self.nonfinite.check(self.global_step, self.checkpoint_path)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """The guard is read every `trainer.log_every_n_steps` optimizer steps, when the loggers read the
        losses anyway (and before every checkpoint): a diverged run stops within that many steps."""
        step = self.global_step
        if step != self._checked_step and step % self.trainer.log_every_n_steps == 0:
            self._checked_step = step
            self.check_finite()

    # ------------------------------------------------------------------ resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What a resumed run needs beyond weights, optimizer, schedule and loop counters."""
        checkpoint["testbed"] = {
            "tokens_seen": self.tokens_seen,
            "batches_seen": self.batches_seen,
            # batches_seen and Lightning's loop counters are per rank and count micro-batches: a resumed run
            # continues the data and the accumulation only with the same layout
            "data_parallel_size": self.data_parallel_size,
            "accumulate_grad_batches": self.run_config.trainer.accumulate_grad_batches,
            "last_val_metrics": dict(self.last_val_metrics),
            "last_val_step": self.last_val_step,
            "initial_metrics": dict(self.initial_metrics),
            "loss_coefficients": dict(self.loss_coefficients),  # `auto` coefficients after calibration
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": numpy_rng_state(),  # as tensors and ints: the checkpoint loads with weights_only
                "python": random.getstate(),
            },
        }

    def check_same_layout(self, state: dict) -> None:
        """A checkpoint resumes on the number of processes and the gradient accumulation that wrote it (both
        are recorded in checkpoints written since this check; older ones pass): each rank's data position and
        Lightning's step boundaries are counted in its own micro-batches."""
        now = {
            "data_parallel_size": self.data_parallel_size,
            "accumulate_grad_batches": self.run_config.trainer.accumulate_grad_batches,
        }
        differing = {k: (state[k], v) for k, v in now.items() if k in state and state[k] != v}
        if differing:
            got = ", ".join(f"{k} {new} (the checkpoint's: {old})" for k, (old, new) in differing.items())
            raise CheckpointError(
                f"resume: this run has {got}; resume with the checkpoint's number of processes "
                "(trainer.devices x trainer.num_nodes) and trainer.accumulate_grad_batches, since each "
                "rank's position in the data is counted in its own micro-batches"
            )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("testbed", {})
        self.check_same_layout(state)
        self.tokens_seen = state.get("tokens_seen", 0)
        self.batches_seen = state.get("batches_seen", 0)
        self.last_val_metrics = dict(state.get("last_val_metrics", {}))
        self.last_val_step = state.get("last_val_step", -1)
        self.loss_coefficients.update(state.get("loss_coefficients", {}))
        self._resume_rng = state.get("rng")

    def on_train_start(self) -> None:
        """RNG states of the checkpoint, set once the data loaders are ready, right before the first step."""
        rng, self._resume_rng = self._resume_rng, None
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            set_numpy_rng_state(rng["numpy"])
            random.setstate(rng["python"])

    def on_validation_epoch_start(self) -> None:
        self.set_router_step()
        self.val_loss_sums.zero_()
        self.val_token_counts.zero_()
        self.doc_losses = DocumentLosses.for_validation(self)

    def validation_outputs(self, batch) -> tuple[torch.Tensor, list[LayerRecord], torch.Tensor]:
        """One validation batch: per-token loss [T], the MoE layers' records and whether each token's
        next-token prediction was right [T] (the validation loop and testbed-analyze share it)."""
        logits, records = self.model(batch["input_ids"], batch["domain_ids"])
        targets = batch["targets"].reshape(-1)
        flat = logits.flatten(0, 1)
        token_loss = F.cross_entropy(flat.float(), targets, reduction="none")
        return token_loss, records, flat.argmax(-1) == targets

    def validation_step(self, batch, batch_idx):
        token_loss, records, correct = self.validation_outputs(batch)
        self.add_validation_loss(batch, token_loss)
        # to the metrics callback (on_validation_batch_end), which counts the routing
        return {"routing": records, "correct": correct}

    def add_validation_loss(self, batch, token_loss: torch.Tensor) -> None:
        domains = batch["domain_ids"].reshape(-1)
        self.val_loss_sums.index_add_(0, domains, token_loss.double())
        self.val_token_counts.index_add_(0, domains, torch.ones_like(token_loss, dtype=torch.float64))
        if self.doc_losses is not None:
            self.doc_losses.add(batch["input_ids"], batch["domain_ids"][:, 0], token_loss)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self.val_loss_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self.val_token_counts, reduce_op="sum")
        per_domain = (sums / counts.clamp_min(1)).cpu().tolist()
        metrics = {
            f"val/loss/{d}": v
            for d, v, c in zip(self.domains, per_domain, counts.tolist(), strict=True)
            if c > 0
        }
        if metrics:
            metrics["val/loss"] = sum(metrics.values()) / len(metrics)  # domains weighted equally
            if self.doc_losses is not None:
                metrics.update(self.doc_losses.bootstrap(seed=self.global_step))
        self.doc_losses = None
        self.log_dict(metrics, sync_dist=False)
        self.last_val_metrics = metrics
        self.last_val_step = self.global_step

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer, since with fp16's
        gradient scaler the fused step unscales the gradients itself. bf16-mixed has no scaler: the
        gradients are already true values, so they are clipped here directly (norm over all parameters,
        no host sync).
        fp16-mixed + fused + clipping is refused by the config check (TrainerConfig.validate)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused") and scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if str(gradient_clip_algorithm or "norm") == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg, max_steps = self.run_config.optim, self.run_config.trainer.max_steps
        masked = {id(p) for p in self.masked_parameters}  # partially frozen expert banks: no decay
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        router = [(n, p) for n, p in trainable if ".router." in n]
        rest = [(n, p) for n, p in trainable if ".router." not in n]
        decay = [p for n, p in rest if p.ndim >= 2 and "embed" not in n and id(p) not in masked]
        no_decay = [p for n, p in rest if p.ndim < 2 or "embed" in n or id(p) in masked]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if router:  # own group: its learning rate scale and weight decay are options (optim.router_*)
            groups.append(
                {
                    "params": [p for _, p in router],
                    "weight_decay": cfg.weight_decay if cfg.router_weight_decay else 0.0,
                    "lr": cfg.lr * cfg.router_lr_scale,
                }
            )
        optimizer = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=self.run_config.trainer.fused_optimizer or None,
        )

        def schedule(step: int) -> float:  # linear warmup, then cosine to min_lr_ratio
            return lr_factor(step, max_steps, cfg.warmup_steps, cfg.min_lr_ratio)

        def router_schedule(step: int) -> float:  # frozen from optim.router_freeze_step on: lr 0, no decay
            frozen = cfg.router_freeze_step is not None and step >= cfg.router_freeze_step
            return 0.0 if frozen else schedule(step)

        if any(loss.stateful for loss in self.losses):  # expert bias: after every optimizer step
            optimizer.register_step_post_hook(lambda *_: self.after_optimizer_step())
        lambdas = [schedule] * (len(groups) - 1) + [router_schedule if router else schedule]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
