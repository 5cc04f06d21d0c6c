"""Figures of the peer analyses (testbed/analysis/peers.py), one per analysis, drawn from the numbers of
peers.json: sized for a paper's column (3.4 inches wide), every text at least 7 points, axis labels in words,
each saved as PNG and PDF. Built on `matplotlib.figure.Figure` (Agg canvas, no pyplot global state)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

COLUMN = 3.4  # inches: one column of a two-column paper
DPI = 300
STYLE = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,  # editable text in the PDF
}
MAX_PANELS = 4


def _figure(height: float, width: float = COLUMN) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, out: Path, stem: str) -> list[str]:
    """`stem`.png and `stem`.pdf in `out`; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    with matplotlib.rc_context(STYLE), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # token texts in other scripts
        for suffix in ("png", "pdf"):
            fig.savefig(out / f"{stem}.{suffix}", dpi=DPI)
            names.append(f"{stem}.{suffix}")
    return names


def pick_layers(names: Sequence[str], count: int = MAX_PANELS) -> list[str]:
    """At most `count` names spread over the list: the first, the last and evenly spaced ones between."""
    if len(names) <= count:
        return list(names)
    picks = np.unique(np.linspace(0, len(names) - 1, count).round().astype(int))
    return [names[i] for i in picks]


def _layer_axis(ax, names: Sequence[str]) -> None:
    step = max(1, len(names) // 8)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([_short(n) for n in names[::step]])
    ax.set_xlabel("MoE layer")


def _short(name: str) -> str:
    return name.removeprefix("layer")


def _matrix_panels(
    fig: Figure,
    matrices: Mapping[str, np.ndarray],
    xlabel: str,
    ylabel: str,
    colorbar: str,
    mask_diagonal: bool = False,
    grid=None,
):
    """One heatmap per matrix in a grid and one colour bar; the shared scale runs from 0 to the largest
    value shown (probabilities: at most 1), so that sparse routing (P ~ K/E) stays visible."""
    names = list(matrices)
    shown = []
    for m in matrices.values():
        m = np.array(m, dtype=np.float64)
        if mask_diagonal:
            np.fill_diagonal(m, np.nan)
        shown.append(m[np.isfinite(m)])
    values = np.concatenate(shown) if shown else np.zeros(0)
    vmax = float(min(1.0, max(values.max() if values.size else 1.0, 1e-3)))
    columns = 1 if len(names) == 1 else 2
    rows = int(np.ceil(len(names) / columns))
    axes = (grid or fig).subplots(rows, columns, squeeze=False)
    image = None
    for ax, name in zip(axes.ravel(), names, strict=False):
        m = np.array(matrices[name], dtype=np.float64)
        if mask_diagonal:
            np.fill_diagonal(m, np.nan)
        image = ax.imshow(
            np.ma.masked_invalid(m), vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest", aspect="auto"
        )
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _expert_ticks(ax, m.shape[0])
    for ax in axes.ravel()[len(names) :]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        bar.set_label(colorbar)
    return axes


def _expert_ticks(ax, num_experts: int) -> None:
    step = max(1, int(np.ceil(num_experts / 8)))
    ticks = list(range(0, num_experts, step))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)


def coactivation_figure(
    coactivation: Mapping[str, Mapping], out: Path, title: str | None = None
) -> list[str]:
    """P(expert j also chosen | expert i chosen) for up to four layers (the diagonal, 1 by definition,
    left blank)."""
    names = pick_layers(list(coactivation))
    with matplotlib.rc_context(STYLE):
        fig = _figure(1.6 * int(np.ceil(len(names) / 2)) + 0.5 if len(names) > 1 else 2.8)
        matrices = {n: np.array(coactivation[n]["p_j_given_i"], dtype=np.float64) for n in names}
        _matrix_panels(
            fig,
            matrices,
            "expert j",
            "expert i",
            "P(j chosen | i chosen)",
            mask_diagonal=True,
        )
        if title:
            fig.suptitle(title)
    return save(fig, out, "peers_coactivation")


def tokens_figure(tokens: Mapping, out: Path, title: str | None = None) -> list[str]:
    """Top: per layer, the share of token types (seen at least min_count times) whose most frequent expert
    takes more than half of their occurrences, and the mean concentration c_v beside the K/E of routing
    that ignores the type. Bottom: the distribution of c_v for up to three layers."""
    layers = tokens["layers"]
    names = list(layers)
    vocab = [layers[n]["vocabulary"] for n in names]
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.2)
        top, bottom = fig.subplots(2, 1)
        x = np.arange(len(names))

        def series(key):
            return [np.nan if v.get(key) is None else v[key] for v in vocab]

        top.plot(x, series("share_types_mostly_one_expert"), "o-", label="types mostly on one expert")
        top.plot(x, series("mean_concentration"), "s--", label="mean top-expert share")
        top.plot(x, series("uniform_concentration"), ":", color="grey", label="type-blind routing (K/E)")
        top.set_ylim(0, 1.05)
        top.set_ylabel("share of token types")
        _layer_axis(top, names)
        top.legend(loc="best", frameon=False)
        for name in pick_layers(names, 3):
            hist = layers[name]["vocabulary"]["histogram"]
            edges = np.asarray(hist["edges"])
            counts = np.asarray(hist["types"], dtype=np.float64)
            total = counts.sum()
            if total > 0:
                bottom.stairs(counts / total, edges, label=f"layer {_short(name)}")
        bottom.axvline(0.5, color="grey", lw=0.6, ls=":")
        bottom.set_xlabel("share of a token type's occurrences sent to its top expert")
        bottom.set_ylabel("fraction of token types")
        bottom.set_xlim(0, 1)
        bottom.legend(loc="best", frameon=False)
        if title:
            fig.suptitle(title)
    return save(fig, out, "peers_tokens")


def token_label(text: str | None, token_id: int, width: int = 12) -> str:
    """A token's text as a tick label: whitespace made visible, long texts cut, its id when unknown."""
    if text is None:
        return f"#{token_id}"
    shown = text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in shown) or "''"
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def top_tokens_figure(tokens: Mapping, out: Path, title: str | None = None, experts: int = 4) -> list[str]:
    """One layer (the last): for the `experts` experts whose best token has the highest lift, their top
    input tokens by lift (bars: lift over the token's base rate, 1 = no preference)."""
    layers = tokens["layers"]
    name = list(layers)[-1]
    rows = [e for e in layers[name]["experts"] if e.get("top_input_by_lift")]
    rows = sorted(rows, key=lambda e: -e["top_input_by_lift"][0]["lift"])[:experts]
    with matplotlib.rc_context(STYLE):
        fig = _figure(1.3 * int(np.ceil(max(len(rows), 1) / 2)) + 0.4)
        axes = fig.subplots(int(np.ceil(max(len(rows), 1) / 2)), 2, squeeze=False)
        for ax, entry in zip(axes.ravel(), rows, strict=False):
            best = entry["top_input_by_lift"][:5][::-1]
            ax.barh(range(len(best)), [r["lift"] for r in best], color="tab:blue")
            ax.set_yticks(range(len(best)))
            ax.set_yticklabels([token_label(r.get("token"), r["id"]) for r in best])
            ax.axvline(1.0, color="grey", lw=0.6, ls=":")
            ax.set_title(f"expert {entry['expert']}")
            ax.set_xlabel("lift over base rate")
        for ax in axes.ravel()[len(rows) :]:
            ax.set_visible(False)
        fig.suptitle(f"top input tokens by lift, layer {_short(name)}" + (f" ({title})" if title else ""))
    return save(fig, out, "peers_top_tokens")


def cross_layer_figure(cross_layer: Mapping[str, Mapping], out: Path, title: str | None = None) -> list[str]:
    """Top: determinism 1 - H(E_{l+1} | E_l) / H(E_{l+1}) per consecutive layer pair, over all assignment
    pairs and over the top-1 experts. Bottom: P(expert at l+1 | expert at l) for the first and last pairs."""
    pairs = list(cross_layer)
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.6)
        upper, lower = fig.subfigures(2, 1, height_ratios=[1, 1.5])
        ax = upper.subplots()
        x = np.arange(len(pairs))
        for key, style, label in (("assignments", "o-", "all experts"), ("top1", "s--", "top-1 expert")):
            values = [cross_layer[p][key].get("determinism") for p in pairs]
            ax.plot(x, [np.nan if v is None else v for v in values], style, label=label)
        ax.set_xticks(x[:: max(1, len(pairs) // 6)])
        ax.set_xticklabels([_pair_label(p) for p in pairs][:: max(1, len(pairs) // 6)])
        ax.set_xlabel("layer pair (l to l+1)")
        ax.set_ylabel("determinism of the path")
        ax.set_ylim(0, 1.05)
        ax.legend(loc="best", frameon=False)
        shown = pick_layers(pairs, 2)
        matrices = {
            _pair_label(p): np.array(cross_layer[p]["assignments"]["p_next_given_prev"], dtype=np.float64)
            for p in shown
        }
        if matrices:
            _matrix_panels(lower, matrices, "expert at layer l+1", "expert at layer l", "P(next | previous)")
        if title:
            fig.suptitle(title)
    return save(fig, out, "peers_cross_layer")


def _pair_label(pair: str) -> str:
    a, _, b = pair.partition("->")
    return f"{_short(a)}→{_short(b)}"


def agreement_figure(agreement: Mapping, out: Path, title: str | None = None) -> list[str]:
    """Per layer: the share of tokens whose expert set is identical under both checkpoints, the mean overlap
    |A ∩ B| / k, and the share with the same top-1 expert."""
    layers = agreement["layers"]
    names = list(layers)
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.4)
        ax = fig.subplots()
        x = np.arange(len(names))
        for key, style, label in (
            ("exact", "o-", "same expert set"),
            ("overlap", "s--", "overlap |A∩B| / k"),
            ("top1", "^:", "same top-1 expert"),
        ):
            ax.plot(
                x, [np.nan if layers[n][key] is None else layers[n][key] for n in names], style, label=label
            )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of tokens")
        _layer_axis(ax, names)
        ax.legend(loc="best", frameon=False)
        other = Path(str(agreement.get("checkpoint_b", "B")).rstrip("/")).name
        ax.set_title(f"routing vs {other}")
        if title:
            fig.suptitle(title)
    return save(fig, out, "peers_agreement")


def loss_change_figure(table: Mapping, kind: str, out: Path, title: str | None = None) -> list[str]:
    """Top: mean loss change over the domains (nats/token) per layer and expert, on a scale centred at 0.
    Bottom: the per-domain change of the top (layer, expert) pairs (ablation: largest increase; forcing:
    smallest)."""
    names = list(table["delta_mean"])
    mean = np.array([table["delta_mean"][n] for n in names], dtype=np.float64)
    top = table["top"][:6]
    domains = list(table["baseline"])
    with matplotlib.rc_context(STYLE):
        fig = _figure(2.0 + 0.14 * len(names) + 1.8)
        upper, lower = fig.subfigures(2, 1, height_ratios=[1.0 + 0.14 * len(names), 1.8])
        ax = upper.subplots()
        bound = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
        bound = bound if bound > 0 else 1.0
        image = ax.imshow(
            mean,
            cmap="RdBu_r",
            norm=TwoSlopeNorm(0.0, -bound, bound),
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_short(n) for n in names])
        ax.set_ylabel("MoE layer")
        ax.set_xlabel("expert " + ("switched off" if kind == "ablation" else "forced for every token"))
        step = max(1, int(np.ceil(mean.shape[1] / 8)))
        ax.set_xticks(range(0, mean.shape[1], step))
        upper.colorbar(image, ax=ax, label="loss change (nats/token)")
        bars = lower.subplots()
        width = 0.8 / max(len(domains), 1)
        for i, domain in enumerate(domains):
            bars.bar(
                np.arange(len(top)) + (i - (len(domains) - 1) / 2) * width,
                [entry["delta"][domain] for entry in top],
                width,
                label=domain,
            )
        bars.axhline(0, color="black", lw=0.5)
        bars.set_xticks(range(len(top)))
        bars.set_xticklabels([f"L{_short(e['layer'])} E{e['expert']}" for e in top])
        rank = "largest mean increase" if kind == "ablation" else "smallest mean change"
        bars.set_xlabel(f"layer and expert ({rank})")
        bars.set_ylabel("loss change (nats/token)")
        bars.legend(loc="best", frameon=False, ncols=min(len(domains), 3))
        if title:
            fig.suptitle(title)
    return save(fig, out, f"peers_{kind}")


def contribution_figure(
    contribution: Mapping[str, Mapping], out: Path, title: str | None = None
) -> list[str]:
    """Top: per layer, the top-1 expert's share of the summed expert-output norms, the cosine between its
    gated output and the routed mixture, and the mixture's relative error without the others. Bottom: the
    mean share by gate rank for up to three layers."""
    names = list(contribution)
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.2)
        top, bottom = fig.subplots(2, 1)
        x = np.arange(len(names))
        for key, style, label in (
            ("top1_share", "o-", "top-1 share of output norm"),
            ("top1_cosine", "s--", "cosine(top-1 output, mixture)"),
            ("top1_relative_error", "^:", "relative error of top-1 alone"),
        ):
            top.plot(
                x,
                [np.nan if contribution[n][key] is None else contribution[n][key] for n in names],
                style,
                label=label,
            )
        top.set_ylabel("mean over tokens")
        top.set_ylim(min(0.0, top.get_ylim()[0]), 1.05)
        _layer_axis(top, names)
        top.legend(loc="best", frameon=False)
        shown = pick_layers(names, 3)
        width = 0.8 / max(len(shown), 1)
        for i, name in enumerate(shown):
            shares = np.array(contribution[name]["share_by_rank"], dtype=np.float64)
            bottom.bar(
                np.arange(len(shares)) + 1 + (i - (len(shown) - 1) / 2) * width,
                shares,
                width,
                label=f"layer {_short(name)}",
            )
        bottom.set_xticks(
            range(1, 1 + max((len(contribution[n]["share_by_rank"]) for n in shown), default=0))
        )
        bottom.set_xlabel("rank of the expert by gate (1 = largest)")
        bottom.set_ylabel("mean share of output norm")
        bottom.set_ylim(0, 1.05)
        bottom.legend(loc="best", frameon=False)
        if title:
            fig.suptitle(title)
    return save(fig, out, "peers_contribution")


def peer_figures(payload: Mapping, out: Path) -> list[str]:
    """Every figure whose analysis is in `payload` (peers.json); returns the file names written."""
    title = payload.get("model_label")
    files: list[str] = []
    if payload.get("coactivation"):
        files += coactivation_figure(payload["coactivation"], out, title)
    if payload.get("tokens"):
        files += tokens_figure(payload["tokens"], out, title)
        files += top_tokens_figure(payload["tokens"], out, title)
    if payload.get("cross_layer"):
        files += cross_layer_figure(payload["cross_layer"], out, title)
    if payload.get("agreement"):
        files += agreement_figure(payload["agreement"], out, title)
    for kind in ("ablation", "forcing"):
        if payload.get(kind):
            files += loss_change_figure(payload[kind], kind, out, title)
    if payload.get("contribution"):
        files += contribution_figure(payload["contribution"], out, title)
    return files
