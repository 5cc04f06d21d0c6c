"""`testbed-intervene prune|reweight (--hf MODEL | CHECKPOINT) [--quiz FILES]`: Chernov's (2025) two suggested
interventions, on a pretrained HF MoE or a testbed checkpoint, with the quiz task's loss and accuracy before
and after and a bootstrap interval of the effect.

Rules [defined here]:
- prune, pretrained HF model: the experts never chosen on the counted positions are removed from the model:
  weights, router rows and the config's expert count (testbed/hf/prune.py: the same number per layer, and
  per group for grouped routers), and with `--out` the pruned model is saved there in its own format
  (safetensors, with its tokenizer), loadable with `AutoModelForCausalLM.from_pretrained`. Counted positions
  (`--positions`): `text` (default) every position of held-out text (the validation documents of `--text`,
  default the default data config), grown by doublings from `--count-start-tokens` until the never-used set
  of every layer is unchanged over a doubling (testbed/hf/count.py; at most `--max-count-tokens`); `all`
  every token of the quiz prompts. The pruned model is used at every position, as counted. `answer` counts
  the answer positions only (Chernov's count) and removes the experts from the selection at the answer
  positions only (the gates computed as the model computes them), so counting and removal again use the
  same positions; it writes no checkpoint, since a checkpoint removes experts at every position.
- prune, testbed checkpoint: every token of the quiz's cloze rows is counted, and the never-used experts are
  masked from the selection at every token (the router's selection bias), as counted.
- reweight: the items are split in two by subject (a seeded permutation per subject, `--select-fraction`
  to the selection split). On the selection split, in each layer, the `--top` experts (default: the model's
  K) with the highest per-expert accuracy among the experts with at least `--min-items` items (ties: more
  items, then the lower id) are chosen; their combine weight is multiplied by `--scale` (default 2)
  whenever they are chosen (selection and the other gates unchanged, nothing renormalized). Before and after
  are scored on the other split only.
- effect: after - before of the mean task loss and of the accuracy over the scored items, with a paired
  bootstrap 95% interval (percentiles of `--bootstrap` resamples of the items, seeded by `--seed`).
Task loss and accuracy: HF models as in testbed/hf/quiz.py (letters at the answer position); testbed
checkpoints as in `testbed-quiz eval` (cloze scoring), loss = mean -log softmax over the four options' sums.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from testbed.analysis.analyze import load_run, resolve_checkpoint
from testbed.analysis.quiz import (
    QuizError,
    choose,
    compose_data,
    encode_items,
    evaluate_quiz,
    load_quiz,
    load_tokenizer_of,
    score_items,
)
from testbed.errors import TestbedError
from testbed.hf.capture import RouterHooks
from testbed.hf.count import UsageCount, count_usage, decoder_of, text_batches
from testbed.hf.load import DEVICE_MAPS, HFModel, load_hf_model
from testbed.hf.prune import check_out_dir, check_routing, plan_pruning, prune_model, save_pruned
from testbed.hf.quiz import evaluate_hf_quiz, mmlu_prompt, right_padded
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel

DESCRIPTION = (
    "Chernov's (2025) two interventions on a quiz task, on a pretrained Hugging Face MoE (--hf) or a testbed "
    "checkpoint: prune removes the experts never chosen on held-out text and writes the pruned model to "
    "--out; reweight scales the gates of the experts most accurate on one half of the items and is scored "
    "on the other half. Both report the task loss and accuracy before and after, with a bootstrap 95% "
    "interval of the effect."
)
CHECK_TOKENS = 16384  # tokens of the counted sample on which the pruned routing is compared


def best_experts(accuracy, items, top: int, min_items: int) -> list[int]:
    """The `top` experts with the highest accuracy among those with >= min_items items (ties: more items,
    then the lower id)."""
    accuracy, items = np.asarray(accuracy, dtype=np.float64), np.asarray(items)
    eligible = [e for e in range(len(items)) if items[e] >= min_items and not math.isnan(accuracy[e])]
    return sorted(sorted(eligible, key=lambda e: (-accuracy[e], -items[e], e))[:top])


def masks_from_layers(
    per_layer: list[dict], num_experts: int, action: str, args
) -> tuple[torch.Tensor, list]:
    """[L, E] excluded (prune) or gate scale (reweight) from a baseline's per-layer tables, and the experts
    per layer that the intervention touches."""
    touched = []
    if action == "prune":
        mask = torch.zeros(len(per_layer), num_experts, dtype=torch.bool)
        for layer, table in enumerate(per_layer):
            dead = [e for e, load in enumerate(table["load"]) if load == 0]
            mask[layer, dead] = True
            touched.append(dead)
        return mask, touched
    scale = torch.ones(len(per_layer), num_experts)
    for layer, table in enumerate(per_layer):
        best = best_experts(table["accuracy"], table["items"], args.top, args.min_items)
        scale[layer, best] = args.scale
        touched.append(best)
    return scale, touched


def check_prune(mask: torch.Tensor, top_k: int, names: list[str]) -> None:
    for layer, row in enumerate(mask):
        if int((~row).sum()) < top_k:
            raise QuizError(
                f"{names[layer]}: pruning {int(row.sum())} never-activated experts leaves "
                f"{int((~row).sum())}, fewer than the model's top-k ({top_k}); count more tokens "
                "(--positions text or all) or more items"
            )


def split_items(items, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(selection, scoring) item indices: per subject a seeded permutation, the first round(fraction x n)
    (at least one, and at least one left) to selection."""
    rng = np.random.default_rng(seed)
    selection, scoring = [], []
    by_subject: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_subject.setdefault(item.subject, []).append(index)
    for indices in by_subject.values():
        order = [indices[i] for i in rng.permutation(len(indices))]
        if len(order) < 2:
            scoring += order
            continue
        cut = min(max(1, round(fraction * len(order))), len(order) - 1)
        selection += order[:cut]
        scoring += order[cut:]
    if not selection or not scoring:
        raise QuizError(
            f"{len(items)} quiz items cannot be split into a selection and a scoring half; reweight needs at "
            "least two items of one subject"
        )
    return sorted(selection), sorted(scoring)


def bootstrap_effect(before: np.ndarray, after: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean of after - before over items, with the 2.5 and 97.5 percentiles of its paired bootstrap."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"estimate": float(diff.mean()), "ci95": [float(low), float(high)]}


def effect(before: dict, after: dict, args) -> dict:
    """Effect on the mean loss and the accuracy (per-item arrays `item_loss`, `item_correct`)."""
    return {
        "loss": bootstrap_effect(before["item_loss"], after["item_loss"], args.bootstrap, args.seed),
        "accuracy": bootstrap_effect(
            before["item_correct"], after["item_correct"], args.bootstrap, args.seed
        ),
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "paired": "items"},
    }


def summary(scores: dict) -> dict:
    return {k: scores[k] for k in ("loss", "accuracy", "items")}


# ------------------------------------------------------------------------------------------ pretrained HF


def hf_scores(hf: HFModel, items, args, **intervention) -> dict:
    result = evaluate_hf_quiz(hf, items, args.batch_items, progress=not args.no_progress, **intervention)
    item_loss = -result.letter_logprob[np.arange(len(items)), result.answers]
    return {
        "loss": result.loss,
        "accuracy": result.accuracy,
        "items": len(items),
        "item_loss": item_loss,
        "item_correct": result.correct.astype(np.float64),
        "result": result,
    }


class AnswerPositions:
    """A forward pre-hook on the decoder: the flattened [B x T] mask of each batch's answer positions (the
    last real token of each right-padded row), for an intervention at those positions only."""

    def __init__(self, model):
        self.mask: torch.Tensor | None = None
        self.handle = decoder_of(model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        attention = kwargs.get("attention_mask")
        rows, width = ids.shape
        lengths = attention.sum(1) if attention is not None else torch.full((rows,), width, device=ids.device)
        mask = torch.zeros(rows, width, dtype=torch.bool, device=ids.device)
        mask[torch.arange(rows, device=ids.device), lengths - 1] = True
        self.mask = mask.reshape(-1)

    def __call__(self) -> torch.Tensor:
        return self.mask

    def remove(self) -> None:
        self.handle.remove()


def quiz_batches(hf: HFModel, items, batch_items: int):
    """(ids, attention mask) batches of the quiz prompts, right-padded."""
    encoded = [hf.tokenizer(mmlu_prompt(item), add_special_tokens=True)["input_ids"] for item in items]
    pad = hf.tokenizer.pad_token_id
    pad = pad if pad is not None else (hf.tokenizer.eos_token_id or 0)
    for first in range(0, len(encoded), batch_items):
        yield right_padded(encoded[first : first + batch_items], pad)


class Recorded:
    """An iterable that passes batches through and keeps the first `limit` tokens' worth of them."""

    def __init__(self, batches, limit: int):
        self.batches, self.limit, self.kept, self.tokens = batches, limit, [], 0

    def __iter__(self):
        for batch in self.batches:
            if self.tokens < self.limit:
                ids, mask = batch if isinstance(batch, tuple) else (batch, None)
                self.kept.append(batch)
                self.tokens += int(ids.numel() if mask is None else mask.sum())
            yield batch


def count_hf(hf: HFModel, items, args) -> tuple[UsageCount, list]:
    """The usage count of the prune rule's positions, and a sample of its batches for the routing check."""
    if args.positions == "all":
        recorded = Recorded(quiz_batches(hf, items, args.batch_items), CHECK_TOKENS)
        count = count_usage(hf, recorded, grow=False, source=f"every token of {len(items)} quiz prompts")
        return count, recorded.kept
    data = compose_data(args.text or [])
    limit = getattr(hf.model.config, "max_position_embeddings", None) or 512
    seq_len = args.count_seq_len or min(512, limit)
    if seq_len > limit:
        raise QuizError(f"--count-seq-len {seq_len}: the model takes at most {limit} positions")
    recorded = Recorded(text_batches(data, hf.tokenizer, seq_len, args.count_batch_size), CHECK_TOKENS)
    source = (
        f"held-out text: validation documents of {', '.join(data.domains)} "
        f"({' '.join(args.text or []) or 'default data config'}), sequences of {seq_len} tokens"
    )
    count = count_usage(hf, recorded, args.count_start_tokens, args.max_count_tokens, True, source)
    return count, recorded.kept


def prune_hf(hf: HFModel, items, args) -> dict:
    result: dict = {"positions": args.positions}
    if args.positions == "answer":
        before = hf_scores(hf, items, args)
        layers = before["result"].per_layer()
        tables = [{"load": m["expert_load"]} for m in layers]
        mask, touched = masks_from_layers(tables, hf.spec.num_experts, "prune", args)
        names = before["result"].layer_names
        check_prune(mask, hf.spec.top_k, names)
        answers = AnswerPositions(hf.model)
        try:
            with RouterHooks(hf.model, hf.spec, excluded=mask.to(hf.device), where=answers):
                after = hf_scores(hf, items, args)
        finally:
            answers.remove()
        result |= {
            "layers": names,
            "experts": dict(zip(names, touched, strict=True)),
            "before": before,
            "after": after,
            "checkpoint": None,
            "note": "answer positions: the experts are left out of the selection at the answer positions "
            "only, at run time; no checkpoint is written (a checkpoint removes experts at every position)",
        }
        return result
    if args.out is not None:
        check_out_dir(args.out, hf.source)
    count, sample = count_hf(hf, items, args)
    plan = plan_pruning(hf.spec, count.layer_names, count.load, count.mass)
    result |= {"layers": count.layer_names, "count": count.describe(), "plan": plan.describe()}
    if plan.removed_per_layer == 0:
        raise QuizError(
            f"nothing to prune: {plan.rule}, limited by {plan.limited_by} (never-used per layer: "
            f"{[len(n) for n in count.never_used()]} after {count.tokens} tokens)"
        )
    result["experts"] = dict(zip(plan.layer_names, plan.pruned, strict=True))
    if items:
        result["before"] = hf_scores(hf, items, args)
    result["routing_check"] = check_routing(hf, plan, sample, CHECK_TOKENS)
    pruned = prune_model(hf, plan)
    if items:
        result["after"] = hf_scores(hf, items, args)
    result["parameters"] = {
        "before": pruned.parameters_before,
        "after": pruned.parameters_after,
        "removed": pruned.parameters_removed,
    }
    result["checkpoint"] = save_pruned(hf, args.out, pruned) if args.out is not None else None
    return result


def reweight_hf(hf: HFModel, items, args) -> dict:
    select, score = split_items(items, args.select_fraction, args.seed)
    chosen = hf_scores(hf, [items[i] for i in select], args)
    layers = chosen["result"].per_layer()
    tables = [{"accuracy": m["expert_accuracy"], "items": m["expert_items"]} for m in layers]
    scale, touched = masks_from_layers(tables, hf.spec.num_experts, "reweight", args)
    scored = [items[i] for i in score]
    before = hf_scores(hf, scored, args)
    after = hf_scores(hf, scored, args, gate_scale=scale.to(hf.device))
    names = chosen["result"].layer_names
    return {
        "layers": names,
        "experts": dict(zip(names, touched, strict=True)),
        "splits": split_report(items, select, score, args),
        "before": before,
        "after": after,
    }


def split_report(items, select, score, args) -> dict:
    return {
        "seed": args.seed,
        "select_fraction": args.select_fraction,
        "selection": {
            "items": len(select),
            "used_for": "choosing the experts (per-expert accuracy and items)",
            "rows": [f"{items[i].source}:{items[i].row}" for i in select],
        },
        "scoring": {"items": len(score), "used_for": "the loss and accuracy before and after"},
    }


def run_hf(args, items) -> dict:
    hf = load_hf_model(args.hf, args.device, args.dtype, args.tokenizer, args.revision, args.device_map)
    if args.top is None:
        args.top = hf.spec.top_k
    family = hf.spec.family.label
    result = prune_hf(hf, items, args) if args.action == "prune" else reweight_hf(hf, items, args)
    return {"model": hf.name, "family": family, **result}


# ------------------------------------------------------------------------------------- testbed checkpoint


def own_task(module, tokenizer, items, batch_items: int, device) -> dict:
    """Loss, accuracy and per-item values of a testbed model on the items, cloze-scored as `testbed-quiz
    eval` does."""
    subjects = list(dict.fromkeys(item.subject for item in items))
    encoded, _ = encode_items(tokenizer, items, subjects, module.run_config.model.max_seq_len)
    model = module.model

    def hidden_states(ids, domains, **packing):  # the model up to its final norm: the LM head comes after
        return model(ids, domains, **packing, return_hidden=True)

    domain_of_subject = [module.domains.index(s) if s in module.domains else None for s in subjects]
    logprob, _ = score_items(
        hidden_states, encoded, None, batch_items, domain_of_subject, device, head=model.lm_head
    )
    answers = np.array([item.answer for item in items])
    normalized = torch.log_softmax(torch.from_numpy(logprob), dim=-1).numpy()
    item_loss = -normalized[np.arange(len(items)), answers]
    item_correct = (choose(logprob) == answers).astype(np.float64)
    return {
        "loss": float(item_loss.mean()),
        "accuracy": float(item_correct.mean()),
        "items": len(items),
        "item_loss": item_loss,
        "item_correct": item_correct,
    }


def _tables(baseline: dict) -> list[dict]:
    return [
        {
            "load": baseline["per_layer"][n]["expert_load"],
            "accuracy": baseline["per_layer"][n]["expert_accuracy"],
            "items": baseline["per_layer"][n]["expert_items"],
        }
        for n in baseline["layers"]
    ]


def run_own(args, items) -> dict:
    checkpoint = resolve_checkpoint(args.checkpoint)
    run = load_run(checkpoint, [])
    module = MoELanguageModel(run, list(run.data.domains))
    load_weights(module, checkpoint, what="testbed-intervene")
    module.to(args.device).eval()
    tokenizer = load_tokenizer_of(run)
    if args.top is None:
        args.top = run.router.top_k
    layers = module.model.moe_layers
    num_experts = run.model.moe.num_experts
    result: dict = {"model": str(checkpoint), "family": f"testbed ({run.router.name})"}
    if args.action == "prune":  # counted on every token of the cloze rows, masked at every token
        baseline = evaluate_quiz(module, tokenizer, items, args.batch_items, args.device)
        names = baseline["layers"]
        mask, touched = masks_from_layers(_tables(baseline), num_experts, "prune", args)
        scored = items
        before = own_task(module, tokenizer, scored, args.batch_items, args.device)
        routers = [layer.router for layer in layers]
        if not all(r.supports_expert_bias for r in routers):
            raise QuizError(
                f"router {run.router.name!r} has no selection bias to mask experts with; prune works with "
                "the routers that support expert bias: topk_softmax, sigmoid"
            )
        check_prune(mask, routers[0].top_k, names)
        saved = [r.expert_bias.clone() for r in routers]
        try:  # the selection-only bias: -inf keeps an expert out of the top-k, gates unchanged
            for router, row in zip(routers, mask, strict=True):
                router.expert_bias.masked_fill_(row.to(router.expert_bias.device), float("-inf"))
            after = own_task(module, tokenizer, scored, args.batch_items, args.device)
        finally:
            for router, bias in zip(routers, saved, strict=True):
                router.expert_bias.copy_(bias)
        result["positions"] = "every token of the quiz's cloze rows (counted and masked)"
    else:
        select, score = split_items(items, args.select_fraction, args.seed)
        baseline = evaluate_quiz(module, tokenizer, [items[i] for i in select], args.batch_items, args.device)
        names = baseline["layers"]
        mask, touched = masks_from_layers(_tables(baseline), num_experts, "reweight", args)
        scored = [items[i] for i in score]
        before = own_task(module, tokenizer, scored, args.batch_items, args.device)
        handles = [
            layer.router.register_forward_hook(_scale_hook(row.to(args.device)))
            for layer, row in zip(layers, mask, strict=True)
        ]
        try:
            after = own_task(module, tokenizer, scored, args.batch_items, args.device)
        finally:
            for handle in handles:
                handle.remove()
        result["splits"] = split_report(items, select, score, args)
    return result | {
        "layers": names,
        "experts": dict(zip(names, touched, strict=True)),
        "before": before,
        "after": after,
    }


def _scale_hook(scale: torch.Tensor):
    def hook(module, inputs, routing):
        return dataclasses.replace(
            routing, weight=routing.weight * scale.to(routing.weight)[routing.expert_index]
        )

    return hook


# --------------------------------------------------------------------------------------------------- CLI


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown(result: dict, args) -> str:
    if args.action == "prune":
        where = {
            "text": "never chosen on held-out text (every position), removed from the model",
            "all": "never chosen on the quiz prompts (every token), removed from the model",
            "answer": "never chosen at the answer positions, left out of the selection there",
        }.get(result.get("positions"), f"never chosen ({result.get('positions')}), masked as counted")
        rule = f"prune: experts {where}"
    else:
        rule = (
            f"reweight: gates of the {args.top} most accurate experts (>= {args.min_items} items) "
            f"x {args.scale}"
        )
    lines = [f"# {args.action} on {result['model']} ({result['family']})", "", rule, ""]
    if "count" in result:
        count = result["count"]
        lines += [
            f"Counted: {count['source']}; {count['tokens']} tokens, "
            + ("stable over a doubling" if count["stable"] else f"not stable ({count['stopped']})")
            + f"; never used per layer: {[len(v) for v in count['never_used'].values()]}.",
            "",
        ]
    if "plan" in result:
        lines += [f"Removed: {result['plan']['rule']} ({result['plan']['experts_before']} -> "
                  f"{result['plan']['experts_after']} experts per layer).", ""]  # fmt: skip
    if result.get("routing_check"):
        check = result["routing_check"]
        unchanged = ", ".join(f"{v:.4f}" for v in check["routing_unchanged"].values())
        chosen = ", ".join(f"{v:.4f}" for v in check["removed_expert_chosen"].values())
        lines += [
            f"Routing check on {check['tokens']} counted tokens, per layer: experts and gates unchanged "
            f"{unchanged}; a removed expert chosen {chosen} (testbed/hf/prune.py).",
            "",
        ]
    if result.get("parameters"):
        p = result["parameters"]
        lines += [f"Parameters: {p['before']} -> {p['after']} ({p['removed']} removed).", ""]
    checkpoint = result.get("checkpoint")
    if checkpoint:
        lines += [
            f"Checkpoint: {checkpoint['out']} ({checkpoint['format']}, {checkpoint['dtype']}, "
            f"{checkpoint['weights_bytes']} bytes of weights, {checkpoint['bytes_removed']} bytes removed"
            f"{', with its tokenizer' if checkpoint['tokenizer_saved'] else ', no tokenizer'}).",
            "",
        ]
    if result.get("note"):
        lines += [result["note"] + ".", ""]
    if "splits" in result:
        s = result["splits"]
        lines += [
            f"Items: {s['selection']['items']} to select the experts, {s['scoring']['items']} (the others) "
            f"to score before and after (split seed {s['seed']}).",
            "",
        ]
    if "before" in result:
        e = result["effect"]
        lines += [
            "| | items | task loss | accuracy |",
            "|---|---|---|---|",
            f"| before | {result['before']['items']} | {_fmt(result['before']['loss'])} | "
            f"{_fmt(result['before']['accuracy'])} |",
            f"| after | {result['after']['items']} | {_fmt(result['after']['loss'])} | "
            f"{_fmt(result['after']['accuracy'])} |",
            f"| effect (95% CI) | | {e['loss']['estimate']:+.4f} [{e['loss']['ci95'][0]:+.4f}, "
            f"{e['loss']['ci95'][1]:+.4f}] | {e['accuracy']['estimate']:+.4f} "
            f"[{e['accuracy']['ci95'][0]:+.4f}, {e['accuracy']['ci95'][1]:+.4f}] |",
            "",
            f"Interval: paired bootstrap over the scored items, {e['bootstrap']['resamples']} resamples, "
            f"seed {e['bootstrap']['seed']}.",
            "",
        ]
    lines += ["| layer | experts |", "|---|---|"]
    lines += [f"| {name} | {experts} |" for name, experts in result["experts"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed-intervene", description=DESCRIPTION)
    parser.add_argument("action", choices=["prune", "reweight"])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a testbed .ckpt or run dir (or --hf)")
    parser.add_argument("--hf", help="a hub model id or local directory of a pretrained HF MoE")
    parser.add_argument(
        "--quiz",
        type=Path,
        nargs="+",
        help="MMLU-format CSV files or dirs (needed by reweight and by testbed checkpoints; prune --hf "
        "without a quiz only prunes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write intervention.json and intervention.md here; prune --hf also writes the pruned model "
        "here (an empty or new folder)",
    )
    parser.add_argument(
        "--positions",
        choices=["text", "all", "answer"],
        default="text",
        help="prune --hf: counted positions: text (every position of held-out text, default), all (every "
        "quiz prompt token) or answer (answer positions; removal there only, no checkpoint)",
    )
    parser.add_argument(
        "--text", nargs="+", help="prune --hf: data config overrides of the held-out text, e.g. data=shipped"
    )
    parser.add_argument("--count-start-tokens", type=int, default=8192, help="prune: first look at the count")
    parser.add_argument("--max-count-tokens", type=int, default=1 << 20, help="prune: most tokens counted")
    parser.add_argument(
        "--count-seq-len", type=int, default=0, help="prune: tokens per sequence (default: min(512, model's))"
    )
    parser.add_argument("--count-batch-size", type=int, default=8, help="prune: sequences per forward pass")
    parser.add_argument("--top", type=int, default=None, help="reweight: experts per layer (default: K)")
    parser.add_argument("--min-items", type=int, default=5, help="reweight: items an expert needs")
    parser.add_argument("--scale", type=float, default=2.0, help="reweight: gate multiplier")
    parser.add_argument(
        "--select-fraction", type=float, default=0.5, help="reweight: share of items that select the experts"
    )
    parser.add_argument("--seed", type=int, default=0, help="the item split and the bootstrap")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the effect")
    parser.add_argument("--batch-items", type=int, default=8)
    parser.add_argument("--tokenizer", help="HF: tokenizer directory or id")
    parser.add_argument("--revision", help="HF: a hub branch, tag or commit (hub ids only)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or mps")
    parser.add_argument(
        "--device-map", choices=DEVICE_MAPS, help="HF: place the layers with accelerate instead of --device"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def check_args(args) -> None:
    if (args.hf is None) == (args.checkpoint is None):
        raise QuizError("give exactly one model: a testbed checkpoint (or run dir), or --hf MODEL")
    if args.scale <= 0 or (args.top is not None and args.top < 1) or args.min_items < 1:
        raise QuizError(
            f"--scale {args.scale}, --top {args.top}, --min-items {args.min_items}: allowed: "
            "scale > 0, top >= 1, min-items >= 1"
        )
    if not 0 < args.select_fraction < 1 or args.bootstrap < 1:
        raise QuizError(
            f"--select-fraction {args.select_fraction}, --bootstrap {args.bootstrap}: allowed: a fraction "
            "strictly between 0 and 1, at least 1 resample"
        )
    if (
        args.count_start_tokens < 1
        or args.max_count_tokens < args.count_start_tokens
        or args.count_seq_len < 0
    ):
        raise QuizError(
            f"--count-start-tokens {args.count_start_tokens}, --max-count-tokens {args.max_count_tokens}, "
            f"--count-seq-len {args.count_seq_len}: allowed: start >= 1, max >= start, seq-len >= 0"
        )
    needs_quiz = args.action == "reweight" or args.hf is None or args.positions != "text"
    if needs_quiz and not args.quiz:
        what = "reweight" if args.action == "reweight" else "this prune"
        raise QuizError(f"{what} needs --quiz FILES (prune --hf --positions text can do without)")
    if args.hf is None and (args.revision or args.device_map or args.text):
        raise QuizError("--revision, --device-map and --text apply to --hf models only")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        items = load_quiz(args.quiz) if args.quiz else []
        result = run_hf(args, items) if args.hf is not None else run_own(args, items)
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "before" in result:
        result["effect"] = effect(result["before"], result["after"], args)
        for key in ("before", "after"):
            result[key] = summary(result[key])
    result["rule"] = {
        k: getattr(args, k)
        for k in ("action", "positions", "top", "min_items", "scale", "select_fraction", "seed", "bootstrap")
    }
    text = markdown(result, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "intervention.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "intervention.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
