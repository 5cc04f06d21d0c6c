"""`testbed-intervene prune|reweight (--hf MODEL | CHECKPOINT) --quiz FILES`: Chernov's (2025) two suggested
interventions on a quiz task, on a pretrained HF MoE or a testbed checkpoint, with the task's loss and
accuracy before and after.

Rules [defined here]:
- prune: the experts never activated on the task in a layer (no assignment from a counted token) are removed
  from that layer's selection, at every position (the chosen set is the best K among the other experts; gate
  values as the model computes them). Counted tokens: `--positions answer` (HF default, Chernov's count) or
  `all` (every prompt token); for a testbed checkpoint every token of the cloze rows. With `all`, an expert
  that never fires changes nothing, by construction.
- reweight: in each layer, the `--top` experts (default: the model's K) with the highest per-expert accuracy
  among the experts with at least `--min-items` items (ties: more items, then the lower id) get their combine
  weight multiplied by `--scale` (default 2) whenever they are chosen; selection and the other gates are
  unchanged, nothing is renormalized.
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
    encode_items,
    evaluate_quiz,
    load_quiz,
    load_tokenizer_of,
    score_items,
)
from testbed.errors import TestbedError
from testbed.hf.load import check_source, load_hf_model, require_transformers, router_spec
from testbed.hf.quiz import evaluate_hf_quiz
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel


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
                "(--positions all) or more items"
            )


# ------------------------------------------------------------------------------------------ pretrained HF


def run_hf(args, items) -> dict:
    hf = load_hf_model(args.hf, args.device, args.dtype, args.tokenizer)
    before = evaluate_hf_quiz(hf, items, args.batch_items, progress=not args.no_progress)
    layers = before.per_layer()
    load_key = "expert_load" if args.positions == "answer" else "expert_load_all_tokens"
    tables = [
        {"load": m[load_key], "accuracy": m["expert_accuracy"], "items": m["expert_items"]} for m in layers
    ]
    mask, touched = masks_from_layers(tables, hf.spec.num_experts, args.action, args)
    if args.action == "prune":
        check_prune(mask, hf.spec.top_k, before.layer_names)
        after = evaluate_hf_quiz(hf, items, args.batch_items, excluded=mask.to(hf.device))
    else:
        after = evaluate_hf_quiz(hf, items, args.batch_items, gate_scale=mask.to(hf.device))
    return {
        "model": hf.name,
        "family": hf.spec.family.label,
        "layers": before.layer_names,
        "before": {"loss": before.loss, "accuracy": before.accuracy},
        "after": {"loss": after.loss, "accuracy": after.accuracy},
        "experts": dict(zip(before.layer_names, touched, strict=True)),
    }


# ------------------------------------------------------------------------------------- testbed checkpoint


def own_task(module, tokenizer, items, batch_items: int, device) -> tuple[float, float]:
    """(loss, accuracy) of a testbed model on the items, cloze-scored as `testbed-quiz eval` does."""
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
    loss = float(-normalized[np.arange(len(items)), answers].mean())
    return loss, float((choose(logprob) == answers).mean())


def run_own(args, items) -> dict:
    checkpoint = resolve_checkpoint(args.checkpoint)
    run = load_run(checkpoint, [])
    module = MoELanguageModel(run, list(run.data.domains))
    load_weights(module, checkpoint, what="testbed-intervene")
    module.to(args.device).eval()
    tokenizer = load_tokenizer_of(run)
    baseline = evaluate_quiz(module, tokenizer, items, args.batch_items, args.device)
    names = baseline["layers"]
    tables = [
        {
            "load": baseline["per_layer"][n]["expert_load"],
            "accuracy": baseline["per_layer"][n]["expert_accuracy"],
            "items": baseline["per_layer"][n]["expert_items"],
        }
        for n in names
    ]
    layers = module.model.moe_layers
    mask, touched = masks_from_layers(tables, run.model.moe.num_experts, args.action, args)
    before = own_task(module, tokenizer, items, args.batch_items, args.device)
    if args.action == "prune":
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
            after = own_task(module, tokenizer, items, args.batch_items, args.device)
        finally:
            for router, bias in zip(routers, saved, strict=True):
                router.expert_bias.copy_(bias)
    else:
        handles = [
            layer.router.register_forward_hook(_scale_hook(row.to(args.device)))
            for layer, row in zip(layers, mask, strict=True)
        ]
        try:
            after = own_task(module, tokenizer, items, args.batch_items, args.device)
        finally:
            for handle in handles:
                handle.remove()
    return {
        "model": str(checkpoint),
        "family": f"testbed ({run.router.name})",
        "layers": names,
        "before": {"loss": before[0], "accuracy": before[1]},
        "after": {"loss": after[0], "accuracy": after[1]},
        "experts": dict(zip(names, touched, strict=True)),
    }


def _scale_hook(scale: torch.Tensor):
    def hook(module, inputs, routing):
        return dataclasses.replace(
            routing, weight=routing.weight * scale.to(routing.weight)[routing.expert_index]
        )

    return hook


# --------------------------------------------------------------------------------------------------- CLI


def markdown(result: dict, args) -> str:
    rule = (
        f"prune: experts never activated ({args.positions} positions) removed from selection"
        if args.action == "prune"
        else f"reweight: gates of the {args.top} most accurate experts "
        f"(>= {args.min_items} items) x {args.scale}"
    )
    lines = [
        f"# {args.action} on {result['model']} ({result['family']})",
        "",
        rule,
        "",
        "| | task loss | accuracy |",
        "|---|---|---|",
        f"| before | {result['before']['loss']:.4f} | {result['before']['accuracy']:.4f} |",
        f"| after | {result['after']['loss']:.4f} | {result['after']['accuracy']:.4f} |",
        "",
        "| layer | experts |",
        "|---|---|",
    ]
    lines += [f"| {name} | {experts} |" for name, experts in result["experts"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed-intervene", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["prune", "reweight"])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a testbed .ckpt or run dir (or --hf)")
    parser.add_argument("--hf", help="a hub model id or local directory of a pretrained HF MoE")
    parser.add_argument("--quiz", type=Path, nargs="+", required=True, help="MMLU-format CSV files or dirs")
    parser.add_argument("--out", type=Path, help="write intervention.json and intervention.md here")
    parser.add_argument("--positions", choices=["answer", "all"], default="answer", help="HF: counted tokens")
    parser.add_argument("--top", type=int, default=None, help="reweight: experts per layer (default: K)")
    parser.add_argument("--min-items", type=int, default=5, help="reweight: items an expert needs")
    parser.add_argument("--scale", type=float, default=2.0, help="reweight: gate multiplier")
    parser.add_argument("--batch-items", type=int, default=8)
    parser.add_argument("--tokenizer", help="HF: tokenizer directory or id")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if (args.hf is None) == (args.checkpoint is None):
            raise QuizError("give exactly one model: a testbed checkpoint (or run dir), or --hf MODEL")
        if args.scale <= 0 or (args.top is not None and args.top < 1) or args.min_items < 1:
            raise QuizError(
                f"--scale {args.scale}, --top {args.top}, --min-items {args.min_items}: allowed: "
                "scale > 0, top >= 1, min-items >= 1"
            )
        items = load_quiz(args.quiz)
        if args.top is None:
            args.top = _top_k(args)
        result = run_hf(args, items) if args.hf is not None else run_own(args, items)
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["rule"] = {k: getattr(args, k) for k in ("action", "positions", "top", "min_items", "scale")}
    text = markdown(result, args)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "intervention.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "intervention.md").write_text(text)
    return 0


def _top_k(args) -> int:
    if args.hf is not None:
        check_source(args.hf)
        return router_spec(require_transformers().AutoConfig.from_pretrained(args.hf)).top_k
    return load_run(resolve_checkpoint(args.checkpoint), []).router.top_k


if __name__ == "__main__":
    sys.exit(main())
