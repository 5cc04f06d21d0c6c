"""How often each expert of a pretrained HF MoE is chosen, counted on held-out text until the count is stable.

Rules [defined here]:
- counted positions: every position of the sequences given (padding excluded by the attention mask). The
  default sample is held-out text: the validation documents of a data config (`mix_splits`, the split the
  testbed holds out), each domain tokenized one document at a time with the model's tokenizer, joined with
  its EOS token and cut into sequences of `seq_len` tokens; batches take one sequence of each domain in turn,
  so every prefix of the stream is balanced over the domains.
- per layer and expert: `load` = assignments (each token adds one per chosen expert), `mass` = the sum over
  tokens of the router distribution p_t (softmax, or the normalized sigmoid for sigmoid routers).
- never used: load 0. Stability: after the first `start_tokens` tokens, and then each time the count has
  doubled since the last look, the never-used set of every layer is compared with the one of the last look;
  the count stops when no layer's set changed over that doubling (`stable`), when `max_tokens` is reached or
  when the text runs out (then `stable` is false and the report says why).
- streaming: per batch only the forward pass lives; the counter keeps [L, E] loads and masses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from testbed.data.prepare import mix_splits
from testbed.errors import DataError
from testbed.hf.capture import RouterHooks
from testbed.hf.families import Choice
from testbed.hf.load import HFModel, HFModelError


@dataclass
class UsageCount:
    """Loads [L, E] (assignments) and masses [L, E] (summed p_t) of a counted sample."""

    layer_names: list[str]
    load: Tensor
    mass: Tensor
    tokens: int = 0
    history: list[dict] = field(default_factory=list)
    stable: bool = False
    stop: str = ""
    source: str = ""
    agreement: dict = field(default_factory=dict)  # per layer: reconstructed == the model's own choice

    def never_used(self) -> list[list[int]]:
        return [torch.nonzero(row == 0).flatten().tolist() for row in self.load]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "tokens": self.tokens,
            "stable": self.stable,
            "stopped": self.stop,
            "never_used": dict(zip(self.layer_names, self.never_used(), strict=True)),
            "history": self.history,
            "selection_agreement": self.agreement,
        }


def decoder_of(model):
    """The model without its LM head (the hidden states after the final norm)."""
    return getattr(model, model.base_model_prefix)


def text_batches(data, tokenizer, seq_len: int, batch_size: int) -> Iterator[Tensor]:
    """[B, seq_len] token batches of the held-out documents of `data`, one sequence of each domain in turn,
    tokenized lazily (one document at a time)."""
    splits = mix_splits(data)
    eos = getattr(tokenizer, "eos_token_id", None)

    def sequences(domain: str) -> Iterator[Tensor]:
        stream: list[int] = []
        for document in splits[domain].val:
            stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
            while len(stream) >= seq_len:
                yield torch.tensor(stream[:seq_len], dtype=torch.long)
                stream = stream[seq_len:]

    streams = [sequences(domain) for domain in data.domains]
    pending: list[Tensor] = []
    while streams:
        for stream in list(streams):
            sequence = next(stream, None)
            if sequence is None:
                streams.remove(stream)
                continue
            pending.append(sequence)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
    if pending:
        yield torch.stack(pending)


@torch.no_grad()
def count_usage(
    hf: HFModel,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    start_tokens: int = 8192,
    max_tokens: int = 1 << 20,
    grow: bool = True,
    source: str = "",
) -> UsageCount:
    """Count expert usage over `batches` (token ids [B, T], or (ids, attention mask)); with `grow`, stop as
    soon as the never-used sets are stable over a doubling (module docstring), else count every batch."""
    hooks = RouterHooks(hf.model, hf.spec)
    if not hooks.routers:
        raise HFModelError(f"{hf.name}: no router modules found")
    num_layers, num_experts = len(hooks.routers), hf.spec.num_experts
    load = torch.zeros(num_layers, num_experts, dtype=torch.long)
    mass = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    current: dict[str, Tensor | None] = {"rows": None}

    def on_choice(layer: int, logits: Tensor, choice: Choice) -> None:
        rows = current["rows"]
        indices, probs = choice.indices, choice.probs
        if rows is not None:
            rows = rows.to(indices.device)
            indices, probs = indices[rows], probs[rows]
        load[layer] += torch.bincount(indices.reshape(-1), minlength=num_experts).cpu()
        mass[layer] += probs.double().sum(0).cpu()

    hooks.on_choice = on_choice
    count = UsageCount(hooks.layer_names, load, mass, source=source)
    with hooks:
        _count(hf, count, batches, current, grow, start_tokens, max_tokens)
    count.agreement = hooks.agreement()
    if count.tokens == 0:
        raise DataError("no token to count: the sample is empty (lower --count-seq-len or give more text)")
    return count


def _count(hf: HFModel, count: UsageCount, batches, current: dict, grow: bool, start: int, cap: int) -> None:
    """The loop of `count_usage`: forward passes (the hooks count), looks at the never-used sets."""
    last: list[frozenset] | None = None
    next_look = start
    body = decoder_of(hf.model)
    for batch in batches:
        ids, mask = batch if isinstance(batch, tuple) else (batch, None)
        ids = ids.to(hf.device)
        if int(ids.max()) >= hf.vocab_size:
            raise DataError(
                f"token id {int(ids.max())} is outside the model's vocabulary ({hf.vocab_size}): the "
                "tokenizer does not belong to this model"
            )
        current["rows"] = None if mask is None else mask.reshape(-1).bool()
        kwargs = {} if mask is None else {"attention_mask": mask.to(hf.device)}
        body(input_ids=ids, **kwargs)
        count.tokens += int(ids.numel() if mask is None else mask.sum())
        if grow and count.tokens >= next_look:
            never = [frozenset(e) for e in count.never_used()]
            count.history.append({"tokens": count.tokens, "never_used": [len(s) for s in never]})
            if last is not None and never == last:
                count.stable, count.stop = True, "stable over a doubling"
                return
            last, next_look = never, 2 * count.tokens
        if grow and count.tokens >= cap:
            count.stop = f"token cap ({cap}) reached before the never-used sets were stable"
            return
    if not grow:
        count.stop = "every position of the sample counted"
        return
    if count.tokens and (not count.history or count.history[-1]["tokens"] != count.tokens):
        count.history.append({"tokens": count.tokens, "never_used": [len(s) for s in count.never_used()]})
    count.stop = "the text ran out before the never-used sets were stable"
