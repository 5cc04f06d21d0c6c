"""`testbed-analyze ... --peers [LIST]`: the peer analyses (testbed/analysis/peers.py) on a testbed
checkpoint, their command-line options, and the report both paths write (peers.json, peers.md and one
figure per analysis, testbed/analysis/peer_plots.py). The pretrained Hugging Face path is testbed/hf/peers.py.

On a testbed checkpoint the counting pass runs the model's forward on the validation set (the batches
`testbed-analyze` evaluates) and reads each MoE layer's `.routing` and `.expert_outputs` from the records
the forward returns. Interventions (ablation, forcing) act on the routers:
- ablation, router with a selection bias (top-k softmax, sigmoid): the expert's bias is -inf, so it leaves
  the top-k and the next expert takes its place, gates computed as the router computes them (renormalized
  when the router renormalizes); any other router (expert choice, hash, oracle, Sinkhorn, ...): the expert's
  assignments get gate 0, and when the router's gates of a token sum to 1 the remaining ones are
  renormalized to sum to 1 again;
- forcing: every token of the layer goes to the one expert, with the sum of its original gates (so the
  routed output keeps its scale), capacity off for that layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from testbed.analysis.peer_plots import peer_figures
from testbed.analysis.peers import (
    COUNTING,
    PEER_ANALYSES,
    PeerCollector,
    json_ready,
    loss_table_summary,
    parse_peers,
)
from testbed.data.loading import SHIPPED_TOKENIZER
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import ConfigError, TestbedError
from testbed.routing.base import Routing
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel

# ----------------------------------------------------------------------------------------------- options


def _peers_value(value: str) -> list[str]:
    try:
        return parse_peers(value)
    except ValueError as err:
        hint = (
            " (a bare --peers takes the next word as its list: put it after the overrides)"
            if "=" in value
            else ""
        )
        raise argparse.ArgumentTypeError(f"{err}{hint}") from None


def add_peer_options(parser: argparse.ArgumentParser) -> None:
    """The options of the peer analyses (`--peers` and its settings) on `testbed-analyze`'s parser."""
    group = parser.add_argument_group("analyses of other MoE studies (docs/peers.md)")
    group.add_argument(
        "--peers",
        nargs="?",
        const="all",
        type=_peers_value,
        metavar="LIST",
        help=f"also run these analyses: all (the default when no list is given) or a comma list of "
        f"{', '.join(PEER_ANALYSES)}; writes peers.json, peers.md and peers_*.png/pdf into --out. Put it "
        "after the overrides, or give a list (a bare --peers takes the next word as its list)",
    )
    group.add_argument(
        "--compare",
        help="agreement: the second checkpoint (run dir or .ckpt; with --hf a model id or directory) of the "
        "same model, routed on the same tokens",
    )
    group.add_argument(
        "--ablation-tokens-per-domain",
        type=int,
        default=1024,
        help="ablation and forcing: tokens per domain of the loss measured under each of the L x E "
        "interventions (default 1024; 0: every counted token)",
    )
    group.add_argument(
        "--ablate-layers",
        help="ablation and forcing: comma list of layer names (layer3,layer7; default every MoE layer)",
    )
    group.add_argument("--peer-top", type=int, default=10, help="rows of every top list (default 10)")
    group.add_argument(
        "--peer-min-count",
        type=int,
        default=5,
        help="occurrences a token type (or an expert pair) needs to be ranked by lift or counted in the "
        "vocabulary share (default 5)",
    )


def selected(args, comparing: bool) -> list[str]:
    """The analyses to run: agreement needs --compare (left out of `all` without it, an error when named)."""
    analyses = list(args.peers)
    if "agreement" in analyses and not comparing:
        if len(analyses) == len(PEER_ANALYSES):  # `all`
            analyses.remove("agreement")
        else:
            raise ConfigError(
                "--peers agreement", None, "--compare with a second checkpoint of the same model"
            )
    if args.ablation_tokens_per_domain < 0 or args.peer_top < 1 or args.peer_min_count < 1:
        raise ConfigError(
            "--ablation-tokens-per-domain / --peer-top / --peer-min-count",
            [args.ablation_tokens_per_domain, args.peer_top, args.peer_min_count],
            "tokens >= 0, top >= 1, min count >= 1",
        )
    return analyses


def ablated_layers(value: str | None, layer_names: Sequence[str]) -> list[int]:
    """Indices (into the MoE layers) of the `--ablate-layers` names; every layer when None."""
    if not value:
        return list(range(len(layer_names)))
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in layer_names]
    if unknown:
        raise ConfigError("--ablate-layers", unknown, f"names of MoE layers: {list(layer_names)}")
    return [list(layer_names).index(n) for n in names]


# ------------------------------------------------------------------------------------------------ report


def write_peer_report(out: Path, payload: dict) -> list[str]:
    """peers.json (every number to 8 significant digits, NaN as null, compact: E x E tables of every layer
    make it large for big models), peers.md and the figures; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    clean = json_ready(payload, digits=8)
    (out / "peers.json").write_text(json.dumps(clean, separators=(",", ":")) + "\n")
    figures = peer_figures(clean, out)
    (out / "peers.md").write_text(markdown(clean, figures))
    return ["peers.json", "peers.md", *figures]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(payload: dict, figures: Sequence[str] = ()) -> str:
    """A short summary: one table per analysis, layer by layer."""
    lines = [f"# Peer analyses of {payload.get('model')}", ""]
    lines += [f"Layers: {', '.join(payload['layers'])}; domains: {', '.join(payload['domains'])}.", ""]
    if payload.get("coactivation"):
        lines += [
            "## Expert co-activation",
            "",
            "| layer | top pair (count) | P(j given i) | lift |",
            "|---|---|---|---|",
        ]
        for name, layer in payload["coactivation"].items():
            best = (layer["top_pairs"]["by_count"] or [None])[0]
            if best:
                lines.append(
                    f"| {name} | {best['experts']} | {_fmt(best['p_j_given_i'])} | {_fmt(best['lift'])} |"
                )
        lines.append("")
    if payload.get("tokens"):
        lines += [
            "## Token specialisation",
            "",
            "| layer | types mostly on one expert | mean top-expert share | K/E |",
            "|---|---|---|---|",
        ]
        for name, layer in payload["tokens"]["layers"].items():
            v = layer["vocabulary"]
            lines.append(
                f"| {name} | {_fmt(v.get('share_types_mostly_one_expert'))} | "
                f"{_fmt(v.get('mean_concentration'))} | {_fmt(v.get('uniform_concentration'))} |"
            )
        lines.append("")
    if payload.get("cross_layer"):
        lines += ["## Cross-layer paths", "", "| pair | determinism | top-1 determinism |", "|---|---|---|"]
        for name, pair in payload["cross_layer"].items():
            lines.append(
                f"| {name} | {_fmt(pair['assignments'].get('determinism'))} | "
                f"{_fmt(pair['top1'].get('determinism'))} |"
            )
        lines.append("")
    if payload.get("agreement"):
        lines += [
            "## Router agreement",
            "",
            "| layer | same set | overlap | same top-1 |",
            "|---|---|---|---|",
        ]
        for name, layer in payload["agreement"]["layers"].items():
            lines.append(
                f"| {name} | {_fmt(layer['exact'])} | {_fmt(layer['overlap'])} | {_fmt(layer['top1'])} |"
            )
        lines.append("")
    for kind, heading in (("ablation", "Single-expert ablation"), ("forcing", "Expert forcing")):
        if payload.get(kind):
            table = payload[kind]
            lines += [
                f"## {heading}",
                "",
                f"Baseline loss {table['baseline_mean']:.4f} nats/token ({table['method']}).",
                "",
                "| layer | expert | mean loss change |",
                "|---|---|---|",
            ]
            lines += [f"| {e['layer']} | {e['expert']} | {e['delta_mean']:+.4f} |" for e in table["top"]]
            lines.append("")
    if payload.get("contribution"):
        lines += [
            "## Expert-output contribution",
            "",
            "| layer | top-1 share | cosine(top-1, mixture) | relative error |",
            "|---|---|---|---|",
        ]
        for name, layer in payload["contribution"].items():
            lines.append(
                f"| {name} | {_fmt(layer['top1_share'])} | {_fmt(layer['top1_cosine'])} | "
                f"{_fmt(layer['top1_relative_error'])} |"
            )
        lines.append("")
    if figures:
        lines += ["Figures: " + ", ".join(f for f in figures if f.endswith(".png")) + " (and PDF).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ testbed checkpoints


class ExpertOutputs:
    """Context manager: per MoE layer, the expert outputs [A, d] of the last forward, read from the expert
    bank's return value. Used when the layer records carry no `expert_outputs`."""

    def __init__(self, layers):
        self.layers, self.outputs, self.handles = list(layers), {}, []

    def __enter__(self) -> ExpertOutputs:
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.experts.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                self.outputs[index] = output[1]

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def of(self, index: int, record) -> torch.Tensor | None:
        outputs = getattr(record, "expert_outputs", None)
        return outputs if outputs is not None else self.outputs.get(index)


def subset_batches(batches: Iterable[dict], num_domains: int, tokens_per_domain: int) -> list[dict]:
    """Batches from the start of `batches` until every domain has `tokens_per_domain` tokens (0: all)."""
    taken, seen = [], torch.zeros(num_domains, dtype=torch.long)
    for batch in batches:
        taken.append(batch)
        seen += torch.bincount(batch["domain_ids"].reshape(-1).cpu(), minlength=num_domains)
        if tokens_per_domain > 0 and bool((seen >= tokens_per_domain).all()):
            break
    return taken


@torch.no_grad()
def domain_losses(model, batches: Sequence[dict], num_domains: int, device) -> np.ndarray:
    """[D] mean next-token loss per domain (nats/token) of a testbed model on `batches`; NaN for a domain
    without tokens."""
    sums = torch.zeros(num_domains, dtype=torch.float64)
    counts = torch.zeros(num_domains, dtype=torch.float64)
    for batch in batches:
        ids, domains = batch["input_ids"].to(device), batch["domain_ids"].to(device)
        logits, _ = model(ids, domains)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].to(device).reshape(-1), reduction="none"
        )
        flat = domains.reshape(-1).cpu()
        sums.index_add_(0, flat, loss.double().cpu())
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).numpy()


def _gate_zero(expert: int):
    """Router hook: the expert's assignments get gate 0 (not kept); a token's remaining gates are
    renormalized when the router's gates of every routed token summed to 1."""

    def hook(module, inputs, routing: Routing) -> Routing:
        kept = (
            routing.kept
            if routing.kept is not None
            else torch.ones_like(routing.expert_index, dtype=torch.bool)
        )
        weight = routing.weight * kept
        total = torch.zeros(routing.num_tokens, dtype=torch.float32, device=weight.device)
        total.index_add_(0, routing.token_index, weight.float())
        routed = total > 0
        renormalizes = bool(((total - 1).abs() < 1e-4)[routed].all()) if routed.any() else False
        off = routing.expert_index == expert
        weight = weight.masked_fill(off, 0)
        if renormalizes:
            left = torch.zeros_like(total).index_add_(0, routing.token_index, weight.float())
            weight = weight / left.clamp_min(1e-30)[routing.token_index].to(weight.dtype)
        return replace(routing, weight=weight, kept=kept & ~off)

    return hook


def _forced(expert: int):
    """Router hook: every token goes to `expert` alone, gated by the sum of its original (kept) gates."""

    def hook(module, inputs, routing: Routing) -> Routing:
        num_tokens = routing.num_tokens
        weight = routing.weight * routing.kept_as(routing.weight.dtype)
        total = torch.zeros(num_tokens, dtype=weight.dtype, device=weight.device).index_add_(
            0, routing.token_index, weight
        )
        token_index = torch.arange(num_tokens, device=weight.device)
        per_expert = torch.zeros_like(routing.tokens_per_expert)
        per_expert[expert] = num_tokens
        return Routing(
            logits=routing.logits,
            probs=routing.probs,
            token_index=token_index,
            expert_index=torch.full_like(token_index, expert),
            weight=total,
            tokens_per_expert=per_expert,
            slot_index=torch.zeros_like(token_index),
        )

    return hook


def ablation_method(layer) -> str:
    router = layer.router
    selects = router.supports_expert_bias and router.token_choice and not router.hash_stage
    if selects and router.top_k < router.num_experts:
        return "selection: the expert's bias is -inf, the next-best expert takes its place"
    return (
        "gate zero: the expert's assignments get gate 0, the others renormalized if the router renormalizes"
    )


@contextlib.contextmanager
def intervention(kind: str, layer, expert: int):
    """Within the block, `layer` (a testbed MoE layer) has `expert` ablated or forced (module docstring)."""
    router = layer.router
    if kind == "ablation" and ablation_method(layer).startswith("selection"):
        saved = router.expert_bias.clone()
        router.expert_bias[expert] = float("-inf")
        try:
            yield
        finally:
            router.expert_bias.copy_(saved)
        return
    handle = router.register_forward_hook(_gate_zero(expert) if kind == "ablation" else _forced(expert))
    capacity = layer.capacity_factor
    if kind == "forcing":
        layer.capacity_factor = None
    try:
        yield
    finally:
        handle.remove()
        layer.capacity_factor = capacity


@torch.no_grad()
def checkpoint_peers(
    module,
    batches: Iterable[dict],
    analyses: Sequence[str],
    *,
    other=None,
    decode: Callable[[list[int]], list[str]] | None = None,
    ablation_tokens_per_domain: int = 1024,
    ablate_layers: str | None = None,
    top: int = 10,
    min_count: int = 5,
    token_budget: int = 2**27,
) -> dict:
    """The selected analyses on a testbed model (`MoELanguageModel`) over `batches` (dicts of input_ids,
    domain_ids and targets [B, S]; re-iterable, e.g. a DataLoader: ablation and forcing read its first
    batches again, up to `ablation_tokens_per_domain` tokens per domain, and hold only those);
    `other`: the second checkpoint's module for agreement."""
    model = module.model.eval()
    device = next(model.parameters()).device
    layers = model.moe_layers
    names, domains = list(module.moe_layer_names), list(module.domains)
    num_experts = model.config.moe.num_experts
    payload: dict = {
        "analyses": list(analyses),
        "domains": domains,
        "layers": names,
        "num_experts": num_experts,
        "top_k": getattr(layers[0].router.config, "top_k", None),
    }
    counting = [a for a in analyses if a in COUNTING or a == "agreement"]
    if counting:
        collector = PeerCollector(
            counting, len(layers), num_experts, len(domains), model.config.vocab_size, device, token_budget
        )
        if other is not None:
            other.model.eval()
        with ExpertOutputs(layers) as captured:
            for batch in batches:
                ids, domain_ids = batch["input_ids"].to(device), batch["domain_ids"].to(device)
                collector.begin_batch(
                    ids.reshape(-1), batch["targets"].to(device).reshape(-1), domain_ids.reshape(-1)
                )
                _, records = model(ids, domain_ids)
                for index, record in enumerate(records):
                    collector.layer(index, record.routing)
                    outputs = captured.of(index, record)
                    if outputs is not None:
                        collector.contribute(index, record.routing, outputs)
                if other is not None:
                    _, other_records = other.model(ids, domain_ids)
                    for index, (a, b) in enumerate(zip(records, other_records, strict=True)):
                        collector.compare(index, a.routing, b.routing)
                collector.end_batch()
        payload["tokens_counted"] = collector.num_tokens
        payload |= collector.summary(names, domains, decode, top, min_count)
    if any(a in analyses for a in ("ablation", "forcing")):
        chosen = ablated_layers(ablate_layers, names)
        subset = subset_batches(batches, len(domains), ablation_tokens_per_domain)  # a second pass
        baseline = domain_losses(model, subset, len(domains), device)
        tokens = sum(int(b["input_ids"].numel()) for b in subset)
        for kind in ("ablation", "forcing"):
            if kind not in analyses:
                continue
            losses = np.zeros((len(chosen), num_experts, len(domains)))
            for row, index in enumerate(chosen):
                for expert in range(num_experts):
                    with intervention(kind, layers[index], expert):
                        losses[row, expert] = domain_losses(model, subset, len(domains), device)
            method = (
                ablation_method(layers[0])
                if kind == "ablation"
                else ("every token to the one expert, gated by the sum of its original gates")
            )
            payload[kind] = loss_table_summary(
                kind, baseline, losses, domains, [names[i] for i in chosen], top
            ) | {
                "method": method,
                "tokens": tokens,
                "tokens_per_domain": ablation_tokens_per_domain,
            }
    return payload


def tokenizer_decoder(run, datamodule=None) -> Callable[[list[int]], list[str]]:
    tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
        run.data.tokenizer or SHIPPED_TOKENIZER
    )
    return lambda ids: [tokenizer.decode([i]) for i in ids]


def load_other(path: Path, overrides, resolve_checkpoint, load_run, module, device):
    """The `--compare` checkpoint as a module on `device`; it must have the MoE layers and experts of
    `module`."""
    checkpoint = resolve_checkpoint(Path(path))
    run = load_run(checkpoint, list(overrides))
    other = MoELanguageModel(run, list(module.domains))
    load_weights(other, checkpoint, what="testbed-analyze --compare")
    mine, theirs = module.model, other.model
    if (
        len(mine.moe_layers) != len(theirs.moe_layers)
        or mine.config.moe.num_experts != theirs.config.moe.num_experts
    ):
        raise ConfigError(
            "--compare",
            str(path),
            f"a checkpoint of the same model ({len(mine.moe_layers)} MoE layers of "
            f"{mine.config.moe.num_experts} experts)",
        )
    return other.to(device)


def run_checkpoint_peers(args, module, datamodule, out: Path, resolve_checkpoint, load_run) -> int:
    """`testbed-analyze <run> --peers ...` after the standard report: the peer analyses on the validation
    batches; exit code 2 with the message on a bad option or checkpoint."""
    try:
        analyses = selected(args, args.compare is not None)
        device = next(module.parameters()).device
        other = None
        if "agreement" in analyses:
            other = load_other(args.compare, args.overrides, resolve_checkpoint, load_run, module, device)
        payload = {
            "model": str(args.checkpoint),
            "model_label": f"testbed ({module.run_config.router.name})",
            "router": module.run_config.router.name,
            **checkpoint_peers(
                module,
                datamodule.val_dataloader(),
                analyses,
                other=other,
                decode=tokenizer_decoder(module.run_config, datamodule),
                ablation_tokens_per_domain=args.ablation_tokens_per_domain,
                ablate_layers=args.ablate_layers,
                top=args.peer_top,
                min_count=args.peer_min_count,
            ),
        }
        if other is not None:
            payload["agreement"]["checkpoint_b"] = str(args.compare)
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = write_peer_report(out, payload)
    print(f"wrote {out}/{', '.join(files)}")
    return 0
