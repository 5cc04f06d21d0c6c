"""Plots: PNGs written and readable, heatmap reordering recovers the oracle layout, edge cases are quiet."""

from __future__ import annotations

import warnings

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.collections import PathCollection

from testbed.layout import block_layout
from testbed.plots import (
    domain_expert_heatmaps,
    frontier_scatter,
    per_layer_curves,
    save_figure,
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
    assert [t.get_text() for t in legend.get_texts()] == [
        "topk_softmax load_balance",
        "renormalize=true",
        "w=10",
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
