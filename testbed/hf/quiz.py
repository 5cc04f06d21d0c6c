"""Chernov's (2025) quiz analysis of a pretrained HF MoE on MMLU-format CSV files, routing counted at the
answer position.

Prompt [defined here, the zero-shot MMLU prompt of Hendrycks et al.]: "The following are multiple choice
questions (with answers) about <subject>.\\n\\n<question>\\nA. <A>\\nB. <B>\\nC. <C>\\nD. <D>\\nAnswer:".
The answer position is the prompt's last token, whose output predicts the letter. Scoring: the logits of the
four letter tokens " A" .. " D" at that position; `accuracy` takes the highest (ties: the earlier letter), the
task `loss` is the mean over items of -log softmax over the four letters at the right one.

Per MoE layer [defined here, after Chernov 2025], from the routing of the answer positions:
- `dead_experts`: fraction of experts chosen for no item;
- `gate_entropy`: mean over items of H(p_t) / log E (the full router distribution);
- per-expert accuracy: accuracy over the items whose answer position was routed to the expert (each item
  counts for each of its K experts); `expert_accuracy_spread` / `_range`: std and max - min over the experts
  with at least one item.
`dead_experts_all_tokens` counts every prompt token instead (padding never counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from testbed.analysis.quiz import LETTERS, QuizItem, restrict
from testbed.hf.capture import RouterHooks
from testbed.hf.load import HFModel, HFModelError
from testbed.hf.mix import _progress, decoder
from testbed.metrics import specialization as S
from testbed.metrics.stats import RoutingStats
from testbed.plots import per_layer_curves, save_figure


def mmlu_prompt(item: QuizItem) -> str:
    subject = item.subject.replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, item.options, strict=True))
    return f"{header}{item.question}\n{options}\nAnswer:"


def right_padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded batch: (ids [B, W], attention mask [B, W])."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


def letter_token_ids(tokenizer) -> list[int]:
    """Ids of " A" .. " D", each a single token (true of byte-level BPE and SentencePiece vocabularies)."""
    ids = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"] for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise HFModelError(
            f"the tokenizer splits the answer letters into {ids} tokens; the quiz needs ' A' .. ' D' to be "
            "one token each"
        )
    return [i[0] for i in ids]


@dataclass
class HFQuizResult:
    layer_names: list[str]
    subjects: list[str]
    correct: np.ndarray  # [N] bool
    letter_logprob: np.ndarray  # [N, 4] log softmax over the four letters
    answer_stats: RoutingStats  # answer positions (subjects as domains)
    prompt_stats: RoutingStats  # every prompt token
    agreement: dict
    truncated: int

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def loss(self) -> float:
        answers = self.answers
        return float(-self.letter_logprob[np.arange(len(answers)), answers].mean())

    answers: np.ndarray = None  # [N] index of the right letter

    def per_layer(self) -> list[dict]:
        answer = self.answer_stats.state_dict()
        prompt = self.prompt_stats.state_dict()
        layers = []
        for layer in range(len(self.layer_names)):
            counts = answer["counts"][layer].numpy()
            routed = answer["accuracy_routed"][layer].numpy().astype(np.float64)
            right = answer["correct"][layer].numpy().astype(np.float64)
            std, spread = S.accuracy_spread(right, routed)
            load_all = prompt["counts"][layer].numpy().sum(0)
            layers.append(
                {
                    "dead_experts": S.dead_experts(counts),
                    "gate_entropy": S.gate_entropy(
                        float(answer["entropy_sums"][layer]), int(answer["tokens"][layer].sum())
                    ),
                    "utilization": S.utilization(counts),
                    "expert_accuracy_spread": std,
                    "expert_accuracy_range": spread,
                    "experts_with_items": int((routed > 0).sum()),
                    "dead_experts_all_tokens": S.dead_experts(load_all),
                    "gate_entropy_all_tokens": S.gate_entropy(
                        float(prompt["entropy_sums"][layer]), int(prompt["tokens"][layer].sum())
                    ),
                    "expert_load": counts.sum(0).tolist(),
                    "expert_load_all_tokens": load_all.tolist(),
                    "expert_items": routed.astype(int).tolist(),
                    "expert_accuracy": np.where(routed > 0, right / np.maximum(routed, 1), np.nan).tolist(),
                }
            )
        return layers


@torch.no_grad()
def evaluate_hf_quiz(
    hf: HFModel,
    items: list[QuizItem],
    batch_items: int = 8,
    max_length: int = 2048,
    excluded: Tensor | None = None,
    gate_scale: Tensor | None = None,
    progress: bool = False,
) -> HFQuizResult:
    """Score the items (right-padded batches) and count routing at the answer positions and over all prompt
    tokens, optionally under an intervention (`excluded`, `gate_scale`: see `families.route`)."""
    letters = torch.tensor(letter_token_ids(hf.tokenizer), device=hf.device)
    subjects = list(dict.fromkeys(item.subject for item in items))
    hooks = RouterHooks(hf.model, hf.spec, excluded=excluded, gate_scale=gate_scale)
    num_layers, num_experts = len(hooks.routers), hf.spec.num_experts
    if num_layers == 0:
        raise HFModelError(f"{hf.name}: no router modules found")
    answer_stats = RoutingStats(num_layers, len(subjects), num_experts, hf.device)
    prompt_stats = RoutingStats(num_layers, len(subjects), num_experts, hf.device)
    encoded, truncated = [], 0
    for item in items:
        ids = hf.tokenizer(mmlu_prompt(item), add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:  # keep the end: the options and "Answer:"
            ids, truncated = ids[-max_length:], truncated + 1
        encoded.append(ids)
    pad = hf.tokenizer.pad_token_id
    pad = pad if pad is not None else (hf.tokenizer.eos_token_id or 0)
    correct = np.zeros(len(items), dtype=bool)
    logprob = np.zeros((len(items), 4))
    current: dict = {}
    answer_routing: dict = {}

    def count(layer, routing):
        prompt_stats.update(layer, restrict(routing, current["real"]), current["subject_all"])
        at_answer = restrict(routing, current["answer"])
        answer_stats.update(layer, at_answer, current["subject"])
        answer_routing[layer] = at_answer

    hooks.on_routing = count
    bar = _progress(progress, len(items), f"{hf.name}: quiz")
    with hooks, bar:
        task = bar.add_task("items", total=len(items))
        for first in range(0, len(items), batch_items):
            batch = encoded[first : first + batch_items]
            ids, mask = right_padded(batch, pad)
            lengths = mask.sum(1)
            answer = torch.zeros_like(mask, dtype=torch.bool)
            answer[torch.arange(len(batch)), lengths - 1] = True
            subject = torch.tensor([subjects.index(i.subject) for i in items[first : first + len(batch)]])
            ids, mask, answer, subject = (t.to(hf.device) for t in (ids, mask, answer, subject))
            current.update(
                real=mask.bool().reshape(-1),
                answer=answer.reshape(-1),
                subject=subject,
                subject_all=subject[:, None].expand_as(mask)[mask.bool()],
            )
            hidden = decoder(hf)(input_ids=ids, attention_mask=mask).last_hidden_state
            at_answer = hidden[torch.arange(len(batch), device=hf.device), lengths.to(hf.device) - 1]
            logits = hf.model.get_output_embeddings()(at_answer).float()[:, letters]
            logp = torch.log_softmax(logits, dim=-1)
            truth = torch.tensor([i.answer for i in items[first : first + len(batch)]], device=hf.device)
            right = logits.argmax(-1) == truth
            for layer, routing in answer_routing.items():
                answer_stats.update_accuracy(layer, routing, right)
            correct[first : first + len(batch)] = right.cpu().numpy()
            logprob[first : first + len(batch)] = logp.cpu().numpy()
            bar.update(task, advance=len(batch))
    result = HFQuizResult(
        hooks.layer_names,
        subjects,
        correct,
        logprob,
        answer_stats,
        prompt_stats,
        hooks.agreement(),
        truncated,
    )
    result.answers = np.array([item.answer for item in items])
    return result


def quiz_payload(hf: HFModel, result: HFQuizResult, items: list[QuizItem]) -> dict:
    """quiz.json for a pretrained model (the layout of `testbed-quiz eval`, with an `hf` section)."""
    layers = result.per_layer()
    subject_of = np.array([result.subjects.index(i.subject) for i in items])
    return {
        "model": hf.name,
        "router": hf.spec.family.label,
        "top_k": hf.spec.top_k,
        "num_experts": hf.spec.num_experts,
        "items": len(items),
        "truncated_questions": result.truncated,
        "scoring": "letter logits at the answer position (MMLU zero-shot prompt)",
        "accuracy": result.accuracy,
        "loss": result.loss,
        "chance": 0.25,
        "per_subject": {
            s: {
                "items": int((subject_of == j).sum()),
                "accuracy": float(result.correct[subject_of == j].mean()),
            }
            for j, s in enumerate(result.subjects)
        },
        "layers": result.layer_names,
        "per_layer": dict(zip(result.layer_names, layers, strict=True)),
        "mean": {
            key: _nanmean([layer[key] for layer in layers])
            for key in ("dead_experts", "gate_entropy", "expert_accuracy_spread", "dead_experts_all_tokens")
        },
        "hf": {
            **hf.spec.describe(),
            "dtype": str(hf.dtype).removeprefix("torch."),
            "agreement": result.agreement,
        },
    }


def _nanmean(values) -> float:
    finite = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else float("nan")


def chernov_figures(payload: dict, out) -> list[str]:
    """Chernov's three per-layer figures: dead experts, gate entropy, per-expert accuracy (layer x expert)."""
    label = payload["router"]
    layers = [payload["per_layer"][name] for name in payload["layers"]]
    names = []
    for metric in ("dead_experts", "gate_entropy"):
        per_layer_curves(
            {label: [m[metric] for m in layers]},
            metric,
            out_path=out / f"{metric}.png",
            title=f"{metric} per layer (answer position)",
        )
        names.append(f"{metric}.png")
    accuracy = np.array([m["expert_accuracy"] for m in layers], dtype=np.float64)
    fig = Figure(
        figsize=(2.0 + 0.12 * accuracy.shape[1], 1.5 + 0.3 * accuracy.shape[0]), layout="constrained"
    )
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(accuracy), aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), payload["layers"])
    ax.set_title("per-expert accuracy (blank: no item)")
    fig.colorbar(image, ax=ax)
    save_figure(fig, out / "expert_accuracy.png")
    names.append("expert_accuracy.png")
    return names


def markdown(payload: dict) -> str:
    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"

    lines = [
        f"# Quiz of {payload['model']} ({payload['router']}, {payload['num_experts']} experts, "
        f"top-{payload['top_k']})",
        "",
        f"{payload['items']} items; accuracy {fmt(payload['accuracy'])} (chance 0.250), loss "
        f"{fmt(payload['loss'])} nats (over the four letters). Routing at the answer position.",
        "",
        "| layer | dead experts | gate entropy | experts with items | per-expert accuracy std | max−min "
        "| dead experts (all prompt tokens) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in payload["layers"]:
        m = payload["per_layer"][name]
        lines.append(
            f"| {name} | {fmt(m['dead_experts'])} | {fmt(m['gate_entropy'])} | {m['experts_with_items']} | "
            f"{fmt(m['expert_accuracy_spread'])} | {fmt(m['expert_accuracy_range'])} | "
            f"{fmt(m['dead_experts_all_tokens'])} |"
        )
    lines += ["", "| subject | items | accuracy |", "|---|---|---|"]
    lines += [f"| {s} | {r['items']} | {fmt(r['accuracy'])} |" for s, r in payload["per_subject"].items()]
    lines += [
        "",
        "Figures: dead_experts.png, gate_entropy.png, expert_accuracy.png. Definitions: testbed/hf/quiz.py.",
    ]
    return "\n".join(lines) + "\n"
