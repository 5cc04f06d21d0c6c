"""`testbed-quiz eval`'s result for a checkpoint's module: its quiz items scored, accuracy per subject, the
routing analysis per layer (the quiz.json payload), and its Markdown table (quiz.md). Definitions:
testbed/analysis/quiz.py."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from testbed.analysis.quiz_items import QuizError, QuizItem
from testbed.analysis.quiz_metrics import QuizRouting, layer_report
from testbed.analysis.quiz_score import choose, encode_items, score_items
from testbed.routing import ROUTERS


def evaluate_quiz(
    module, tokenizer, items: list[QuizItem], batch_items: int = 32, device="cpu", positions: str = "all"
) -> dict:
    """Score `items` with a `MoELanguageModel`, collect routing; returns the quiz.json payload (no paths)."""
    subjects = list(dict.fromkeys(item.subject for item in items))
    encoded, truncated = encode_items(tokenizer, items, subjects, module.run_config.model.max_seq_len)
    routing = QuizRouting(
        len(module.model.moe_layers),
        len(subjects),
        module.run_config.model.moe.num_experts,
        len(items),
        device,
    )
    domain_of_subject = [module.domains.index(s) if s in module.domains else None for s in subjects]
    module.eval()
    model, lm_head = module.model, module.model.lm_head

    def hidden_states(ids, domains, **packing):  # the model up to its final norm: the LM head comes after
        return model(ids, domains, **packing, return_hidden=True)

    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        logprob, lengths = score_items(
            hidden_states,
            encoded,
            routing,
            batch_items,
            domain_of_subject,
            device,
            head=lm_head,
            positions=positions,
        )
    except ValueError as err:
        router = module.run_config.router.name
        if ROUTERS.get(router)[0].needs_reference:
            raise QuizError(
                f"router '{router}' routes by domain label and the quiz subjects {subjects} are not all "
                f"model domains {module.domains} ({err})"
            ) from err
        raise
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    answers = np.array([item.answer for item in items])
    option_bytes = np.array([e.option_bytes for e in encoded], dtype=np.float64)
    correct = choose(logprob) == answers
    correct_norm = choose(logprob / np.maximum(option_bytes, 1)) == answers
    subject_index = np.array([e.subject for e in encoded])
    per_subject = {
        s: {
            "items": int((subject_index == j).sum()),
            "accuracy": float(correct[subject_index == j].mean()),
            "accuracy_norm": float(correct_norm[subject_index == j].mean()),
        }
        for j, s in enumerate(subjects)
    }
    layers = layer_report(routing, correct)
    names = module.moe_layer_names
    return {
        "router": module.run_config.router.name,
        "top_k": getattr(module.run_config.router, "top_k", None),
        "num_experts": module.run_config.model.moe.num_experts,
        "items": len(items),
        "truncated_questions": truncated,
        "accuracy": float(correct.mean()),
        "accuracy_norm": float(correct_norm.mean()),
        "chance": 0.25,
        "per_subject": per_subject,
        "layers": names,
        "per_layer": dict(zip(names, layers, strict=True)),
        "mean": {
            key: _nanmean([layer[key] for layer in layers])
            for key in (
                "dead_experts",
                "gate_entropy",
                "utilization",
                "expert_accuracy_spread",
                "expert_accuracy_range",
            )
        },
        "option_tokens_mean": float(lengths.mean()),
        "timing": {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # process CPU time, summed over threads
            "items_per_s": len(items) / seconds if seconds > 0 else None,
            "threads": torch.get_num_threads(),
            "device": str(device),
        },
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def json_finite(value):
    """`value` with every non-finite float replaced by None, recursively (JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def markdown(result: dict) -> str:
    def fmt(value, digits=3):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else f"{value:.{digits}f}"
        )

    timing = result["timing"]
    lines = [
        f"# Quiz (X5) of {result['checkpoint']}",
        "",
        f"Router `{result['router']}`, {result['num_experts']} experts. {result['items']} items in "
        f"{len(result['per_subject'])} subjects from {', '.join(result['quiz'])}.",
        f"Accuracy {fmt(result['accuracy'])} (length-normalized {fmt(result['accuracy_norm'])}); "
        "chance 0.250.",
        f"Scoring took {fmt(timing['seconds'], 1)} s ({fmt(timing['cpu_seconds'], 1)} s of CPU time) with "
        f"{timing['threads']} threads.",
        "",
        "Routing over the quiz tokens (each question once, every option):",
        "",
        "| layer | dead experts | gate entropy | utilization | experts with items | per-expert accuracy std "
        "| per-expert accuracy max−min |",
        "|---|---|---|---|---|---|---|",
    ]
    columns = ("dead_experts", "gate_entropy", "utilization", "experts_with_items")
    spread = ("expert_accuracy_spread", "expert_accuracy_range")
    for name in result["layers"]:
        m = result["per_layer"][name]
        cells = [fmt(m[c]) if c != "experts_with_items" else str(m[c]) for c in columns + spread]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result["layers"]:
        mean = result["mean"]
        cells = [fmt(mean[c]) if c in mean else "" for c in columns + spread]
        lines.append("| mean | " + " | ".join(cells) + " |")
    lines += ["", "| subject | items | accuracy | accuracy (length-normalized) |", "|---|---|---|---|"]
    for subject, row in result["per_subject"].items():
        lines.append(f"| {subject} | {row['items']} | {fmt(row['accuracy'])} | {fmt(row['accuracy_norm'])} |")
    lines.append(f"| all | {result['items']} | {fmt(result['accuracy'])} | {fmt(result['accuracy_norm'])} |")
    check = result["holdout"]
    if check["checked"] and not check["matches"]:
        lines += ["", "**Warning**: the quiz was built with another holdout than this model's training data:"]
        lines += [f"- {problem}" for problem in check["problems"]]
    lines += [
        "",
        "Definitions: testbed/analysis/quiz.py. Per-expert tables (load, items, accuracy): quiz.json.",
    ]
    return "\n".join(lines) + "\n"
