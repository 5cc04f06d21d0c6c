"""Plots: PNGs written and readable, heatmap reordering recovers the oracle layout, edge cases are quiet."""

from __future__ import annotations

import warnings

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.text import Text

from testbed.layout import block_layout
from testbed.plots import (
    MIN_FONT,
    domain_expert_heatmaps,
    frontier_scatter,
    per_layer_curves,
    readable_label,
    save_figure,
    t_interval,
    training_curves,
)

D, E = 8, 16
DOMAINS = [f"domain{d}" for d in range(D)]


def oracle_table(num_domains: int = D, num_experts: int = E) -> np.ndarray:
    """Each domain routed only (and evenly) to its oracle block; domains get different totals."""
    n = np.zeros((num_domains, num_experts))
    for d, block in enumerate(block_layout(num_experts, num_domains)):
        n[d, block] = 10.0 * (d + 1)
    return n


def assert_png(path) -> None:
    assert path.exists() and path.stat().st_size > 0
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


def test_heatmaps_write_one_panel_per_layer(tmp_path):
    uniform = np.full((D, E), 5.0)
    for layers in (1, 2, 5):
        counts = np.stack([oracle_table() if i % 2 == 0 else uniform for i in range(layers)])
        out = tmp_path / f"sub/heatmap{layers}.png"
        fig = domain_expert_heatmaps(
            counts, DOMAINS, [f"layer{i}" for i in range(layers)], out_path=out, title="t"
        )
        assert_png(out)
        assert len(fig.axes) == layers + 1  # panels + the shared colorbar
        assert all(len(ax.images) == 1 for ax in fig.axes[:layers])


@pytest.mark.parametrize("order", ["reference", "id"])
def test_reference_order_recovers_block_layout(order):
    oracle = oracle_table()
    perm = np.random.default_rng(0).permutation(E)
    permuted = oracle[:, perm]  # expert j now behaves like oracle expert perm[j]
    fig = domain_expert_heatmaps(np.stack([permuted, oracle]), DOMAINS, ["permuted", "oracle"], order=order)
    shown_permuted = np.asarray(fig.axes[0].images[0].get_array())
    shown_oracle = np.asarray(fig.axes[1].images[0].get_array())
    expected_oracle = oracle / oracle.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(shown_oracle, expected_oracle)
    ticks = [int(t.get_text()) for t in fig.axes[0].get_xticklabels()]
    if order == "reference":
        np.testing.assert_allclose(shown_permuted, expected_oracle)
        oracle_domain = np.repeat(np.arange(D), E // D)
        assert ticks == list(np.argsort(oracle_domain[perm], kind="stable"))
        assert sorted(ticks) == list(range(E)) and ticks != list(range(E))
    else:
        np.testing.assert_allclose(shown_permuted, expected_oracle[:, perm])
        assert ticks == list(range(E))


@pytest.mark.parametrize(
    "counts",
    [np.zeros((2, D, E)), np.ones((1, 12, 4)), np.zeros((1, 12, 4)), oracle_table(3, 7)[None]],
    ids=["zeros", "d_gt_e", "d_gt_e_zeros", "uneven_blocks"],
)
def test_heatmap_edge_cases_are_quiet(tmp_path, counts):
    names = [f"d{i}" for i in range(counts.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = domain_expert_heatmaps(
            counts, names, [f"l{i}" for i in range(len(counts))], out_path=tmp_path / "h.png"
        )
    assert_png(tmp_path / "h.png")
    assert len(fig.axes) == len(counts) + 1
    if counts.shape[1] > counts.shape[2]:
        assert "no oracle layout" in fig.axes[0].get_title()


def test_heatmap_rejects_bad_order():
    with pytest.raises(ValueError):
        domain_expert_heatmaps(oracle_table()[None], DOMAINS, ["l0"], order="random")


def test_frontier_marker_per_method_colour_per_scope(tmp_path):
    points = [
        {"method": "oracle", "scope": "", "utilization": 1.0, "purity": 1.0},
        {"method": "hash", "scope": "", "utilization": 0.93, "purity": 0.16},
        {"method": "LBL", "scope": "sequence", "utilization": 0.9, "purity": 0.3, "yerr": 0.01},
        {"method": "LBL", "scope": "global", "utilization": 0.9, "purity": 0.4, "xerr": 0.01},
        {"method": "SH", "scope": "global", "utilization": 0.95, "purity": 0.35, "hollow": True},
    ]
    out = tmp_path / "frontier.png"
    fig = frontier_scatter(points, out_path=out, title="frontier")
    assert_png(out)
    ax = fig.axes[0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == len(points)  # one marker per point
    edge = [tuple(np.round(c.get_edgecolor()[0], 3)) for c in scatters]
    assert edge[2] != edge[3] and edge[3] == edge[4]  # colour = scope: sequence vs global; global twice
    shapes = [c.get_paths()[0].vertices.shape for c in scatters]
    assert shapes[2] == shapes[3] and shapes[3] != shapes[4]  # marker = method: LBL twice, SH differs
    assert len(scatters[4].get_facecolor()) == 0 or scatters[4].get_facecolor()[0][3] == 0  # hollow: mixed
    legends = [a for a in ax.artists if a.__class__.__name__ == "Legend"] + [ax.get_legend()]
    titles = {leg.get_title().get_text() for leg in legends if leg is not None}
    assert titles == {"method", "scope"}
    assert ax.get_xlabel() == "utilization (1 = perfect balance)"
    assert not fig.legends  # every point has its own (method, scope, composition): no variant legend


def test_frontier_distinguishes_configurations_of_one_method_and_scope(tmp_path):
    """X3's top-k with and without renormalization (both LBL at micro-batch scope) and a third LBL run: a
    colour of its own each (not a scope's colour), and a legend naming what differs (renormalize=...)."""
    points = [
        {"label": "topk_softmax load_balance", "method": "LBL", "scope": "micro_batch", "utilization": 0.89,
         "purity": 0.37},
        {"label": "topk_softmax load_balance renormalize=true", "method": "LBL", "scope": "micro_batch",
         "utilization": 0.88, "purity": 0.34},
        {"label": "topk_softmax load_balance w=10", "method": "LBL", "scope": "micro_batch",
         "utilization": 0.5, "purity": 0.2},
        {"label": "sigmoid expert_bias", "method": "EB", "scope": "micro_batch", "utilization": 0.98,
         "purity": 0.34},
        {"label": "oracle none", "method": "oracle", "scope": "", "utilization": 1.0, "purity": 1.0},
    ]  # fmt: skip
    fig = frontier_scatter(points, out_path=tmp_path / "f.png")
    assert_png(tmp_path / "f.png")
    scatters = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    edge = [tuple(np.round(c.get_edgecolor()[0], 3)) for c in scatters]
    assert len(set(edge[:3])) == 3  # three LBL micro-batch configurations, three hues
    assert edge[3] == tuple(np.round(matplotlib.colors.to_rgba("tab:orange"), 3))  # alone: the scope colour
    assert not {matplotlib.colors.to_rgba(c) for c in ("tab:blue", "tab:orange", "tab:green")} & {
        tuple(c.get_edgecolor()[0]) for c in scatters[:3]
    }  # no variant takes a scope's colour
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "LBL, micro_batch scope"
    scope_legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in scope_legend.get_texts()] == ["micro_batch"]  # drawn by EB in its colour
    fig = frontier_scatter(points[:3] + points[4:])  # no point left in a scope colour: no scope legend
    method_legend = fig.axes[0].get_legend()
    assert method_legend.get_title().get_text() == "method"
    assert method_legend.get_clip_box() is None  # not clipped away by the axes (it sits outside them)
    assert [t.get_text() for t in legend.get_texts()] == [  # what differs, written without '='
        "topk_softmax load_balance",
        "renormalized",
        "w 10",
    ]
    legend_colours = [
        tuple(np.round(matplotlib.colors.to_rgba(h.get_color()), 3)) for h in legend.legend_handles
    ]
    assert legend_colours == edge[:3]


def test_per_layer_curves_and_save_figure(tmp_path):
    series = {"top-k": [0.9, 0.7, 0.5, 0.4], "oracle": [0.1, 0.1, 0.1, 0.1]}
    out = tmp_path / "curves.png"
    fig = per_layer_curves(series, "gate_entropy", out_path=out)
    assert_png(out)
    assert len(fig.axes[0].lines) == 2
    assert fig.axes[0].get_ylabel() == "gate entropy (1 = uniform router)"  # spelled out
    assert fig.axes[0].get_ylim()[0] == 0.0  # a fraction's axis starts at 0
    assert_png(save_figure(fig, tmp_path / "a/b/again.png"))


T_975_2DF = 4.302652729911275  # t_{0.975} with 2 degrees of freedom (tables: 4.303)


def band_half_widths(ax) -> dict[float, float]:
    """Half the height of the shaded band at each x it spans, read from the drawn PolyCollection."""
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    vertices = band.get_paths()[0].vertices
    heights: dict[float, list[float]] = {}
    for x, y in vertices:
        heights.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (max(ys) - min(ys)) / 2 for x, ys in heights.items()}


def test_t_interval_is_the_95_percent_t_interval():
    """Three seeds 1, 2, 4: mean 7/3, sd sqrt(7/3), half-width t_{0.975,2} sd / sqrt(3); one seed: no band."""
    mean, half = t_interval([[1.0, 10.0], [2.0, 10.0], [4.0, 10.0]])
    assert mean[0] == pytest.approx(7 / 3) and mean[1] == pytest.approx(10.0)
    assert half[0] == pytest.approx(T_975_2DF * np.sqrt(7 / 3) / np.sqrt(3), rel=1e-9)  # 3.7946
    assert half[1] == 0.0  # no spread, no band
    mean, half = t_interval([[0.5, 0.7]])
    assert mean.tolist() == [0.5, 0.7] and half.tolist() == [0.0, 0.0]


def test_training_curve_band_is_the_given_interval_and_tokens_read_in_millions(tmp_path):
    seeds = np.array([[1.0, 3.0, 5.0], [2.0, 3.5, 5.0], [4.0, 4.0, 5.0]])  # 3 seeds x 3 logged points
    mean, half = t_interval(seeds)
    tokens = [1.0e6, 2.0e6, 3.0e6]
    out = tmp_path / "curve.png"
    fig = training_curves({"run": (tokens, mean, half)}, "val/loss", out_path=out, x_label="training tokens")
    assert_png(out)
    ax = fig.axes[0]
    widths = band_half_widths(ax)
    expected = T_975_2DF * seeds.std(axis=0, ddof=1) / np.sqrt(3)
    assert [widths[x] for x in tokens] == pytest.approx(expected.tolist(), rel=1e-9)
    assert widths[1.0e6] == pytest.approx(T_975_2DF * np.sqrt(7 / 3) / np.sqrt(3), rel=1e-9)
    assert ax.get_xlabel() == "training tokens (M)"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all("e" not in t for t in labels) and "3" in labels  # 3e6 tokens read "3"
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    one_seed = training_curves({"run": (tokens, [5.0, 4.5, 4.2], [0.0, 0.0, 0.0])}, "val/loss")
    assert not [c for c in one_seed.axes[0].collections if isinstance(c, PolyCollection)]  # n = 1: no band


def test_training_purity_that_is_one_by_construction_is_left_out(tmp_path):
    steps = [0, 25, 50]
    series = {
        "balance.scope=global": (steps, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),  # homogeneous batches
        "router=oracle": (steps, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]),
        "batch_composition=mixed": (steps, [0.35, 0.4, 0.42], [0.02, 0.03, 0.02]),
    }
    labels = {"balance.scope=global": "LBL, global", "router=oracle": "oracle"}
    fig = training_curves(series, "train/spec/purity/mean", out_path=tmp_path / "p.png", labels=labels)
    assert_png(tmp_path / "p.png")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["mixed batches"]  # the only result; no '=' left
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["2 lines omitted, 1.0 by construction: LBL, global, oracle"]
    # a validation loss of 1.0 is a result, and so is a training purity that moves
    kept = training_curves({"a": (steps, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])}, "val/loss")
    assert len(kept.axes[0].lines) == 1 and not kept.axes[0].texts
    only = training_curves({"a": (steps, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])}, "train/spec/purity/mean")
    assert not only.axes[0].lines and "1 line omitted" in only.axes[0].texts[-1].get_text()


def test_frontier_oracle_does_not_set_the_axis(tmp_path):
    """Learned routers below 0.5 and the oracle at 1.0: the y axis spans the learned points (and their error
    bars), the oracle is marked at the top edge with its value."""
    points = [
        {"method": "oracle", "scope": "", "utilization": 1.0, "purity": 1.0, "label": "oracle"},
        {"method": "hash", "scope": "", "utilization": 0.93, "purity": 0.16, "label": "hash"},
        {"method": "LBL", "scope": "global", "utilization": 0.97, "purity": 0.19, "yerr": 0.01},
        {"method": "EB", "scope": "global", "utilization": 0.96, "purity": 0.35, "yerr": 0.03},
    ]
    fig = frontier_scatter(points, out_path=tmp_path / "f.png")
    assert_png(tmp_path / "f.png")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0.38 <= high < 0.5 and 0.0 <= low <= 0.15  # the learned points (0.16-0.38) fill the axes
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    star = scatters[0].get_offsets()[0]
    assert star[0] == 1.0 and star[1] == pytest.approx(high)  # on the top edge
    assert [t.get_text() for t in ax.texts] == ["oracle: 1.00 ↑"]
    # no oracle: nothing is marked, the axes scale themselves
    fig = frontier_scatter(points[1:])
    assert not fig.axes[0].texts
    # an oracle inside the learned points' range is drawn where it is
    near = [dict(points[0], purity=0.3), *points[1:]]
    ax = frontier_scatter(near).axes[0]
    assert not ax.texts and ax.get_ylim()[0] < 0.3 < ax.get_ylim()[1]


def test_heatmaps_fit_a_page_at_seven_points(tmp_path):
    """15 configurations: at most 4 panels a row, every text at least 7 pt at the saved size, a figure no
    wider than a landscape page."""
    counts = np.stack([oracle_table() for _ in range(15)])
    names = [f"LBL, micro_batch, mixed batches {i}" for i in range(15)]
    fig = domain_expert_heatmaps(
        counts, DOMAINS, names, out_path=tmp_path / "h.png", title="p(expert | domain)"
    )
    assert_png(tmp_path / "h.png")
    panels = fig.axes[:15]
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 4
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 4
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
    assert sizes and min(sizes) >= MIN_FONT >= 7
    assert fig.get_size_inches()[0] <= 11.0


def test_readable_labels_have_no_raw_overrides():
    assert readable_label("balance.scope=global data.batch_composition=mixed") == "global mixed batches"
    assert readable_label("router.renormalize=True") == "renormalized"
    assert readable_label("model.moe.capacity_factor=null") == "dropless"
    assert readable_label("aux_loss=[z_loss,variance] target=0.01") == "z_loss+variance target 0.01"
    assert "=" not in readable_label("balance.coefficient=0.1 x=y=z")
