"""Routing counts of a pretrained HF MoE on the domain mix (or any `data=` config), streamed.

The validation documents of each domain (the split testbed runs use, `testbed.data.prepare.mix_splits`)
are tokenized with the model's own tokenizer one document at a time, joined with the model's EOS token and
cut into sequences of `seq_len` + 1 tokens, at most `max_tokens_per_domain` tokens per domain: memory stays
bounded by one batch whatever the length of the documents. Every token keeps its document's domain label.
Batches take one sequence of each domain in turn (as the testbed's validation loader does). Counts go into
the testbed's `RoutingStats`, so every metric is computed by the same code as for testbed runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from testbed.data.prepare import mix_splits
from testbed.errors import DataError
from testbed.hf.capture import RouterHooks
from testbed.hf.load import HFModel
from testbed.metrics.stats import RoutingStats


def domain_sequences(data, domain_index: int, tokenizer, seq_len: int, max_tokens: int) -> Iterator[Tensor]:
    """Sequences [seq_len + 1] of one domain's validation documents, packed with the tokenizer's EOS between
    documents, until `max_tokens` predicted tokens (0: all)."""
    domain = data.domains[domain_index]
    validation = mix_splits(data)[domain].val
    eos = getattr(tokenizer, "eos_token_id", None)
    budget = math.ceil(max_tokens / seq_len) if max_tokens > 0 else None
    stream: list[int] = []
    emitted = 0
    for document in validation:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        while len(stream) >= seq_len + 1:
            yield torch.tensor(stream[: seq_len + 1], dtype=torch.long)
            stream = stream[seq_len:]
            emitted += 1
            if budget is not None and emitted >= budget:
                return


def interleaved_batches(
    data, tokenizer, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens [B, seq_len + 1], domain ids [B]): one sequence of each domain in turn until all are used."""
    streams = [domain_sequences(data, d, tokenizer, seq_len, max_tokens) for d in range(len(data.domains))]
    active = list(range(len(streams)))
    pending: list[tuple[Tensor, int]] = []
    while active:
        for d in list(active):
            sequence = next(streams[d], None)
            if sequence is None:
                active.remove(d)
                continue
            pending.append((sequence, d))
            if len(pending) == batch_size:
                yield torch.stack([s for s, _ in pending]), torch.tensor([d for _, d in pending])
                pending = []
    if pending:
        yield torch.stack([s for s, _ in pending]), torch.tensor([d for _, d in pending])


@dataclass
class MixResult:
    domains: list[str]
    layer_names: list[str]
    stats: RoutingStats
    loss_sums: Tensor
    token_counts: Tensor
    agreement: dict[str, float | None]
    extra: dict = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, float]:
        mean = self.loss_sums / self.token_counts.clamp_min(1)
        return {d: float(v) for d, v in zip(self.domains, mean, strict=True)}


@torch.no_grad()
def head_outputs(hf: HFModel, hidden: Tensor, targets: Tensor, chunk_tokens: int = 2048):
    """Per-token loss and correctness of the next-token prediction, the LM head applied in row chunks so that
    no [tokens, vocab] logits are held at once."""
    head = hf.model.get_output_embeddings()
    softcap = getattr(hf.model.config, "final_logit_softcapping", None)
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    losses, correct = [], []
    for start in range(0, flat.shape[0], chunk_tokens):
        logits = head(flat[start : start + chunk_tokens]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        target = flat_targets[start : start + chunk_tokens]
        losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        correct.append(logits.argmax(-1) == target)
    return torch.cat(losses), torch.cat(correct)


def decoder(hf: HFModel):
    """The model without its LM head (returns hidden states after the final norm)."""
    return getattr(hf.model, hf.model.base_model_prefix)


@torch.no_grad()
def analyze_mix(
    hf: HFModel,
    data,
    seq_len: int,
    batch_size: int = 8,
    max_tokens_per_domain: int = 8192,
    progress: bool = True,
) -> MixResult:
    """Stream the mix through the model, counting routing per MoE layer and the loss per domain."""
    vocab = hf.vocab_size
    domains = list(data.domains)
    hooks = RouterHooks(hf.model, hf.spec)
    if not hooks.routers:
        raise DataError(f"{hf.name}: no router modules found (looked for {hooks.spec.family.router})")
    stats = RoutingStats(len(hooks.routers), len(domains), hf.spec.num_experts, hf.device)
    loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=hf.device)
    token_counts = torch.zeros(len(domains), dtype=torch.long, device=hf.device)
    batch_routing: dict[int, object] = {}
    current: dict[str, object] = {}

    def count(layer, routing):  # kept until the batch's predictions are known, then counted at once
        batch_routing[layer] = routing

    hooks.on_routing = count
    total = math.ceil(max_tokens_per_domain / seq_len) * len(domains) if max_tokens_per_domain > 0 else None
    bar = _progress(progress, total, f"{hf.name}: routing the mix")
    tokens_seen = 0
    with hooks, bar:
        task = bar.add_task("sequences", total=total)
        for tokens, domain in interleaved_batches(
            data, hf.tokenizer, seq_len, batch_size, max_tokens_per_domain
        ):
            if int(tokens.max()) >= vocab:
                raise DataError(
                    f"token id {int(tokens.max())} is outside the model's vocabulary ({vocab}): "
                    "the tokenizer does not belong to this model"
                )
            tokens, domain = tokens.to(hf.device), domain.to(hf.device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            current["domain_ids"] = domain[:, None].expand_as(inputs).reshape(-1)
            current["shape"] = tuple(inputs.shape)
            hidden = decoder(hf)(input_ids=inputs).last_hidden_state
            loss, correct = head_outputs(hf, hidden, targets)
            # the same counting as the training callback and testbed-analyze (RoutingStats.add_batch)
            stats.add_batch(
                [batch_routing[layer] for layer in range(len(hooks.routers))],
                current["domain_ids"],
                current["shape"],
                correct=correct,
            )
            batch_routing.clear()
            loss_sums.index_add_(0, current["domain_ids"], loss.double())
            token_counts.index_add_(0, current["domain_ids"], torch.ones_like(current["domain_ids"]))
            tokens_seen += inputs.numel()
            bar.update(task, advance=len(tokens))
    if tokens_seen == 0:
        raise DataError(f"no validation sequence of {seq_len + 1} tokens in any domain; lower --seq-len")
    return MixResult(
        domains,
        hooks.layer_names,
        stats,
        loss_sums.cpu(),
        token_counts.cpu(),
        hooks.agreement(),
        {"tokens": tokens_seen, "seq_len": seq_len, "max_tokens_per_domain": max_tokens_per_domain},
    )


def _progress(enabled: bool, total, description: str):
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )
