"""`testbed-report <run or sweep dir> [...]`: the runs of one or more sweeps, seeds aggregated, as a
Markdown table, a CSV and plots.

Each run directory holds `summary.json` (written at the end of training), `metrics.csv` (the logged
curves) and `.hydra/overrides.yaml` (what the sweep set). A directory with `.hydra/` but no
`summary.json` is a failed or unfinished run: it is listed under the table, never dropped silently.

Runs are grouped by their overrides minus `seed` (and minus `init_from`, whose path differs per seed in
post-training sweeps); each group shows mean ± sample standard deviation and n. With `--per-run` the
table lists every run instead. Plots (`--plots`): the utilization-vs-specialization frontier (oracle a
star, hash an x, error bars = 95% t confidence intervals over seeds), per-layer curves of the last validation
and training curves of `--curves` metrics (mean over seeds, shaded 95% CI), configurations named by short
labels (plot_labels: "LBL, global", "EB, micro_batch", "hash", "dense").
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats
from scipy.optimize import brentq

from testbed.analysis.html_report import Heatmaps, Page, write_page
from testbed.analysis.inference import ci95, holm, one_sample_p
from testbed.analysis.ladder import (
    BASELINES,
    collect,
    config_values,
    ladder_figure,
    ladder_report,
    rank_figure,
    rank_report,
)
from testbed.errors import CheckpointError
from testbed.losses import BALANCE
from testbed.metrics.regime import REGIME_KEYS, is_moe, read_summaries, regime_check, repeated_domains
from testbed.plots import (
    DENSE,
    by_construction,
    domain_expert_heatmaps,
    expert_probabilities,
    frontier_scatter,
    metric_title,
    per_layer_curves,
    readable_label,
    readable_setting,
    spread_label,
    t_interval,
    training_curves,
)
from testbed.registry import label_of
from testbed.routing import ROUTERS
from testbed.safe_load import load_file

CHECKOUT = Path(__file__).resolve().parents[2]

DEFAULT_COLUMNS = (
    "val/loss",
    "spec/utilization/mean",
    "spec/max_violation/mean",
    "spec/gate_entropy/mean",
    "spec/purity/mean",
    "spec/nmi/mean",
    "spec/reference_precision/mean",
    "spec/drop_rate/mean",
)
DEFAULT_LAYER_METRICS = ("purity", "nmi", "gate_entropy", "utilization")
DEFAULT_CURVES = ("val/loss", "train/spec/purity/mean")
LOGGED_WINDOW = 5
GROUP_IGNORED = ("seed", "init_from", "resume")
"""Override keys that do not define a configuration: runs differing only here are seeds of one group."""
RESULT_NEUTRAL = (
    "logger",
    "logger.*",
    "trainer.progress_bar",
    "trainer.enable_checkpointing",
    "metrics.plots",
    "overwrite",
)
"""Settings that cannot change a run's results (where it logs, what it shows or draws while training,
whether it keeps checkpoints, whether it may replace an old run folder): never a grouping key or a column,
so a run logged to TensorBoard groups with its CSV-logged twin. `name.*` stands for every key below name.
(trainer.num_threads is not here: the number of CPU threads changes the order of floating-point sums.)"""
SELECTED_PER_SEED = ("finetune.experts",)
"""Set per seed by an experiment's `select_experts` rule (X6's expert path; the sweep names the rule): within
an experiment grid's sweeps, runs differing only here are seeds of one group. Elsewhere (a hand-made sweep
over finetune.experts) they are separate configurations."""


def find_runs(roots: list[Path]) -> tuple[list[dict], list[Path]]:
    """(finished runs with their overrides, run directories without a finished summary.json: failed,
    interrupted or unfinished runs)."""
    finished, failed = [], []
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        candidates = {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("summary.json")}

        # A deterministic order that a fresh clone keeps (file times do not survive git): runs
        # post-trained from another run (init_from) after the others, then by path, numbers compared
        # as numbers (s2 before s10).
        def order(p: Path, root: Path = root):
            return (_post_trained(p / "summary.json"), _natural_key(p.relative_to(root)))

        for run_dir in sorted(candidates, key=order):
            summary_path = run_dir / "summary.json"
            overrides_path = run_dir / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.exists() else []
            overrides = [o for o in overrides or [] if not o.startswith(("hydra.", "+experiment="))]
            status = run_status(summary_path)
            if status != "finished":  # no summary, or a run that failed or was interrupted: never a result
                failed.append(run_dir)
                continue
            summary = with_resolved_config(json.loads(summary_path.read_text()), run_dir)
            relative = run_dir.relative_to(root).parts
            # <experiment out>/<sweep>/<process>/<job>: the sweep is the first of three levels
            sweep = relative[0] if len(relative) >= 3 else ""
            finished.append({"dir": run_dir, "overrides": overrides, "summary": summary, "sweep": sweep})
    return finished, failed


def _natural_key(path: Path) -> tuple:
    return tuple(
        tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part) if t)
        for part in path.parts
    )


def _post_trained(summary_path: Path) -> bool:
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and bool(summary.get("init_from"))


def run_status(summary_path: Path) -> str:
    """`status` of a summary.json: finished (summaries from before statuses existed too), failed,
    interrupted; `missing` / `unreadable` when there is no valid summary."""
    if not summary_path.exists():
        return "missing"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return "unreadable"
    return str(summary.get("status", "finished")) if isinstance(summary, dict) else "unreadable"


def with_resolved_config(summary: dict, run_dir: Path) -> dict:
    """Summaries written before the resolved model/data/optim/trainer sections were recorded get them from
    the run's composed config (.hydra/config.yaml), so that the regime check can match their baselines."""
    resolved = summary.setdefault("resolved", {})
    config_path = run_dir / ".hydra" / "config.yaml"
    missing = [k for k in ("model", "data", "optim", "trainer") if k not in resolved]
    if missing and config_path.exists():
        config = yaml.safe_load(config_path.read_text()) or {}
        for key in missing:
            if isinstance(config.get(key), dict):
                resolved[key] = config[key]
        if "router" not in resolved and isinstance(config.get("router"), dict):
            resolved["router"] = config["router"]
        summary.setdefault("init_from", config.get("init_from"))
    return summary


def add_regime(runs: list[dict], extra_roots: list[Path]) -> None:
    """Regime keys (README, "Regime check") of every run, from baselines among the runs and under extra_roots
    (the committed experiments/): stored in each run's summary, recomputed even where summary.json has them
    (a baseline may have finished after the run). Hash-routed runs that train with a balancing term are no
    baselines (`hash_with_balancing`; the report flags them: `baseline_note`)."""
    candidates = {str(Path(run["dir"]).resolve()): run["summary"] for run in runs}
    for summary in read_summaries(extra_roots):
        key = str(Path(summary["_dir"]).resolve())
        if key not in candidates:
            candidates[key] = with_resolved_config(summary, Path(summary["_dir"]))
    pool = [summary for summary in candidates.values() if not hash_with_balancing(summary)]
    for run in runs:
        for key in (*REGIME_KEYS, "regime/max_epochs"):
            run["summary"].pop(key, None)
        run["summary"].update(regime_check(run["summary"], pool))


def hash_with_balancing(summary: dict) -> str | None:
    """The balancing method of a hash-routed run that trains with a balancing term (`balance=load_balance`,
    the default, in a plain router sweep): such a run is not the regime check's hash baseline, which is
    `router=hash balance=none` (docs/regime.md); None for any other run, or where the summary does not say
    how the run balanced."""
    config, resolved = summary.get("config", {}), summary.get("resolved", {})
    router = str(config.get("router") or resolved.get("router", {}).get("name") or "").rpartition("/")[2]
    if router != "hash":
        return None
    balance = str(config.get("balance") or resolved.get("balance", {}).get("name") or "").rpartition("/")[2]
    balance_cls = BALANCE.find(balance) if balance else None
    return balance if balance_cls is not None and balance_cls.adds_term else None


def baseline_note(runs: list[dict]) -> str:
    """A warning naming the hash-routed runs that balance (`hash_with_balancing`): left out of every run's
    gain over hash (empty if none)."""
    flagged = [(run["dir"], method) for run in runs if (method := hash_with_balancing(run["summary"]))]
    if not flagged:
        return ""
    return "\n".join(
        [
            "",
            "",
            f"**Not a regime baseline**: {len(flagged)} hash-routed run(s) trained with a balancing term; "
            "the regime check's hash baseline is `router=hash balance=none`, so they are left out of "
            "gain_over_hash (rerun them with balance=none to use them):",
            *[f"- {path} (balance={method})" for path, method in flagged],
        ]
    )


def regime_table(runs: list[dict]) -> str:
    """Per configuration: n, gap to unigram and the gains over the baselines (mean ± 95% CI over seeds,
    paired by seed where the baseline has that seed); configurations below the dense-active line flagged, and
    those that read some domain's training tokens more than once (max epochs: the most over domains and
    runs)."""
    _, groups = group_runs(runs)
    keys = [k for k in REGIME_KEYS]
    lines = [
        "| configuration | n | "
        + " | ".join(k.removeprefix("regime/") for k in keys)
        + " | max epochs | regime |",
        "|" + "---|" * (len(keys) + 4),
    ]
    shown = 0
    for group in groups:
        cells, gains = [], {}
        for key in keys:
            mean, half, n = ci95([run["summary"].get(key) for run in group["runs"]])
            gains[key] = (mean, half, n)
            cells.append("" if n == 0 else f"{mean:+.3f}" + (f" ± {half:.3f}" if n > 1 else ""))
        if all(n == 0 for _, _, n in gains.values()):
            continue
        shown += 1
        mean, half, n = gains["regime/gain_over_dense_active"]
        below = sum(
            1 for run in group["runs"] if (run["summary"].get("regime/gain_over_dense_active") or 0.0) < 0
        )
        if n == 0:
            verdict = "no dense-active baseline" if is_moe(group["runs"][0]["summary"]) else "(dense)"
        elif n > 1 and mean - half > 0:
            verdict = "above dense-active"
        elif n == 1 and mean > 0:
            verdict = "above dense-active in its one run (no interval)"
        elif mean < 0:
            verdict = f"**BELOW DENSE-ACTIVE** ({below}/{n} runs)"
        else:
            verdict = f"not separated from dense-active ({below}/{n} runs below)"
        epochs = [run["summary"].get("regime/max_epochs") for run in group["runs"]]
        epochs = [e for e in epochs if isinstance(e, int | float)]
        cells.append(f"{max(epochs):.2f}" if epochs else "")
        if epochs and max(epochs) > 1:
            verdict += "; **repeats its data**"
        lines.append(
            f"| {settings_label(group)} | {len(group['runs'])} | " + " | ".join(cells) + f" | {verdict} |"
        )
    if not shown:
        return ""
    return "\n".join(
        [
            "",
            "",
            "Regime check (nats/token; gain = baseline val loss - this val loss, > 0 better; "
            "mean ± 95% CI over seeds; gap_to_unigram = unigram entropy - val loss; max epochs: the most "
            "times any run of the configuration read a domain's training tokens, > 1 = trained on repeated "
            "data):",
            "",
            *lines,
        ]
    )


def repetition_note(runs: list[dict]) -> str:
    """A warning naming the configurations that trained past one epoch on some domain (empty if none)."""
    _, groups = group_runs(runs)
    flagged = []
    for group in groups:
        worst: dict[str, float] = {}
        for run in group["runs"]:
            for domain, epochs in repeated_domains(run["summary"]).items():
                worst[domain] = max(worst.get(domain, 0.0), epochs)
        if worst:
            figures = ", ".join(f"{d} {e:.2f}" for d, e in sorted(worst.items(), key=lambda x: -x[1]))
            flagged.append(f"- {settings_label(group)}: {figures}")
    if not flagged:
        return ""
    return "\n".join(
        [
            "",
            "",
            f"**Repeated data**: {len(flagged)} configuration(s) read some domain's training tokens more "
            "than once (epochs per domain, the most over seeds); their losses mix generalisation with "
            "memorisation:",
            *flagged,
        ]
    )


def settings_of(run: dict) -> dict[str, str]:
    return dict(item.partition("=")[::2] for item in run["overrides"])


def result_neutral(key: str) -> bool:
    """Whether an override key is one of RESULT_NEUTRAL (`+`/`++`/`~` prefixes ignored)."""
    key = key.lstrip("+~")
    return any(key == n or (n.endswith(".*") and key.startswith(n[:-1])) for n in RESULT_NEUTRAL)


def varying_overrides(runs: list[dict], ignore: tuple[str, ...] = ()) -> list[str]:
    """Override keys whose value differs between runs (the swept ones), in first-seen order."""
    values: dict[str, set] = {}
    for run in runs:
        for key, value in settings_of(run).items():
            values.setdefault(key, set()).add(value)
    present = {k: v for k, v in values.items() if k not in ignore and not result_neutral(k)}
    # A key set in some runs only (e.g. router.scope in the sinkhorn part of a sweep) varies too.
    missing = {k for k in present if any(k not in settings_of(run) for run in runs)}
    keys = [k for k, v in present.items() if len(v) > 1 or k in missing or len(runs) == 1]
    return keys or [k for k in values if k not in ignore and not result_neutral(k)]


def group_runs(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """Runs grouped by swept settings minus GROUP_IGNORED: (keys, [{settings, runs}]), first-seen order.
    Runs from several sweeps (the first folder below a report root) also group by sweep."""
    in_grid = bool(runs) and all(run.get("sweep") for run in runs)
    keys = varying_overrides(runs, ignore=GROUP_IGNORED + (SELECTED_PER_SEED if in_grid else ()))
    if len({run.get("sweep", "") for run in runs}) > 1:
        keys = ["sweep", *keys]
    groups: dict[tuple, dict] = {}
    for run in runs:
        settings = {"sweep": run.get("sweep", ""), **settings_of(run)}
        label = tuple(settings.get(k, "") for k in keys)
        groups.setdefault(label, {"settings": dict(zip(keys, label, strict=True)), "runs": []})
        groups[label]["runs"].append(run)
    return keys, list(groups.values())


def quiz_result(run_dir: Path) -> dict:
    path = run_dir / "quiz" / "quiz.json"
    return _read_cached(path, json.loads) if path.exists() else {}


def analysis_value(run_dir: Path, key: str):
    """`analysis/<key>` from <run>/analysis/analysis.json (testbed-analyze <run> [overrides], e.g. Sinkhorn
    scored with its training-time routing: router.eval_balanced=true): val/loss, val/loss/<domain>, or a
    spec/... metric; None where the run has no analysis."""
    path = run_dir / "analysis" / "analysis.json"
    if not path.exists():
        return None
    analysis = _read_cached(path, json.loads)
    if key == "val/loss":
        return analysis.get("val_loss_mean")
    if key.startswith("val/loss/"):
        return analysis.get("val_loss", {}).get(key.removeprefix("val/loss/"))
    return analysis.get("metrics", {}).get(key)


@functools.lru_cache(maxsize=4096)
def _read_keyed(path: Path, mtime_ns: int, parse):
    return parse(path.read_text())


def _read_cached(path: Path, parse):
    """parse(text of path), read once per file version: a report reads each run's files for every column
    and plot."""
    return _read_keyed(path, path.stat().st_mtime_ns, parse)


def run_value(run: dict, column: str):
    """summary.json's value; `quiz/<key>` from <run>/quiz/quiz.json (testbed-quiz eval: its top level, else
    its mean over layers); for a logged-only column (train/aux/load_balance, say), the mean of its last
    LOGGED_WINDOW values in metrics.csv; `analysis/<key>` from testbed-analyze's analysis.json; for a
    post-training run, `gain/<key>` = init/<key> - <key> (the starting checkpoint's value, measured on the
    same validation tokens before the first step, minus the final one: > 0 = the loss fell) and
    `gain_per_mparam/<key>` = that gain per million trained parameters (summary `trainable_params`)."""
    if column.startswith(("gain/", "gain_per_mparam/")):
        prefix, _, key = column.partition("/")
        before, after = _number(run["summary"].get(f"init/{key}")), _number(run["summary"].get(key))
        gain = before - after
        if prefix == "gain":
            return gain
        params = _number(run["summary"].get("trainable_params"))
        return 1e6 * gain / params if params > 0 else math.nan
    if column.startswith("analysis/"):
        return analysis_value(run["dir"], column.removeprefix("analysis/"))
    if column.startswith("quiz/"):
        result, key = quiz_result(run["dir"]), column.removeprefix("quiz/")
        return result[key] if key in result else result.get("mean", {}).get(key)
    if column in run["summary"]:
        return run["summary"][column]
    values = [v for _, v in sorted(curve_of(run["dir"], column).items())][-LOGGED_WINDOW:]
    return float(np.mean(values)) if values else None


def _number(value) -> float:
    """A summary value as a float; NaN for what is not a finite number (missing, text, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return math.nan
    return float(value)


def aggregate(values: list) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; 0 for one value), n) over the finite values; (nan, nan, 0) if none."""
    if not values:
        return float("nan"), float("nan"), 0
    ((mean, std, n),) = group_stats([0] * len(values), {"v": values}).itertuples(index=False)
    return float(mean), float(std), int(n)


def group_stats(group_ids: list, columns: dict[str, list]) -> pd.DataFrame:
    """Per group id (first-seen order) and column: mean, sample std (ddof=1; 0 for one value) and n over
    the finite values, as columns (<column>, mean|std|n); a column with no finite value: nan, nan, 0."""
    frame = pd.DataFrame({name: [_number(v) for v in values] for name, values in columns.items()})
    stats = frame.groupby(pd.Series(group_ids, name="group"), sort=False).agg(["mean", "std", "count"])
    for name in columns:
        n = stats[(name, "count")]
        stats[(name, "std")] = stats[(name, "std")].where(n != 1, 0.0)
    stats = stats.rename(columns={"count": "n"}, level=1)
    return stats.astype({(name, "n"): int for name in columns})


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return "" if value is None else str(value)


def short_name(column: str) -> str:
    return column.replace("spec/", "").replace("/mean", "")


def table_rows(runs: list[dict], columns: tuple[str, ...]) -> tuple[list[str], list[list]]:
    """One row per run (--per-run)."""
    keys = varying_overrides(runs)
    header = ["run", *keys, *columns]
    rows = []
    for run in runs:
        settings = settings_of(run)
        rows.append(
            [run["dir"].name, *[settings.get(k, "") for k in keys], *[run_value(run, c) for c in columns]]
        )
    return header, rows


def group_table(runs: list[dict], columns: tuple[str, ...]) -> tuple[list[str], list[list], list[list]]:
    """One row per group: (markdown header, markdown rows with 'mean ± std', CSV rows with mean/std/n)."""
    keys, groups = group_runs(runs)
    header = [*keys, "n", *columns]
    ids = [i for i, group in enumerate(groups) for _ in group["runs"]]
    values = {c: [run_value(run, c) for group in groups for run in group["runs"]] for c in columns}
    stats = group_stats(ids, values)
    md_rows, csv_rows = [], []
    for i, group in enumerate(groups):
        cells, flat = [], []
        for c in columns:
            mean, std, n = (stats.at[i, (c, k)] for k in ("mean", "std", "n"))
            cells.append("nan" if n == 0 else f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
            flat += [float(mean), float(std), int(n)]
        md_rows.append([*group["settings"].values(), len(group["runs"]), *cells])
        csv_rows.append([*group["settings"].values(), len(group["runs"]), *flat])
    return header, md_rows, csv_rows


def markdown(header: list[str], rows: list[list], failed: list[Path]) -> str:
    short = [short_name(h) for h in header]
    lines = ["| " + " | ".join(short) + " |", "|" + "---|" * len(short)]
    lines += ["| " + " | ".join(format_value(v) for v in row) + " |" for row in rows]
    if failed:
        lines += [
            "",
            f"Runs without a finished summary.json (interrupted, failed or unfinished): {len(failed)}",
        ]
        lines += [f"- {p}" for p in failed]
    return "\n".join(lines)


def group_label(group: dict) -> str:
    """The group's settings (values only; the sweep name only when nothing else tells groups apart)."""
    values = [v.rpartition("/")[2] for k, v in group["settings"].items() if v and k != "sweep"]
    return " ".join(values) or group["settings"].get("sweep") or "run"


def settings_label(group: dict) -> str:
    """The group's settings as short key=value pairs (last part of each key), for tables that stand alone."""
    items = [f"{k.rpartition('.')[2]}={v}" for k, v in group["settings"].items() if v and k != "sweep"]
    return " ".join(items) or group["settings"].get("sweep") or "run"


def reference_routers() -> set[str]:
    """Registered routers that are references (Router.reference: the oracle, hash), not learned routers."""
    return {name for name, (cls, _) in ROUTERS.items() if cls.reference}


NO_METHOD = "none"
"""The method of a run that balances neither by its router nor by a balancing term."""


def method_and_scope(summary: dict) -> tuple[str, str]:
    """A run's balancing method (LBL, EB, SH, BA, EC, oracle, hash, none: the `label` of its registered
    router or balancing method) and the scope it balances over ("" for the references and unscoped
    methods), from its summary's chosen and resolved config: a reference router names the run, else a router
    that balances by itself (Router.balances), else a balancing method that adds a term."""
    config, resolved = summary.get("config", {}), summary.get("resolved", {})
    router, balance = config.get("router", ""), config.get("balance", "")
    router_cls = ROUTERS.find(str(router))
    if router_cls is not None and router_cls.reference:
        return router, ""
    if router_cls is not None and router_cls.balances:
        return label_of(router_cls), str(resolved.get("router", {}).get("scope", "") or "")
    balance_cls = BALANCE.find(str(balance))
    if balance_cls is not None and balance_cls.adds_term:
        return label_of(balance_cls), str(resolved.get("balance", {}).get("scope", "") or "")
    return NO_METHOD, ""


def router_label(router: str) -> str:
    """How a router shows in a plot label: its registered `label` (top-k softmax, the default, unnamed: ""),
    a router no longer registered by its name."""
    router_cls = ROUTERS.find(router)
    return router if router_cls is None else label_of(router_cls)


def base_label(group: dict) -> str:
    """A configuration's short name for figures: its balancing method and scope ("LBL, global", "SH,
    sequence"), a non-default router in front ("sigmoid, EB, global"), "oracle" / "hash", "dense" (and
    "dense, total params" for the dense model of the MoE's total size)."""
    summary = group["runs"][0]["summary"]
    settings = group["settings"]
    resolved_model = summary.get("resolved", {}).get("model")
    if resolved_model and not is_moe(summary):
        return "dense, total params" if "total" in str(resolved_model.get("name", "")) else "dense"
    method, scope = method_and_scope(summary)
    router = str(summary.get("config", {}).get("router") or settings.get("router", "")).rpartition("/")[2]
    if method == NO_METHOD:
        if not router:  # a summary that names neither: its settings, written as words
            return readable_label(settings_label(group))
        if router in reference_routers() or "balance" not in summary.get("config", {}):
            return router  # (a summary that does not say how it balances: its router only)
        return f"{router_label(router) or router}, no balancing"
    named = router_label(router)
    words = [w for w in (named if named not in (method, "") else "", method, scope) if w]
    return ", ".join(words)


def plot_labels(groups: list[dict]) -> list[str]:
    """Short legend labels of `groups`, one each, without raw overrides: `base_label`, and where groups share
    one, the settings that tell them apart written as words ("LBL, micro_batch, mixed batches", "LBL,
    micro_batch, coef. 0.01", "LBL, micro_batch, renormalized"); still equal: the sweep, else the folder the
    runs came from."""
    bases = [base_label(g) for g in groups]
    if any(b == "dense, total params" for b in bases):
        bases = ["dense, active params" if b == "dense" else b for b in bases]
    labels = list(bases)
    for base in {b for b in bases if bases.count(b) > 1}:
        members = [i for i, b in enumerate(bases) if b == base]
        keys = dict.fromkeys(k for i in members for k in groups[i]["settings"] if k not in ("sweep", "model"))
        for i in members:
            settings = groups[i]["settings"]
            extra = []
            for key in keys:
                values = {groups[j]["settings"].get(key, "") for j in members}
                value = settings.get(key, "")
                if len(values) > 1 and value:
                    word = readable_setting(key, value)
                    if word not in base.split(", "):
                        extra.append(word)
            labels[i] = ", ".join([base, *extra])
    for label in {lab for lab in labels if labels.count(lab) > 1}:
        members = [i for i, lab in enumerate(labels) if lab == label]
        sweeps = [groups[i]["settings"].get("sweep", "") for i in members]
        if len(set(sweeps)) == len(members) and all(sweeps):
            names = sweeps
        else:  # the first folder where their runs' paths part
            paths = [Path(groups[i]["runs"][0]["dir"]).resolve().parts for i in members]
            depth = next((d for d in range(min(map(len, paths))) if len({p[d] for p in paths}) > 1), None)
            names = [p[depth] if depth is not None else f"#{k + 1}" for k, p in enumerate(paths)]
        for i, name in zip(members, names, strict=True):
            labels[i] = f"{label} ({name})"
    return labels


def group_kind(group: dict) -> dict:
    """What a configuration's look in every figure follows (testbed.plots.looks): its method (`dense` for
    the dense baselines), its scope, and hollow for mixed batches (never for the references)."""
    summary = group["runs"][0]["summary"]
    if summary.get("resolved", {}).get("model") and not is_moe(summary):
        return {"method": DENSE, "scope": "", "hollow": False}
    method, scope = method_and_scope(summary)
    composition = summary.get("resolved", {}).get("data", {}).get("batch_composition")
    return {
        "method": method,
        "scope": scope,
        "hollow": composition == "mixed" and method not in reference_routers(),
    }


FRONTIER_METRICS = ("purity", "nmi", "reference_precision")


def frontier_points(runs: list[dict]) -> dict[str, list[dict]]:
    """Per specialization metric, one point per configuration: utilization and the metric (means over
    seeds, 95% CI half-widths as xerr/yerr, none for one seed), its label, method, scope and composition."""
    _, groups = group_runs(runs)
    labels = plot_labels(groups)
    out: dict[str, list[dict]] = {}
    for metric in FRONTIER_METRICS:
        points = []
        for group, label in zip(groups, labels, strict=True):
            util = ci95([r["summary"].get("spec/utilization/mean") for r in group["runs"]])
            value = ci95([r["summary"].get(f"spec/{metric}/mean") for r in group["runs"]])
            if util[2] and value[2]:
                points.append(
                    {
                        "label": label,
                        **group_kind(group),
                        "utilization": util[0],
                        metric: value[0],
                        "xerr": util[1] if util[2] > 1 else 0.0,
                        "yerr": value[1] if value[2] > 1 else 0.0,
                        "n": min(util[2], value[2]),
                    }
                )
        out[metric] = points
    return out


def frontier_plots(runs: list[dict], out_dir: Path) -> list[Path]:
    """Utilization vs specialization across groups (purity, nmi, reference precision), the Testbed paper's
    picture: a colour per method, a marker per scope, oracle and hash as references, hollow for mixed
    batches; error bars are 95% t confidence intervals over seeds (none for one seed; n in the title); an
    oracle far above the learned routers is marked at the top edge (frontier_scatter)."""
    paths = []
    for metric, points in frontier_points(runs).items():
        if points:
            path = out_dir / f"frontier_{metric}.png"
            frontier_scatter(
                points,
                out_path=path,
                x="utilization",
                y=metric,
                title=f"{metric_title(metric)} vs utilization ({spread_label([p['n'] for p in points])})",
            )
            paths.append(path)
    return paths


def _parse_csv(text: str) -> pd.DataFrame:
    """metrics.csv as a frame of floats (empty cells NaN), rows in logged order."""
    try:
        return pd.read_csv(io.StringIO(text)).apply(pd.to_numeric, errors="coerce")
    except pd.errors.EmptyDataError:  # an empty file: a run killed before its first log
        return pd.DataFrame()


def read_metrics_csv(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return pd.DataFrame()
    return _read_cached(path, _parse_csv)


def last_layer_values(run_dir: Path, metric: str) -> list[float]:
    """spec/<metric>/layer<i> from the last metrics.csv row that has them (the final validation);
    quiz/<metric> from the quiz evaluation's per-layer results."""
    if metric.startswith("quiz/"):
        result = quiz_result(run_dir)
        layers = [result.get("per_layer", {}).get(name, {}) for name in result.get("layers", [])]
        values = [layer.get(metric.removeprefix("quiz/")) for layer in layers]
        return [float(v) for v in values] if values and all(v is not None for v in values) else []
    frame = read_metrics_csv(run_dir)
    prefix = f"spec/{metric}/layer"
    layer_columns = [c for c in frame.columns if c.startswith(prefix) and c.removeprefix(prefix).isdigit()]
    logged = frame[layer_columns].dropna(how="all")
    if logged.empty:
        return []
    last = logged.iloc[-1].dropna()  # the last row that has them: the final validation
    return [float(v) for _, v in sorted((int(k.removeprefix(prefix)), v) for k, v in last.items())]


def layer_plots(runs: list[dict], out_dir: Path, metrics: tuple[str, ...]) -> list[Path]:
    """Per-layer curves of the final validation: mean over each group's seeds, shaded 95% t confidence
    interval (none for one seed)."""
    _, groups = group_runs(runs)
    labels = plot_labels(groups)
    paths = []
    for metric in metrics:
        series, bands, kinds, seeds = {}, {}, {}, []
        for group, label in zip(groups, labels, strict=True):
            per_run = [last_layer_values(run["dir"], metric) for run in group["runs"]]
            per_run = [v for v in per_run if v]
            if per_run and len({len(v) for v in per_run}) == 1:
                mean, half = t_interval(per_run)
                series[label], bands[label] = mean.tolist(), half.tolist()
                kinds[label] = group_kind(group)
                seeds.append(len(per_run))
        if series:
            path = out_dir / f"layers_{metric.replace('/', '_')}.png"
            title = f"{metric_title(metric)} per MoE layer, final validation ({spread_label(seeds)})"
            per_layer_curves(series, metric, out_path=path, title=title, bands=bands, kinds=kinds)
            paths.append(path)
    return paths


def saved_counts(run_dir: Path) -> dict:
    """The routing count tables of a run, as {"domains", "counts": {layer: [D][E]}, "overrides"}: from
    testbed-analyze's analysis/analysis.json where the run has one (it may score the run another way:
    router.eval_balanced=true), else from the last validation's table that training saved,
    routing/counts_step<N>.pt (read with the safe loader: tensors and plain containers only); {} if
    neither (a table that cannot be read is named in a warning)."""
    path = run_dir / "analysis" / "analysis.json"
    analysis = _read_cached(path, json.loads) if path.exists() else {}
    if analysis.get("counts"):
        return analysis
    tables = sorted(
        (run_dir / "routing").glob("counts_step*.pt"),
        key=lambda p: int(s) if (s := p.stem.removeprefix("counts_step")).isdigit() else -1,
    )
    if not tables:
        return {}
    try:
        return _counts_table(tables[-1], tables[-1].stat().st_mtime_ns)
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        print(f"warning: {tables[-1]}: not a routing count table, no heatmap panel ({err})", file=sys.stderr)
        return {}


@functools.lru_cache(maxsize=256)
def _counts_table(path: Path, mtime_ns: int) -> dict:
    table = load_file(path, "routing counts")
    counts = table["counts"]
    layers = list(table.get("layers") or [f"layer{i}" for i in range(counts.shape[0])])
    if counts.ndim != 3 or len(layers) != counts.shape[0] or len(table["domains"]) != counts.shape[1]:
        raise ValueError(f"counts of shape {tuple(counts.shape)} for {len(layers)} layers")
    return {
        "domains": list(table["domains"]),
        "counts": {name: counts[i].tolist() for i, name in enumerate(layers)},
        "step": table.get("step"),
    }


def heatmap_tables(runs: list[dict], layer: int = -1) -> list[dict]:
    """The count tables of one MoE layer, one per configuration (its lowest seed's run that has routing
    count tables: `saved_counts`, testbed-analyze's or the ones training saved), grouped by number of
    experts and by domains (X5 mixes 16- and 64-expert models; X6 fine-tunes on one domain of the mix):
    [{experts, layer, domains, names, counts, seeds}], first the first configuration's. Names come from
    `plot_labels` (and the analysis's own overrides: "balanced eval"), with the seed where the
    configurations show different ones."""
    _, groups = group_runs(runs)
    counts, labels, seeds, domain_lists, layer_name = [], [], [], [], None
    for group, label in zip(groups, plot_labels(groups), strict=True):
        with_counts = []
        for run in group["runs"]:
            analysis = saved_counts(Path(run["dir"]))
            if analysis.get("counts"):
                with_counts.append((run["summary"].get("seed", 0), run["dir"], analysis))
        if not with_counts:
            continue
        seed, _, analysis = min(with_counts, key=lambda item: (item[0], str(item[1])))
        names = list(analysis["counts"])
        layer_name = names[layer]
        domain_lists.append(list(analysis["domains"]))
        counts.append(analysis["counts"][layer_name])
        # the analysis's own overrides (e.g. router.eval_balanced=true: scored with balanced routing)
        scored = [readable_setting(*o.partition("=")[::2]) for o in analysis.get("overrides", [])]
        labels.append(", ".join([label, *scored]))
        seeds.append(seed)
    by_width: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for i, table in enumerate(counts):
        by_width.setdefault((len(table[0]), tuple(domain_lists[i])), []).append(i)
    tables = []
    for (experts, domains), members in by_width.items():
        shown = {seeds[i] for i in members}
        tables.append(
            {
                "experts": experts,
                "layer": layer_name,
                "domains": list(domains),
                "names": [
                    labels[i] if len(shown) == 1 else f"{labels[i]} (seed {seeds[i]})" for i in members
                ],
                "counts": [counts[i] for i in members],
                "seeds": sorted(shown),
            }
        )
    return tables


def heatmap_panels(runs: list[dict], out_dir: Path, layer: int = -1) -> list[Path]:
    """p(expert | domain) of one MoE layer, one panel per configuration (`heatmap_tables`), oracle blocks
    outlined: heatmaps.png, and heatmaps_<E>_experts.png for configurations with another number of experts.
    The seed goes in the figure's title when every panel shows the same one, else in each panel's name."""
    paths = []
    tables = heatmap_tables(runs, layer)
    for n, table in enumerate(tables):
        name = "heatmaps"
        if n > 0 and table["experts"] != tables[0]["experts"]:
            name += f"_{table['experts']}_experts"
        if n > 0 and table["domains"] != tables[0]["domains"]:
            name += f"_{len(table['domains'])}_domains"
        path = out_dir / f"{name}.png"
        seeds = table["seeds"]
        domain_expert_heatmaps(
            np.array(table["counts"]),
            table["domains"],
            table["names"],
            out_path=path,
            title=f"p(expert | domain), MoE {table['layer']}"
            + (f", seed {seeds[0]}" if len(seeds) == 1 else ""),
        )
        paths.append(path)
    return paths


def curve_of(run_dir: Path, metric: str) -> dict[int, float]:
    frame = read_metrics_csv(run_dir)
    if metric not in frame.columns or "step" not in frame.columns:
        return {}
    logged = frame[["step", metric]].dropna()
    return {int(step): float(value) for step, value in zip(logged["step"], logged[metric], strict=True)}


def known_curves(runs: list[dict]) -> list[str]:
    """The metric columns of the runs' metrics.csv files (sorted)."""
    columns: set[str] = set()
    for run in runs:
        columns |= set(read_metrics_csv(run["dir"]).columns)
    return sorted(columns - {"step", "epoch"})


def unknown_curves(runs: list[dict], metrics: tuple[str, ...]) -> list[str]:
    """The requested --curves metrics that cannot be a metric of these runs: no run logged them and their
    namespace (the part before the first "/") is not one any run logs (a typo would otherwise draw nothing,
    silently). A metric of a known namespace that no run logged yet (training metrics of very short runs)
    gets a warning instead."""
    known = set(known_curves(runs)) if metrics else set()
    if not known:
        print("warning: --curves: no run has a metrics.csv; no curve drawn", file=sys.stderr)
        return []
    spaces = {column.split("/")[0] for column in known}
    unknown = []
    for metric in metrics:
        if metric in known:
            continue
        if metric.split("/")[0] in spaces:
            print(f"warning: --curves {metric}: no run logged it; no curve drawn", file=sys.stderr)
        else:
            unknown.append(metric)
    return unknown


def curve_series(runs: list[dict], metric: str, x: str = "step") -> tuple[dict, list[int]]:
    """`metric` from metrics.csv per group, keyed by `settings_label`: (x, mean over seeds at the steps all
    its runs share, 95% t half-width; zero for one seed), and the seed counts; x = "tokens": training tokens
    (step x the run's tokens per step) instead of steps."""
    _, groups = group_runs(runs)
    series, seeds = {}, []
    for group in groups:
        curves = [c for c in (curve_of(run["dir"], metric) for run in group["runs"]) if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        xs = steps
        if x == "tokens":
            summary = group["runs"][0]["summary"]
            per_step = summary["tokens_seen"] / max(1, summary["steps"])
            xs = [(s + 1) * per_step for s in steps]  # a row logged at step s follows s + 1 steps
        mean, half = t_interval(values)
        series[settings_label(group)] = (xs, mean, half)
        seeds.append(len(curves))
    return series, seeds


def curve_plots(runs: list[dict], out_dir: Path, metrics: tuple[str, ...], x: str = "step") -> list[Path]:
    """Training curves of `metrics` from metrics.csv (`curve_series`): per group, mean over seeds, shaded
    95% t confidence interval (none for one seed); x = "tokens" draws training tokens (in millions). Series
    are named in the legend by `plot_labels`; training-batch purity lines that are 1.0 by construction are
    left out with a footnote (training_curves). A metric every run logged once draws nothing, with a note."""
    _, groups = group_runs(runs)
    names = dict(zip((settings_label(g) for g in groups), plot_labels(groups), strict=True))
    kinds = {settings_label(g): group_kind(g) for g in groups}
    paths = []
    for metric in metrics:
        series, seeds = curve_series(runs, metric, x)
        if series and all(len(xs) < 2 for xs, _, _ in series.values()):
            # one measurement per run is not a curve (it is in the table): said, not skipped silently
            print(
                f"note: --curves {metric}: no curve drawn, every run logged it once (one validation per "
                "run); its value is in the table",
                file=sys.stderr,
            )
            continue
        if series:
            path = out_dir / f"curve_{metric.replace('/', '_')}.png"
            spread = spread_label(seeds) if max(seeds) > 1 else "one seed"
            training_curves(
                series,
                metric,
                out_path=path,
                title=f"{metric_title(metric)} over training ({spread})",
                x_label="training tokens" if x == "tokens" else "step",
                labels={key: names.get(key, key) for key in series},
                kinds={key: kinds[key] for key in series},
            )
            paths.append(path)
    return paths


def html_page(runs: list[dict], text: str, args) -> Page:
    """What `--html` shows (testbed.analysis.html_report): the report's text, the frontiers, the heatmaps
    of `--heatmap-layer` and the `--curves` metrics, configurations named as in the figures."""
    _, groups = group_runs(runs)
    names = dict(zip((settings_label(g) for g in groups), plot_labels(groups), strict=True))
    page = Page(
        title="testbed-report: " + ", ".join("/".join(Path(d).resolve().parts[-2:]) for d in args.dirs),
        markdown=text,
        frontiers={m: points for m, points in frontier_points(runs).items() if points},
        curve_x=args.curve_x,
        sources=[str(Path(d).resolve()) for d in args.dirs],
    )
    for table in heatmap_tables(runs, args.heatmap_layer):
        maps = Heatmaps(layer=f"MoE {table['layer']}", domains=list(table["domains"]))
        for name, counts in zip(table["names"], table["counts"], strict=True):
            probs, order = expert_probabilities(np.asarray(counts, dtype=np.float64))
            maps.panels.append((name, probs.tolist()))
            maps.orders.append([int(e) for e in order])
        page.heatmaps.append(maps)
    for metric in split_list(args.curves):
        series, seeds = curve_series(runs, metric, args.curve_x)
        kept = {
            names.get(k, k): v
            for k, v in series.items()
            if len(v[0]) > 1 and not by_construction(metric, v[1], v[2])  # as in the PNG: no 1.0 by design
        }
        if kept:
            page.curves[metric] = kept
            page.curve_seeds[metric] = seeds
    page.curve_kinds = {names[settings_label(g)]: group_kind(g) for g in groups}
    return page


def curve_table(runs: list[dict], metric: str) -> str:
    """`metric` at each logged step (and its training tokens), one column per configuration: mean over
    seeds at the steps all its runs share, with the seed count."""
    _, groups = group_runs(runs)
    columns, steps_all = [], set()
    for group in groups:
        curves = [c for c in (curve_of(run["dir"], metric) for run in group["runs"]) if c]
        if not curves:
            continue
        shared = set.intersection(*(set(c) for c in curves))
        summary = group["runs"][0]["summary"]
        per_step = summary["tokens_seen"] / max(1, summary["steps"])
        columns.append(
            (
                settings_label(group),
                len(curves),
                {s: np.mean([c[s] for c in curves]) for s in shared},
                per_step,
            )
        )
        steps_all |= shared
    if not columns:
        return ""
    header = ["step", "tokens (M)", *[f"{label} (n={n})" for label, n, _, _ in columns]]
    lines = [f"{metric} over training:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in sorted(steps_all):
        tokens = {
            round((step + 1) * per_step / 1e6, 3) for _, _, values, per_step in columns if step in values
        }
        cells = [f"{v[step]:.3f}" if step in v else "" for _, _, v, _ in columns]
        lines.append(
            f"| {step + 1} | {'/'.join(str(t) for t in sorted(tokens))} | " + " | ".join(cells) + " |"
        )
    return "\n".join(["", "", *lines])


def matches(run: dict, conditions: str) -> bool:
    """`conditions`: `key=value` pairs joined by ';' (values compared case-insensitively: true == True);
    `key=` matches runs that do not set the key; `sweep=<name>` matches the runs of one sweep of a grid."""
    settings = {k: v.lower() for k, v in settings_of(run).items()}
    if run.get("sweep"):
        settings["sweep"] = run["sweep"].lower()
    pairs = [c.partition("=") for c in conditions.split(";") if c]
    return all(settings.get(k) == v.lower() if v else k not in settings for k, _, v in pairs)


def detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest true mean difference a two-sided paired t-test over n pairs (differences with standard
    deviation sd) detects with probability `power` at level `alpha` (noncentral t; Cohen 1988)."""
    if n < 3 or not sd > 0:  # with 2 pairs (1 degree of freedom) scipy's noncentral t is unreliable
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(noncentrality: float) -> float:
        reach = stats.nct.sf(crit, df, noncentrality) + stats.nct.cdf(-crit, df, noncentrality)
        return reach - power

    high = crit + 4.0  # widen until the power is reached (large noncentralities overflow nct)
    while shortfall(high) < 0 and high < 1e4:
        high *= 2
    try:
        noncentrality = brentq(shortfall, 1e-9, high)
    except ValueError:  # nct overflowed (NaN) inside the bracket: no statement rather than a wrong one
        return math.nan
    return noncentrality * sd / math.sqrt(n)


def compare(runs: list[dict], a: str, b: str, metric: str = "val/loss") -> str:
    """Paired comparison of two configurations over the seeds both have: the mean of (B - A) per seed, its
    95% t confidence interval and the paired t-test p-value."""
    by_seed = {}
    for side, conditions in (("A", a), ("B", b)):
        for run in runs:
            if matches(run, conditions):
                value = run_value(run, metric)
                if isinstance(value, int | float) and math.isfinite(value):
                    by_seed.setdefault(run["summary"].get("seed"), {})[side] = float(value)
    pairs = [(v["A"], v["B"]) for _, v in sorted(by_seed.items(), key=lambda kv: str(kv[0])) if len(v) == 2]
    if not pairs:
        return f"compare {metric}: no seed has both A ({a}) and B ({b})"
    diffs = [y - x for x, y in pairs]
    mean, half, n = ci95(diffs)
    line = f"compare {metric}: B ({b}) - A ({a}) = {mean:+.4f}"
    if n < 2:
        return line + f" (n = {n} seed pair: no interval)"
    p = one_sample_p(diffs)  # the paired t-test: B - A per seed against 0
    verdict = "excludes 0" if abs(mean) > half else "includes 0"
    line += f" ± {half:.4f} (95% CI over n = {n} seed pairs; paired t p = {p:.3g}; the interval {verdict})"
    smallest = detectable_effect(float(np.std(diffs, ddof=1)), n)
    if math.isfinite(smallest):  # a power statement: what a null result at this n and spread can rule out
        line += f"; detectable at 80% power: |effect| >= {smallest:.4f}"
    return line


P_VALUE = re.compile(r"\bp = ([0-9.eE+-]+|nan)")


def holm_file(path: Path, out: Path | None) -> int:
    """Holm's correction over every line of `path` that reports a paired test ('p = <value>'): each such line
    gains '; Holm p = <adjusted>, survives' (or 'does not survive') at family-wise level 0.05."""
    if not path.is_file():
        print(f"error: --holm {path}: no such file (a file of --compare lines)", file=sys.stderr)
        return 2
    lines = path.read_text().splitlines()
    found = [(i, float(m.group(1))) for i, line in enumerate(lines) if (m := P_VALUE.search(line))]
    if not found:
        print(f"error: --holm {path}: no line reports a p-value ('p = ...')", file=sys.stderr)
        return 2
    adjusted = holm([p for _, p in found])
    survivors = 0
    for (i, _), q in zip(found, adjusted, strict=True):
        if math.isfinite(q):
            survives = q < 0.05
            survivors += survives
            lines[i] = (
                lines[i].split("; Holm p =")[0]
                + f"; Holm p = {q:.3g}, "
                + ("survives" if survives else "does not survive")
            )
    m = sum(math.isfinite(q) for q in adjusted)
    lines.append(f"Holm over the {m} paired tests above (family-wise level 0.05): {survivors} survive.")
    text = "\n".join(lines)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0


def rank_main(args) -> int:
    try:
        (runs_a, _), (runs_b, _) = find_runs([args.rank[0]]), find_runs([args.rank[1]])
    except FileNotFoundError as err:
        print(f"error: --rank: {err}", file=sys.stderr)
        return 2
    metrics = split_list(args.columns) if args.columns != ",".join(DEFAULT_COLUMNS) else RANK_METRICS
    # each grid's folder name (the experiment's name where the grid is its collected runs/ folder)
    labels = tuple(p.parent.name if p.name == "runs" else p.name for p in args.rank)
    if args.rank_reference is not None:
        both = set(config_values(runs_a, metrics[0])) & set(config_values(runs_b, metrics[0]))
        if args.rank_reference not in both:
            print(
                f"error: --rank-reference {args.rank_reference}: not a configuration of both grids; those in "
                f"both: {', '.join(sorted(both)) or 'none'}",
                file=sys.stderr,
            )
            return 2
    if args.plots and (args.out is None or args.rank_reference is None):
        print(
            "error: --rank with --plots needs --out (the figure goes beside it, as <out>.png) and "
            "--rank-reference (the figure shows the differences from it)",
            file=sys.stderr,
        )
        return 2
    text = rank_report(runs_a, runs_b, labels, metrics, args.rank_reference)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plots:
        path = args.out.with_suffix(".png")
        print(f"wrote {rank_figure(runs_a, runs_b, labels, metrics[0], args.rank_reference, path)}")
    return 0


RANK_METRICS = ("val/loss", "spec/purity/mean")


def ladder_main(runs: list[dict], failed: list[Path], args) -> int:
    if "/" in args.ladder_figure or not args.ladder_figure.endswith(".png"):
        print(
            f"error: --ladder-figure {args.ladder_figure}: a file name ending in .png (no folder: it goes "
            "beside --out)",
            file=sys.stderr,
        )
        return 2
    baselines = BASELINES
    if args.ladder_baselines:
        baselines = tuple(b.strip() for b in args.ladder_baselines.split(","))
        names = collect(runs, args.ladder_metric, run_value)
        missing = [b for b in baselines if b not in names]
        if missing:
            print(
                f"error: --ladder-baselines: no finished run named {', '.join(missing)}; the runs' names: "
                f"{', '.join(sorted(names))}",
                file=sys.stderr,
            )
            return 2
    text, csv_rows, figure = ladder_report(runs, args.reference, args.ladder_metric, run_value, baselines)
    if failed:
        text += "\n\nNot finished (no result, not counted): " + ", ".join(str(p) for p in failed)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        with args.out.with_suffix(".csv").open("w", newline="") as fh:
            csv.writer(fh).writerows(csv_rows)
    if args.plots and figure:
        print(f"wrote {ladder_figure(figure, figure_folder(args) / args.ladder_figure, args.reference)}")
    return 0


def figure_folder(args) -> Path:
    """Where --plots (and --html) write: beside the --out report, else into the one run or sweep folder
    given (beside the runs); `figures_without_out` refuses several folders and no --out beforehand."""
    return args.out.parent if args.out else args.dirs[0]


def figures_without_out(args) -> str:
    """The error for figures asked without --out from several folders (there is no one place beside the
    runs): empty when there is a place."""
    flags = {"--plots": args.plots, "--html": args.html}
    if args.out or len(args.dirs) == 1 or not any(flags.values()):
        return ""
    wanted = " and ".join(flag for flag, on in flags.items() if on)
    return (
        f"error: {wanted} with {len(args.dirs)} run folders needs --out (the figures go beside the report: "
        "--out <folder>/report.md); with one folder they go into it"
    )


def split_list(value: str) -> tuple[str, ...]:
    return tuple(c for c in value.split(",") if c)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testbed-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS), help="summary.json keys to show")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (and a .csv beside it)")
    parser.add_argument("--per-run", action="store_true", help="one row per run instead of seed groups")
    parser.add_argument(
        "--where", action="append", default=[], help="keep runs whose override KEY=VALUE matches (repeatable)"
    )
    parser.add_argument(
        "--no-committed-baselines",
        action="store_true",
        help="look for regime baselines only among the given runs, not also under experiments/",
    )
    parser.add_argument(
        "--plots",
        action="store_true",
        help="also write figures (PNG and PDF) beside --out; without --out, into the one folder given",
    )
    parser.add_argument(
        "--html",
        action="store_true",
        help="also write one self-contained HTML page (tables, regime check, interactive frontiers, heatmaps "
        "and --curves; works offline) beside --out (its name, .html) or into the one folder given",
    )
    parser.add_argument(
        "--layer-metrics", default=",".join(DEFAULT_LAYER_METRICS), help="spec metrics for per-layer plots"
    )
    parser.add_argument("--curves", default=",".join(DEFAULT_CURVES), help="metrics.csv columns to plot")
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="paired difference B - A over seeds; A, B: key=value conditions joined by ';' (repeatable)",
    )
    parser.add_argument(
        "--compare-metric", default="val/loss", help="the summary key(s) --compare uses, comma-separated"
    )
    parser.add_argument(
        "--curve-table", default="", help="metrics.csv columns to tabulate per step (e.g. val/loss)"
    )
    parser.add_argument(
        "--curve-x", choices=("step", "tokens"), default="step", help="x axis of the training curves"
    )
    parser.add_argument(
        "--heatmap-layer",
        type=int,
        default=-1,
        help="with --plots: the MoE layer (index, -1 = last) of heatmaps.png, p(expert | domain) per "
        "configuration from runs that have testbed-analyze's analysis.json",
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="token ladder: runs grouped by run_name and length (steps), gains paired by seed at every rung "
        "against --reference and the dense baselines, Holm over the reference family, trend per doubling; "
        "with --plots, ladder.png",
    )
    parser.add_argument(
        "--reference", default="hash", help="with --ladder: the run_name every gain family uses"
    )
    parser.add_argument(
        "--ladder-baselines",
        default=None,
        help="with --ladder: the run_names compared with besides --reference, comma-separated (default: "
        "hash,dense_active,dense_total); e.g. dense_active_lr1e-2 for a ladder whose runs share a rate",
    )
    parser.add_argument(
        "--ladder-figure",
        default="ladder.png",
        help="with --ladder --plots: the figure's file name, beside --out (default ladder.png)",
    )
    parser.add_argument(
        "--ladder-metric",
        default="val/loss",
        help="with --ladder: the loss compared (a --columns key; analysis/val/loss: testbed-analyze's loss "
        "of each run's final checkpoint, e.g. on the whole validation split: data.val_tokens_per_domain=0)",
    )
    parser.add_argument(
        "--holm",
        type=Path,
        metavar="FILE",
        help="Holm-correct the paired tests in FILE (lines written by --compare, 'p = ...'): the family is "
        "the file; prints it with the adjusted p and whether each survives at 0.05 (no DIRS needed)",
    )
    parser.add_argument(
        "--rank",
        nargs=2,
        type=Path,
        metavar=("SMALLER", "LARGER"),
        help="scale ladder: the configurations (sweeps, else run names) of two grids ranked by --columns "
        "(default val/loss, purity), Spearman's rho with a bootstrap interval over seeds (no DIRS needed)",
    )
    parser.add_argument(
        "--rank-reference",
        metavar="CONFIGURATION",
        help="with --rank: every other configuration's difference from this one (e.g. lbl_micro_batch), "
        "paired by seed with its 95%% CI, at both scales; with --plots and --out, as a figure <out>.png",
    )
    args = parser.parse_args(argv)
    if args.holm is not None:
        return holm_file(args.holm, args.out)
    if args.rank is not None:
        return rank_main(args)
    if not args.dirs:
        parser.error("give run or sweep directories (or --holm FILE)")
    if refused := figures_without_out(args):
        print(refused, file=sys.stderr)
        return 2
    try:
        runs, failed = find_runs(args.dirs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs and not failed:
        print(
            f"error: no runs found under {[str(d) for d in args.dirs]} (looked for summary.json)",
            file=sys.stderr,
        )
        return 2
    asked = args.plots and args.curves != ",".join(DEFAULT_CURVES)  # the defaults may be absent quietly
    missing = unknown_curves(runs, split_list(args.curves)) if asked else []
    if missing:
        print(
            f"error: --curves {','.join(missing)}: no run's metrics.csv has "
            f"{'these columns' if len(missing) > 1 else 'this column'}; some that exist: "
            f"{known_curves(runs)[:12]}",
            file=sys.stderr,
        )
        return 2
    add_regime(runs, [] if args.no_committed_baselines else [CHECKOUT / "experiments"])
    if args.ladder:
        return ladder_main(runs, failed, args)
    for condition in args.where:
        key, _, value = condition.partition("=")
        runs = [run for run in runs if settings_of(run).get(key) == value]
    columns = split_list(args.columns)
    if args.per_run:
        header, rows = table_rows(runs, columns)
        csv_header, csv_rows = header, rows
    else:
        header, rows, csv_rows = group_table(runs, columns) if runs else ([], [], [])
        csv_header = [*header[: len(header) - len(columns)]]
        csv_header += [f"{c}:{s}" for c in columns for s in ("mean", "std", "n")]
    text = markdown(header, rows, failed) if header else markdown(["run"], [], failed)
    text += regime_table(runs) if runs and not args.per_run else ""
    text += repetition_note(runs)
    text += baseline_note(runs)
    for metric in split_list(args.curve_table):
        text += curve_table(runs, metric)
    for metric in split_list(args.compare_metric):
        for a, b in args.compare:
            text += "\n\n" + compare(runs, a, b, metric)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        with args.out.with_suffix(".csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(csv_header)
            writer.writerows(csv_rows)
    if args.plots and runs:
        out_dir = figure_folder(args)
        paths = frontier_plots(runs, out_dir)
        paths += layer_plots(runs, out_dir, split_list(args.layer_metrics))
        paths += curve_plots(runs, out_dir, split_list(args.curves), args.curve_x)
        paths += heatmap_panels(runs, out_dir, args.heatmap_layer)
        for path in paths:
            print(f"wrote {path}")
    if args.html and runs:
        out = args.out.with_suffix(".html") if args.out else figure_folder(args) / "report.html"
        print(f"wrote {write_page(html_page(runs, text, args), out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
