"""The peer analyses (testbed/analysis/peers.py) on a pretrained Hugging Face MoE, over the same domain mix
and budget as `testbed-analyze --hf` (testbed/hf/mix.py's batches: one sequence of each domain in turn).

- Routing is read by `RouterHooks` (testbed/hf/capture.py): each layer's choice recomputed from its router
  logits as the family routes, the same `Routing` that fills the count tables of the standard report.
- Expert outputs (contribution): a forward hook on each MoE block's `experts` module sees the hidden states,
  the chosen experts [T, K] and the gates [T, K] the block passes it, and calls the module once per slot k
  with that slot's expert and gate 1, which gives the ungated output o_{t,k} of every chosen expert (every
  supported family's experts module takes (hidden, indices, weights)). Shared experts are not included.
- Ablation: `RouterHooks(excluded=...)`, the intervention of testbed/hf/families.py: the expert leaves the
  selection, the best K among the others are chosen, and the gates are computed as the family computes them
  (renormalized over the chosen experts where the family renormalizes, scaled where it scales).
- Forcing: a router hook replaces the model's choice: every token's first slot holds the forced expert with
  the sum of the token's gates, the other slots keep distinct experts at gate 0.
Interventions need routers that return their choice (transformers >= 5).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from testbed.analysis.peer_runs import ablated_layers, selected, write_peer_report
from testbed.analysis.peers import COUNTING, PeerCollector, loss_table_summary
from testbed.errors import DataError
from testbed.hf.capture import RouterHooks, find_routers
from testbed.hf.load import HFModel, HFModelError, load_hf_model
from testbed.hf.mix import decoder, head_outputs, interleaved_batches


def experts_modules(model, spec) -> list[torch.nn.Module]:
    """The `experts` module beside each router (same order as `find_routers`)."""
    modules = []
    for name, _ in _router_names(model, spec):
        parent = name.rsplit(".", 1)[0]
        try:
            modules.append(model.get_submodule(f"{parent}.experts"))
        except AttributeError as err:
            raise HFModelError(
                f"{parent}: no `experts` module beside the router; contribution unsupported"
            ) from err
    return modules


def _router_names(model, spec) -> list[tuple[str, torch.nn.Module]]:
    by_module = {id(m): n for n, m in model.named_modules()}
    return [(by_module[id(module)], module) for _, module in find_routers(model, spec)]


class ExpertSlots:
    """Context manager: per MoE layer, the last batch's (indices [T, K], gates [T, K], ungated outputs
    [T, K, d]) of the routed experts, recomputed slot by slot from the experts module's own inputs."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules, self.handles, self.captured = modules, [], {}

    def __enter__(self) -> ExpertSlots:
        for layer, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if len(inputs) < 3:
                raise HFModelError(
                    f"MoE layer {layer}: the experts module was called without (hidden, indices, weights) "
                    "as positional arguments; contribution is not supported for this transformers version"
                )
            hidden, indices, weights = inputs[0], inputs[1], inputs[2]
            ones = torch.ones_like(weights[:, :1])
            slots = [module.forward(hidden, indices[:, k : k + 1], ones) for k in range(indices.shape[1])]
            self.captured[layer] = (indices.clone(), weights.clone(), torch.stack(slots, dim=1))

        return hook


def _force(expert: int):
    """Router hook: slot 0 of every token holds `expert` with the sum of the token's gates, the other slots
    distinct experts at gate 0 (the expert, if chosen already, swaps places with slot 0's)."""

    def hook(module, inputs, output):
        if not isinstance(output, tuple | list) or len(output) < 3:
            raise HFModelError("forcing needs a router that returns its choice (transformers>=5)")
        weights, indices = output[1], output[2]
        top_k = indices.shape[-1]
        idx = indices.reshape(-1, top_k).clone()
        gates = weights.reshape(-1, top_k)
        hit = idx == expert
        slot = torch.where(hit.any(-1), hit.float().argmax(-1), torch.zeros_like(idx[:, 0]))
        idx.scatter_(1, slot[:, None], idx[:, :1].clone())
        idx[:, 0] = expert
        forced = torch.zeros_like(gates)
        forced[:, 0] = gates.sum(-1)
        return (output[0], forced.reshape(weights.shape), idx.reshape(indices.shape), *output[3:])

    return hook


def _progress(enabled: bool, description: str) -> Progress:
    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled
    )


@torch.no_grad()
def domain_losses(hf: HFModel, batches: list[tuple[Tensor, Tensor]], num_domains: int) -> np.ndarray:
    """[D] mean next-token loss per domain (nats/token) on the token batches (tokens [B, S+1], domain [B])."""
    sums = torch.zeros(num_domains, dtype=torch.float64, device=hf.device)
    counts = torch.zeros(num_domains, dtype=torch.float64, device=hf.device)
    for tokens, domain in batches:
        tokens, domain = tokens.to(hf.device), domain.to(hf.device)
        hidden = decoder(hf)(input_ids=tokens[:, :-1]).last_hidden_state
        loss, _ = head_outputs(hf, hidden, tokens[:, 1:])
        flat = domain[:, None].expand(-1, tokens.shape[1] - 1).reshape(-1)
        sums.index_add_(0, flat, loss.double())
        counts.index_add_(0, flat, torch.ones_like(loss, dtype=torch.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).cpu().numpy()


def _check_tokens(hf: HFModel, tokens: Tensor) -> None:
    if int(tokens.max()) >= hf.vocab_size:
        raise DataError(
            f"token id {int(tokens.max())} is outside the vocabulary of {hf.name} ({hf.vocab_size}): the "
            "tokenizer does not belong to this model"
        )


@torch.no_grad()
def hf_peers(
    hf: HFModel,
    data,
    seq_len: int,
    batch_size: int,
    max_tokens_per_domain: int,
    analyses,
    *,
    other: HFModel | None = None,
    ablation_tokens_per_domain: int = 1024,
    ablate_layers: str | None = None,
    top: int = 10,
    min_count: int = 5,
    token_budget: int = 2**27,
    progress: bool = False,
) -> dict:
    """The selected analyses on `hf` over the mix `data` (the `data=` config of testbed-analyze); `other`:
    the second checkpoint for agreement (routed on the same tokens, tokenized with `hf`'s tokenizer)."""
    domains = list(data.domains)
    hooks = RouterHooks(hf.model, hf.spec)
    if not hooks.routers:
        raise DataError(f"{hf.name}: no router modules found (looked for {hf.spec.family.router})")
    names, num_experts = hooks.layer_names, hf.spec.num_experts
    payload: dict = {
        "analyses": list(analyses),
        "domains": domains,
        "layers": names,
        "num_experts": num_experts,
        "top_k": hf.spec.top_k,
        "seq_len": seq_len,
        "max_tokens_per_domain": max_tokens_per_domain,
    }
    counting = [a for a in analyses if a in COUNTING or a == "agreement"]
    if counting:
        payload |= _counting_pass(
            hf,
            data,
            seq_len,
            batch_size,
            max_tokens_per_domain,
            counting,
            other,
            top,
            min_count,
            token_budget,
            progress,
        )
    interventions = [a for a in ("ablation", "forcing") if a in analyses]
    if interventions:
        chosen = ablated_layers(ablate_layers, names)
        batches = list(
            interleaved_batches(data, hf.tokenizer, seq_len, batch_size, ablation_tokens_per_domain)
        )
        if not batches:
            raise DataError(f"no validation sequence of {seq_len + 1} tokens in any domain; lower --seq-len")
        for tokens, _ in batches:
            _check_tokens(hf, tokens)
        baseline = domain_losses(hf, batches, len(domains))
        routers = [module for _, module in hooks.routers]
        for kind in interventions:
            losses = np.zeros((len(chosen), num_experts, len(domains)))
            with _progress(progress, f"{hf.name}: {kind}") as bar:
                task = bar.add_task(kind, total=len(chosen) * num_experts)
                for row, layer in enumerate(chosen):
                    for expert in range(num_experts):
                        losses[row, expert] = _intervened_losses(
                            hf, kind, layer, expert, batches, routers, domains
                        )
                        bar.update(task, advance=1)
            method = (
                "selection: the expert leaves the top-k, gates as the family computes them"
                if kind == "ablation"
                else "every token to the one expert, gated by the sum of its original gates"
            )
            payload[kind] = loss_table_summary(
                kind, baseline, losses, domains, [names[i] for i in chosen], top
            ) | {
                "method": method,
                "tokens": sum(int(t[:, :-1].numel()) for t, _ in batches),
                "tokens_per_domain": ablation_tokens_per_domain,
            }
    return payload


def _intervened_losses(hf, kind, layer, expert, batches, routers, domains) -> np.ndarray:
    if kind == "ablation":
        excluded = torch.zeros(len(routers), hf.spec.num_experts, dtype=torch.bool, device=hf.device)
        excluded[layer, expert] = True
        try:
            with RouterHooks(hf.model, hf.spec, excluded=excluded):
                return domain_losses(hf, batches, len(domains))
        except RuntimeError as err:  # a router that returns logits only (transformers 4); others propagate
            if "transformers>=5" not in str(err):
                raise
            raise HFModelError(str(err)) from err
    handle = routers[layer].register_forward_hook(_force(expert))
    try:
        return domain_losses(hf, batches, len(domains))
    finally:
        handle.remove()


def _counting_pass(
    hf, data, seq_len, batch_size, budget, analyses, other, top, min_count, token_budget, progress
) -> dict:
    domains = list(data.domains)
    hooks = RouterHooks(hf.model, hf.spec)
    num_layers, num_experts = len(hooks.routers), hf.spec.num_experts
    collector = PeerCollector(
        analyses, num_layers, num_experts, len(domains), hf.vocab_size, hf.device, token_budget
    )
    slots = ExpertSlots(experts_modules(hf.model, hf.spec)) if "contribution" in analyses else None
    other_hooks = None
    if other is not None:
        other_hooks = RouterHooks(other.model, other.spec)
        if len(other_hooks.routers) != num_layers or other.spec.num_experts != num_experts:
            raise HFModelError(
                f"--compare {other.name}: {len(other_hooks.routers)} MoE layers of {other.spec.num_experts} "
                f"experts, not {num_layers} of {num_experts}: not a checkpoint of the same model"
            )
    routings: dict[int, object] = {}

    def count(layer, routing):
        collector.layer(layer, routing)
        routings[layer] = routing

    hooks.on_routing = count
    other_routings: dict[int, object] = {}
    if other_hooks is not None:
        other_hooks.on_routing = lambda layer, routing: other_routings.__setitem__(layer, routing)
    with (
        hooks,
        slots or nullcontext(),
        other_hooks or nullcontext(),
        _progress(progress, f"{hf.name}: peers") as bar,
    ):
        task = bar.add_task("sequences", total=None)
        for tokens, domain in interleaved_batches(data, hf.tokenizer, seq_len, batch_size, budget):
            _check_tokens(hf, tokens)
            tokens, domain = tokens.to(hf.device), domain.to(hf.device)
            inputs = tokens[:, :-1]
            domain_ids = domain[:, None].expand_as(inputs).reshape(-1)
            collector.begin_batch(inputs.reshape(-1), tokens[:, 1:].reshape(-1), domain_ids)
            decoder(hf)(input_ids=inputs)
            if slots is not None:
                for layer, (indices, weights, outputs) in slots.captured.items():
                    num_tokens, k = indices.shape
                    collector.contribution.update(
                        layer,
                        torch.arange(num_tokens, device=indices.device).repeat_interleave(k),
                        indices.reshape(-1).long(),
                        weights.reshape(-1).float(),
                        outputs.reshape(num_tokens * k, -1),
                        num_tokens,
                    )
                slots.captured.clear()
            if other is not None:
                if int(tokens.max()) >= other.vocab_size:
                    raise DataError(
                        f"--compare {other.name}: token ids beyond its vocabulary ({other.vocab_size})"
                    )
                decoder(other)(input_ids=inputs.to(other.device))
                for layer in range(num_layers):
                    b = other_routings[layer]
                    collector.compare(layer, routings[layer], b)
                other_routings.clear()
            routings.clear()
            collector.end_batch()
            bar.update(task, advance=len(tokens))
    if collector.num_tokens == 0:
        raise DataError(f"no validation sequence of {seq_len + 1} tokens in any domain; lower --seq-len")
    tokenizer = hf.tokenizer
    decode = (lambda ids: [tokenizer.decode([i]) for i in ids]) if tokenizer is not None else None
    out = {"tokens_counted": collector.num_tokens}
    out |= collector.summary(hooks.layer_names, domains, decode, top, min_count)
    if other is not None:
        out["agreement"]["checkpoint_b"] = other.name
    return out


def run_hf_peers(args, hf: HFModel, data, seq_len: int, budget: int, out) -> list[str]:
    """`testbed-analyze --hf MODEL --peers ...` after the standard report; returns the files written."""
    analyses = selected(args, args.compare is not None)
    other = (
        load_hf_model(args.compare, args.device, args.dtype, args.tokenizer)
        if "agreement" in analyses
        else None
    )
    payload = {
        "model": hf.name,
        "model_label": hf.spec.family.label,
        "hf": hf.spec.describe(),
        **hf_peers(
            hf,
            data,
            seq_len,
            args.batch_size,
            budget,
            analyses,
            other=other,
            ablation_tokens_per_domain=args.ablation_tokens_per_domain,
            ablate_layers=args.ablate_layers,
            top=args.peer_top,
            min_count=args.peer_min_count,
            progress=not args.no_progress,
        ),
    }
    return write_peer_report(out, payload)
