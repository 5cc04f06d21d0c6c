"""Plots: PNGs written and readable, heatmap reordering recovers the oracle layout, edge cases are quiet."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.text import Text

from testbed.layout import block_layout
from testbed.plots import (
    COLUMN_WIDTH,
    DPI,
    MIN_FONT,
    SCOPE_MARKERS,
    STYLE,
    TEXT_WIDTH,
    TICK_SPACING,
    abbreviation_key,
    domain_expert_heatmaps,
    frontier_scatter,
    looks,
    method_colour,
    method_colours,
    method_words,
    per_layer_curves,
    readable_label,
    save_figure,
    t_interval,
    training_curves,
)
from testbed.train.cli import CONF_DIR

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
    columns = fig.axes[0].expert_order  # the expert id of each column
    labelled = {int(t.get_position()[0]): int(t.get_text()) for t in fig.axes[0].get_xticklabels()}
    assert labelled and all(columns[i] == e for i, e in labelled.items())  # tick labels name those ids
    if order == "reference":
        np.testing.assert_allclose(shown_permuted, expected_oracle)
        oracle_domain = np.repeat(np.arange(D), E // D)
        assert columns == list(np.argsort(oracle_domain[perm], kind="stable"))
        assert sorted(columns) == list(range(E)) and columns != list(range(E))
    else:
        np.testing.assert_allclose(shown_permuted, expected_oracle[:, perm])
        assert columns == list(range(E))


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


def rgba(colour) -> tuple:
    return tuple(np.round(matplotlib.colors.to_rgba(colour), 3))


def test_frontier_colour_per_method_marker_per_scope(tmp_path):
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
    assert edge[2] == edge[3] != edge[4]  # colour = method: LBL twice, SH differs
    assert edge[2] == rgba(method_colour("LBL")) and edge[4] == rgba(method_colour("SH"))
    shapes = [c.get_paths()[0].vertices.shape for c in scatters]
    assert shapes[2] != shapes[3] and shapes[3] == shapes[4]  # marker = scope: sequence vs global twice
    assert len(scatters[4].get_facecolor()) == 0 or scatters[4].get_facecolor()[0][3] == 0  # hollow: mixed
    legends = [a for a in ax.artists if a.__class__.__name__ == "Legend"] + [ax.get_legend()]
    titles = {leg.get_title().get_text() for leg in legends if leg is not None}
    assert titles == {"method (colour)", "balancing scope (marker)"}
    texts = [t.get_text() for leg in legends for t in leg.get_texts()]
    assert "LBL (load-balancing loss)" in texts and "SH (Sinkhorn routing)" in texts  # spelled out
    assert {"sequence", "global", "mixed batches (hollow)", "oracle", "hash"} <= set(texts)
    assert ax.get_xlabel() == "utilization (1 = perfect balance)"
    assert not fig.legends  # every point has its own (method, scope, composition): no variant legend


def test_frontier_distinguishes_configurations_of_one_method_and_scope(tmp_path):
    """X3's top-k with and without renormalization (both LBL at micro-batch scope) and a third LBL run:
    shades of LBL's colour each, the micro-batch marker, a legend naming what differs (renormalize=...)."""
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
    assert len(set(edge[:3])) == 3  # three LBL micro-batch configurations, three shades
    assert edge[0] == rgba(method_colour("LBL")) and edge[3] == rgba(method_colour("EB"))
    assert len({c.get_paths()[0].vertices.shape for c in scatters[:4]}) == 1  # one scope: one marker
    (legend,) = fig.legends
    assert legend.get_title().get_text() == "LBL, micro-batch scope"
    assert [t.get_text() for t in legend.get_texts()] == [  # what differs, written without '='
        "topk softmax load balance",
        "renormalized",
        "w 10",
    ]
    legend_colours = [
        tuple(np.round(matplotlib.colors.to_rgba(h.get_color()), 3)) for h in legend.legend_handles
    ]
    assert legend_colours == edge[:3]


def test_one_look_per_configuration_from_the_registries():
    """Colours come from the router and balancing registries (references black and grey, every learned
    method a hue of its own), markers from the scopes (a method without one: its class's marker), and every
    abbreviation has its words."""
    from testbed.losses import BALANCE
    from testbed.registry import label_of
    from testbed.routing import ROUTERS

    colours = method_colours()
    classes = [cls for registry in (ROUTERS, BALANCE) for _, (cls, _) in registry.items() if label_of(cls)]
    assert {label_of(cls) for cls in classes} | {"dense"} == set(colours)
    learned = [colours[label_of(cls)] for cls in classes if not getattr(cls, "reference", None)]
    assert len(set(learned)) == len(learned)  # a hue each
    assert colours["oracle"] == "#000000" and colours["hash"] == "#7F7F7F"
    assert method_colour("not registered") == method_colour("not registered")  # fixed by the name
    kinds = [("LBL", "sequence"), ("EB", "micro_batch"), ("SH", "global"), ("oracle", ""), ("hash", "")]
    markers = [m["marker"] for m in looks([{"method": m, "scope": s} for m, s in kinds])]
    scoped = [SCOPE_MARKERS[s] for s in ("sequence", "micro_batch", "global")]
    assert markers == [*scoped, "*", ROUTERS.get("hash")[0].marker]
    words = method_words()
    assert {label_of(cls) for cls in classes if label_of(cls) != cls.registry_name} == set(words)
    assert abbreviation_key(["LBL, global", "EB, sequence", "hash"]) == (
        "EB = expert-bias balancing, LBL = load-balancing loss"
    )
    assert abbreviation_key(["oracle", "LBLX"]) == ""


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


def text_sizes(fig) -> list[float]:
    return [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


@pytest.mark.parametrize(("panels", "experts", "width"), [(3, 64, COLUMN_WIDTH), (4, 16, COLUMN_WIDTH),
                                                        (15, 16, TEXT_WIDTH)])  # fmt: skip
def test_heatmaps_are_readable_at_a_paper_column(tmp_path, panels, experts, width):
    """X5's three 64-expert panels (once 18 inches wide with 64 tick labels) fit one column of a paper;
    X1's 15 configurations the text width, four a row. Every text at least 7 pt at that size, expert
    labels at least TICK_SPACING apart, the saved PNG no wider than the width at DPI."""
    counts = np.stack([oracle_table(D, experts) for _ in range(panels)])
    names = [f"LBL, micro_batch, mixed batches {i}" for i in range(panels)]
    out = tmp_path / "h.png"
    fig = domain_expert_heatmaps(counts, DOMAINS, names, out_path=out, title="p(expert | domain)")
    assert_png(out)
    assert fig.get_size_inches()[0] <= width + 1e-9
    assert mpimg.imread(out).shape[1] <= (width + 0.1) * DPI
    panel_axes = fig.axes[:panels]
    assert len({round(ax.get_position().x0, 3) for ax in panel_axes}) == min(panels, 2 if panels <= 8 else 4)
    assert min(text_sizes(fig)) >= MIN_FONT >= 7
    ax = panel_axes[0]
    shown = [t for t in ax.get_xticks()]
    spacing = ax.get_position().width * fig.get_size_inches()[0] / experts * (shown[1] - shown[0])
    assert spacing >= TICK_SPACING
    assert "micro-batch" in ax.get_title() and "_" not in ax.get_title()  # names in words


def test_every_figure_saves_a_print_png_and_a_vector_pdf_in_one_style(tmp_path):
    """PNG at DPI >= 200 and a PDF beside it (vector: text stays text), the same bytes when rebuilt; fonts
    from STYLE (the figure functions run under it)."""
    assert DPI >= 200
    fig = per_layer_curves({"LBL": [0.2, 0.3]}, "purity", out_path=tmp_path / "a.png")
    png, pdf = tmp_path / "a.png", tmp_path / "a.pdf"
    assert_png(png) and pdf.read_bytes().startswith(b"%PDF")
    width_px = mpimg.imread(png).shape[1]
    assert width_px >= 0.9 * fig.get_size_inches()[0] * DPI  # saved at DPI (tight bbox trims a little)
    first = pdf.read_bytes()
    save_figure(fig, png)
    assert pdf.read_bytes() == first  # no creation date: an unchanged figure rebuilds to the same file
    assert fig.axes[0].xaxis.label.get_fontsize() == STYLE["axes.labelsize"]
    assert min(text_sizes(fig)) >= MIN_FONT


def test_layers_are_points_not_joined_lines():
    """Discrete layers: a marker per layer and configuration with its interval as an error bar, side by
    side, and no line from one layer to the next."""
    series = {"LBL, global": [0.2, 0.3, 0.4], "EB, global": [0.3, 0.3, 0.5]}
    kinds = {
        "LBL, global": {"method": "LBL", "scope": "global"},
        "EB, global": {"method": "EB", "scope": "global"},
    }
    fig = per_layer_curves(series, "purity", bands={"LBL, global": [0.05, 0.05, 0.05]}, kinds=kinds)
    ax = fig.axes[0]
    data_lines = [container.lines[0] for container in ax.containers]  # each error bar's points, not its caps
    assert len(data_lines) == 2 and all(line.get_linestyle() == "None" for line in data_lines)
    assert [line.get_marker() for line in data_lines] == [SCOPE_MARKERS["global"]] * 2
    xs = [tuple(line.get_xdata()) for line in data_lines]
    assert xs[0] != xs[1]  # side by side at each layer
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    legend = fig.legends[0]  # abbreviations: the legend's title spells them out
    assert "EB = expert-bias balancing" in legend.get_title().get_text()
    kinds["EB, global"]["hollow"] = True  # mixed batches: hollow, and the key says so
    fig = per_layer_curves(series, "purity", kinds=kinds)
    assert fig.axes[0].containers[1].lines[0].get_markerfacecolor() == "none"
    assert "hollow markers: mixed batches" in fig.legends[0].get_title().get_text()


def test_large_numbers_have_no_offset_or_exponent():
    """A loss axis near 4.4 and an axis of millions: no '+4.4' offset, no '1e6' factor in a corner."""
    tokens = [1.0e6, 2.0e6, 3.0e6]
    fig = training_curves({"a": (tokens, [4.4001, 4.4002, 4.4003], [0, 0, 0])}, "val/loss", x_label="step")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.xaxis.get_offset_text().get_text() == "" and ax.yaxis.get_offset_text().get_text() == ""
    labels = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert labels and not [t for t in labels if "e" in t.lower().replace("\u2212", "")]
    assert any(t.endswith(" M") for t in labels)  # engineering units on the axis of millions


def test_readable_labels_have_no_raw_overrides():
    assert readable_label("balance.scope=global data.batch_composition=mixed") == "global mixed batches"
    assert readable_label("router.renormalize=True") == "renormalized"
    assert readable_label("model.moe.capacity_factor=null") == "dropless"
    assert readable_label("aux_loss=[z_loss,variance] target=0.01") == "z_loss+variance target 0.01"
    assert "=" not in readable_label("balance.coefficient=0.1 x=y=z")


def test_run_logging_keeps_font_subsetting_off_the_console(tmp_path, caplog):
    """Saving a figure's PDF copy subsets its fonts with fontTools, which logs every table at INFO (about
    900 lines at the end of `make train`); the run's logging config (conf/hydra/job_logging/rich.yaml) sets
    fontTools to WARNING."""
    config = yaml.safe_load((Path(CONF_DIR) / "hydra/job_logging/rich.yaml").read_text())
    font_logger = logging.getLogger("fontTools")
    before = font_logger.level

    def records_of_a_saved_figure(name: str) -> int:
        caplog.clear()
        fig = Figure()
        fig.subplots().set_title("text to embed")
        with caplog.at_level(logging.INFO):
            save_figure(fig, tmp_path / f"{name}.png")
        return len([r for r in caplog.records if r.name.startswith("fontTools")])

    try:
        font_logger.setLevel(logging.NOTSET)
        assert records_of_a_saved_figure("unconfigured") > 10  # what the console showed
        logging.getLogger("fontTools").setLevel(config["loggers"]["fontTools"]["level"])
        assert records_of_a_saved_figure("configured") == 0
    finally:
        font_logger.setLevel(before)
