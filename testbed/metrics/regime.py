"""Regime check (docs/regime.md): does a MoE run beat the models it must beat, at equal tokens?

Pure functions over `summary.json` dicts (no torch). A baseline is another run's summary trained on the same
data, validation set, optimizer, schedule and number of tokens, with the same attention trunk; its role
follows from its FFN:
- `dense_active`: every block dense with hidden = top_k x expert_hidden (+ shared experts): equal active
  parameters (`model=<name>_dense`);
- `dense_total`: every block dense with hidden = num_experts x expert_hidden (+ shared): equal total
  parameters (`model=<name>_dense_total`);
- `hash`: the same MoE (every model field) routed by the hash router with the same top_k.
Gains are `baseline val loss - run val loss` (> 0: the run is better), against the baseline run of the same
seed where there is one (paired), else the mean over the baseline's seeds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from testbed.routing import ROUTERS

REGIME_KEYS = (
    "regime/gap_to_unigram",
    "regime/gain_over_dense_active",
    "regime/gain_over_dense_total",
    "regime/gain_over_hash",
)
ROLES = ("dense_active", "dense_total", "hash")


def is_floor_router(name: str | None) -> bool:
    """A router registered as the non-semantic floor (`reference = "floor"`: token-id hashing), the
    regime check's `hash` baseline."""
    return name in ROUTERS.names() and ROUTERS.get(name)[0].reference == "floor"


# Settings that must be equal for two runs to be compared (resolved config sections of summary.json).
TRUNK_MODEL_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "max_seq_len",
    "tie_embeddings",
    "rope_base",
)
DATA_IGNORED = ("name", "cache_dir", "num_workers")
DATA_ADDED = {"test_fraction": 0.0, "dedup_paragraphs": False, "hub": None, "group_field": None}
"""Data settings added after runs were committed, at the values those runs had: a summary without them
compares equal to one that records them at these values."""
OPTIM_IGNORED = (  # a dense model has no router
    "router_lr_scale",
    "router_weight_decay",
    "router_init_scale",
    "router_freeze_step",
)
TRAINER_KEYS = ("max_steps", "accumulate_grad_batches", "gradient_clip_val", "devices")


def comparable_key(summary: dict) -> str | None:
    """What must match between a run and its baselines, as a canonical string; None for summaries written
    before the resolved model/data/optim/trainer sections were recorded."""
    resolved = summary.get("resolved", {})
    if not all(k in resolved for k in ("model", "data", "optim", "trainer")):
        return None
    key = {
        "model": {k: resolved["model"].get(k) for k in TRUNK_MODEL_KEYS},
        "data": {k: v for k, v in {**DATA_ADDED, **resolved["data"]}.items() if k not in DATA_IGNORED},
        "optim": {k: v for k, v in resolved["optim"].items() if k not in OPTIM_IGNORED},
        "trainer": {k: resolved["trainer"].get(k) for k in TRAINER_KEYS},
        "tokens_seen": summary.get("tokens_seen"),
        "steps": summary.get("steps"),
        "init_from": summary.get("init_from"),
    }
    return json.dumps(key, sort_keys=True, default=str)


def is_moe(summary: dict) -> bool:
    model = summary.get("resolved", {}).get("model", {})
    return bool(model) and model.get("dense_layers", 0) < model.get("n_layers", 0)


def baseline_role(candidate: dict, run: dict) -> str | None:
    """The role `candidate` plays as a baseline of MoE `run` (one of ROLES), or None."""
    if candidate is run or not is_moe(run) or run["resolved"]["model"].get("dense_layers", 0) != 0:
        return None
    key = comparable_key(run)
    if key is None or comparable_key(candidate) != key:
        return None
    run_model, cand_model = run["resolved"]["model"], candidate["resolved"]["model"]
    moe = run_model["moe"]
    top_k = run["resolved"].get("router", {}).get("top_k")
    shared = moe.get("num_shared_experts", 0) * moe["expert_hidden"]
    if cand_model.get("dense_layers") == cand_model.get("n_layers"):  # all dense
        if top_k is not None and cand_model["dense_hidden"] == top_k * moe["expert_hidden"] + shared:
            return "dense_active"
        if cand_model["dense_hidden"] == moe["num_experts"] * moe["expert_hidden"] + shared:
            return "dense_total"
        return None
    cand_router = candidate["resolved"].get("router", {})
    if (
        is_floor_router(cand_router.get("name"))
        and not is_floor_router(run["resolved"].get("router", {}).get("name"))
        and cand_router.get("top_k") == top_k
        and {k: v for k, v in cand_model.items() if k != "name"}
        == {k: v for k, v in run_model.items() if k != "name"}
    ):
        return "hash"
    return None


def epochs_trained(summary: dict) -> dict[str, float]:
    """Per domain: how many times the run read its training tokens (epochs), at the steps it trained: the
    data module's figure at trainer.max_steps (summary "data", `epochs_at_max_steps`) scaled by steps /
    max_steps. Empty for summaries that do not record it."""
    max_steps = summary.get("resolved", {}).get("trainer", {}).get("max_steps")
    steps = summary.get("steps")
    scale = (
        steps / max_steps if isinstance(steps, int) and isinstance(max_steps, int) and max_steps > 0 else 1.0
    )
    return {
        entry["domain"]: entry["epochs_at_max_steps"] * scale
        for entry in summary.get("data") or []
        if isinstance(entry, dict) and isinstance(entry.get("epochs_at_max_steps"), int | float)
    }


def repeated_domains(summary: dict, limit: float = 1.0) -> dict[str, float]:
    """The domains whose training tokens the run read more than `limit` times, with their epochs."""
    return {domain: e for domain, e in epochs_trained(summary).items() if e > limit}


def gap_to_unigram(summary: dict) -> float | None:
    """Mean over domains of (unigram entropy - val loss), nats/token; > 0: beyond token frequencies."""
    unigram = summary.get("unigram_entropy") or {}
    gaps = [u - summary[f"val/loss/{d}"] for d, u in unigram.items() if f"val/loss/{d}" in summary]
    return sum(gaps) / len(gaps) if gaps else None


def regime_check(run: dict, candidates: list[dict]) -> dict:
    """The regime keys of `run` from the candidate summaries that are its baselines (see module doc), plus
    `regime/baselines`: per role, the baseline loss used, how many runs it averages and whether paired."""
    out: dict = {}
    epochs = epochs_trained(run)
    if epochs:
        out["regime/max_epochs"] = max(epochs.values())
    gap = gap_to_unigram(run)
    if gap is not None:
        out["regime/gap_to_unigram"] = gap
    loss = run.get("val/loss")
    if loss is None or not is_moe(run):
        return out
    by_role: dict[str, list[dict]] = {}
    for candidate in candidates:
        role = baseline_role(candidate, run)
        if role is not None and isinstance(candidate.get("val/loss"), int | float):
            by_role.setdefault(role, []).append(candidate)
    used = {}
    for role, baselines in by_role.items():
        paired = [b for b in baselines if b.get("seed") == run.get("seed")]
        chosen = paired or baselines
        value = sum(b["val/loss"] for b in chosen) / len(chosen)
        if math.isfinite(value) and math.isfinite(loss):
            out[f"regime/gain_over_{role}"] = value - loss
            used[role] = {"val/loss": value, "runs": len(chosen), "paired": bool(paired)}
    if used:
        out["regime/baselines"] = used
    return out


def read_summaries(roots: list[Path], exclude: Path | None = None) -> list[dict]:
    """Every readable summary.json below `roots` (unreadable or partial files are skipped: they are not
    baselines), each with its folder under `_dir`."""
    found, seen = [], set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("summary.json"):
            resolved = path.resolve()
            if resolved in seen or (exclude is not None and resolved.parent == exclude.resolve()):
                continue
            seen.add(resolved)
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(summary, dict):
                summary["_dir"] = str(path.parent)
                found.append(summary)
    return found
