"""testbed-report: runs side by side, swept keys as columns, failed runs listed."""

import json

from testbed.analysis.report import main


def fake_run(path, overrides, summary):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))


def test_report_table_and_failed_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(
        sweep / "0", ["router=oracle", "trainer.max_steps=5"], {"val/loss": 4.25, "spec/purity/mean": 1.0}
    )
    fake_run(
        sweep / "1", ["router=hash", "trainer.max_steps=5"], {"val/loss": 5.5, "spec/purity/mean": 0.125}
    )
    fake_run(sweep / "2", ["router=sinkhorn", "trainer.max_steps=5"], None)
    assert (
        main(
            [
                str(sweep),
                "--columns",
                "val/loss,spec/purity/mean",
                "--out",
                str(tmp_path / "r.md"),
                "--per-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "| run | router | val/loss | purity |"
    assert lines[2] == "| 0 | oracle | 4.250 | 1.000 |"
    assert lines[3] == "| 1 | hash | 5.500 | 0.125 |"
    assert "failed or unfinished): 1" in out and str(sweep / "2") in out
    assert (tmp_path / "r.csv").read_text().splitlines()[1] == "0,oracle,4.25,1.0"


def test_report_missing_dir(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_frontier_plots(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (router, util, purity) in enumerate(
        [("oracle", 1.0, 1.0), ("hash", 0.95, 0.13), ("sigmoid", 0.9, 0.4)]
    ):
        fake_run(
            sweep / str(i),
            [f"router={router}"],
            {
                "config": {"router": router},
                "spec/utilization/mean": util,
                "spec/purity/mean": purity,
                "spec/nmi/mean": purity / 2,
                "spec/reference_precision/mean": purity,
            },
        )
    assert main([str(sweep), "--out", str(tmp_path / "r.md"), "--plots"]) == 0
    from matplotlib.image import imread

    for metric in ("purity", "nmi", "reference_precision"):
        image = imread(tmp_path / f"frontier_{metric}.png")
        height, width = image.shape[:2]
        assert 300 <= height <= 2000 and 300 <= width <= 2000  # a figure that fits a page
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def write_metrics_csv(path, rows):
    keys = sorted({k for row in rows for k in row})
    lines = [",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_report_aggregates_seeds(tmp_path, capsys):
    """Seeds of one configuration become one row: mean, sample std and n; a failed seed is listed."""
    sweep = tmp_path / "sweep"
    purities = {("micro_batch", 0): 0.3, ("micro_batch", 1): 0.5, ("global", 0): 0.6, ("global", 1): 0.7}
    for i, ((scope, seed), purity) in enumerate(purities.items()):
        run = sweep / str(i)
        fake_run(
            run,
            [f"balance.scope={scope}", f"seed={seed}", f"init_from=/ckpt/{i}.ckpt"],
            {"config": {"router": "topk_softmax"}, "spec/purity/mean": purity, "spec/utilization/mean": 0.9},
        )
        write_metrics_csv(
            run,
            [
                {"step": 10, "train/spec/purity/mean": purity / 2},
                {"step": 20, "train/spec/purity/mean": purity, "val/loss": 5.0 + seed},
                {"step": 20, "spec/purity/layer0": purity - 0.1, "spec/purity/layer1": purity + 0.1},
            ],
        )
    fake_run(sweep / "9", ["balance.scope=global", "seed=2"], None)
    out_md = tmp_path / "report" / "r.md"
    args = [str(sweep), "--columns", "spec/purity/mean", "--out", str(out_md), "--plots"]
    assert main(args + ["--curves", "train/spec/purity/mean,val/loss", "--layer-metrics", "purity"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| balance.scope | n | purity |"
    assert lines[2] == "| micro_batch | 2 | 0.400 ± 0.141 |"  # std([0.3, 0.5], ddof=1) = 0.1414
    assert lines[3] == "| global | 2 | 0.650 ± 0.071 |"
    assert "failed or unfinished): 1" in "\n".join(lines)
    rows = (out_md.with_suffix(".csv")).read_text().splitlines()
    assert rows[0] == "balance.scope,n,spec/purity/mean:mean,spec/purity/mean:std,spec/purity/mean:n"
    assert rows[1].startswith("micro_batch,2,0.4,0.1414")
    for name in ("frontier_purity", "layers_purity", "curve_train_spec_purity_mean"):
        assert (out_md.parent / f"{name}.png").stat().st_size > 1000
    assert not (out_md.parent / "curve_val_loss.png").exists()  # one validation per run: not a curve


def test_report_layer_and_curve_values(tmp_path):
    from testbed.analysis.report import curve_of, last_layer_values

    write_metrics_csv(
        tmp_path,
        [
            {"step": 5, "spec/nmi/layer0": 0.1, "spec/nmi/layer1": 0.2, "val/loss": 6.0},
            {"step": 9, "train/lm_loss": 4.0},
            {"step": 10, "spec/nmi/layer1": 0.4, "spec/nmi/layer0": 0.3, "val/loss": 5.5},
        ],
    )
    assert last_layer_values(tmp_path, "nmi") == [0.3, 0.4]
    assert curve_of(tmp_path, "val/loss") == {5: 6.0, 10: 5.5}


def test_report_reads_quiz_results_and_logged_values(tmp_path, capsys):
    """quiz/<key> columns come from <run>/quiz/quiz.json (top level, else its layer mean); a column missing
    from summary.json is the mean of its last 5 logged values."""
    from testbed.analysis.report import last_layer_values

    for seed, (accuracy, dead) in enumerate([(0.5, 0.25), (0.7, 0.75)]):
        run = tmp_path / "sweep" / str(seed)
        fake_run(run, [f"seed={seed}"], {"val/loss": 5.0})
        (run / "quiz").mkdir()
        quiz = {
            "accuracy": accuracy,
            "mean": {"dead_experts": dead},
            "layers": ["layer0", "layer1"],
            "per_layer": {"layer0": {"dead_experts": dead - 0.25}, "layer1": {"dead_experts": dead + 0.25}},
        }
        (run / "quiz" / "quiz.json").write_text(json.dumps(quiz))
        write_metrics_csv(run, [{"step": s, "train/aux/load_balance": 1.0 + s + seed} for s in range(10)])
    columns = "quiz/accuracy,quiz/dead_experts,train/aux/load_balance"
    assert main([str(tmp_path / "sweep"), "--columns", columns]) == 0
    lines = capsys.readouterr().out.splitlines()
    # last five logged LBL values: 1+5..1+9 (mean 8) for seed 0 and 9 for seed 1 -> 8.5 ± 0.707
    assert lines[2] == "| 2 | 0.600 ± 0.141 | 0.500 ± 0.354 | 8.500 ± 0.707 |"
    assert last_layer_values(tmp_path / "sweep" / "1", "quiz/dead_experts") == [0.5, 1.0]


def test_report_where_filters_runs(tmp_path, capsys):
    for i, (data, purity) in enumerate([("shipped", 0.4), ("languages", 0.3), ("shipped", 0.5)]):
        fake_run(tmp_path / "s" / str(i), [f"data={data}", f"seed={i}"], {"spec/purity/mean": purity})
    assert main([str(tmp_path / "s"), "--columns", "spec/purity/mean", "--where", "data=shipped"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| shipped | 2 | 0.450 ± 0.071 |" and len(lines) == 3


def test_failed_and_interrupted_runs_are_listed_never_reported(tmp_path, capsys):
    """A diverged or interrupted run's summary (status != finished) is listed as failed/unfinished, even when
    it holds numbers; summaries from before statuses existed count as finished."""
    from testbed.analysis.report import find_runs

    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", ["router=oracle"], {"val/loss": 4.25, "spec/purity/mean": 1.0})  # no status: old
    fake_run(sweep / "1", ["router=hash"], {"status": "finished", "val/loss": 5.5, "spec/purity/mean": 0.1})
    fake_run(sweep / "2", ["router=sigmoid"], {"status": "failed", "val/loss": 0.1, "spec/purity/mean": 0.9})
    fake_run(
        sweep / "3", ["router=sinkhorn"], {"status": "interrupted", "last_validation": {"val/loss": 3.0}}
    )
    finished, failed = find_runs([sweep])
    assert sorted(r["dir"].name for r in finished) == ["0", "1"]
    assert sorted(p.name for p in failed) == ["2", "3"]
    assert main([str(sweep), "--columns", "val/loss", "--per-run"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid" not in out.split("Runs without")[0] and "0.100" not in out
    assert "(interrupted, failed or unfinished): 2" in out


def test_runs_are_ordered_by_path_not_file_time(tmp_path):
    """A fresh clone does not keep file times, so the report's row order must not depend on them: runs are
    ordered by path (numbers as numbers), runs post-trained from another run (init_from) last."""
    import os

    from testbed.analysis.report import find_runs

    sweep = tmp_path / "sweep"
    for i, name in enumerate(["s10", "s2", "s1", "post"]):
        summary = {
            "status": "finished",
            "val/loss": 4.0,
            "init_from": "elsewhere" if name == "post" else None,
        }
        fake_run(sweep / name / "0", [f"seed={i}"], summary)
    # file times in the reverse of the expected order
    for t, name in enumerate(["post", "s10", "s2", "s1"]):
        os.utime(sweep / name / "0" / "summary.json", (1000 + t, 1000 + t))
    finished, _ = find_runs([sweep])
    assert [r["dir"].parent.name for r in finished] == ["s1", "s2", "s10", "post"]


def test_report_reads_analysis_columns(tmp_path, capsys):
    """`analysis/<key>` columns come from testbed-analyze's <run>/analysis/analysis.json (how X1 scores
    Sinkhorn and BA with their training-time routing); runs without one show no value."""
    sweep = tmp_path / "sweep"
    for seed, (loss, purity) in enumerate([(4.5, 0.25), (4.7, 0.35)]):
        fake_run(sweep / f"s{seed}" / "0", [f"seed={seed}"], {"status": "finished", "val/loss": 4.0})
        analysis = {
            "val_loss_mean": loss,
            "val_loss": {"code": loss + 1},
            "metrics": {"spec/purity/mean": purity},
        }
        (sweep / f"s{seed}" / "0" / "analysis").mkdir()
        (sweep / f"s{seed}" / "0" / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    fake_run(sweep / "s2" / "0", ["seed=2"], {"status": "finished", "val/loss": 4.0})
    columns = "val/loss,analysis/val/loss,analysis/val/loss/code,analysis/spec/purity/mean"
    assert main([str(sweep), "--columns", columns, "--per-run"]) == 0
    out = capsys.readouterr().out
    assert "| 4.000 | 4.500 | 5.500 | 0.250 |" in out and "| 4.000 | 4.700 | 5.700 | 0.350 |" in out
    assert "| 4.000 |  |  |  |" in out


def test_heatmap_panels_show_each_configuration_lowest_seed(tmp_path, monkeypatch):
    """heatmaps.png: one panel per configuration, the chosen layer's p(expert | domain) counts from the
    lowest seed that has an analysis.json (testbed-analyze), labelled with the configuration and seed."""
    import numpy as np

    from testbed.analysis import report

    sweep = tmp_path / "sweep"
    for i, (router, seed) in enumerate([("oracle", 1), ("oracle", 0), ("hash", 0), ("sigmoid", 0)]):
        run = sweep / f"p{i}" / "0"
        fake_run(
            run, [f"router={router}", f"seed={seed}"], {"status": "finished", "seed": seed, "val/loss": 4.0}
        )
        if router == "sigmoid":
            continue  # no analysis: no panel
        counts = {"layer0": [[9, 9], [9, 9]], "layer1": [[10 * (seed + 1), 0], [0, 5 + i]]}
        analysis = {"domains": ["a", "b"], "counts": counts}
        if router == "hash":
            analysis["overrides"] = ["router.eval_balanced=true"]
        (run / "analysis").mkdir()
        (run / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    seen = {}

    def fake_heatmaps(counts, domains, names, out_path=None, title=None):
        seen.update(counts=np.asarray(counts), domains=domains, names=names, title=title)

    monkeypatch.setattr(report, "domain_expert_heatmaps", fake_heatmaps)
    runs, _ = report.find_runs([sweep])
    assert report.heatmap_panels(runs, tmp_path) == [tmp_path / "heatmaps.png"]
    assert seen["names"] == [
        "oracle",
        "hash, balanced eval",
    ]  # short names, the analysis's overrides as words
    assert seen["counts"].tolist() == [[[10, 0], [0, 6]], [[10, 0], [0, 7]]]
    assert seen["domains"] == ["a", "b"] and seen["title"] == "p(expert | domain), MoE layer1, seed 0"


def test_heatmap_panels_split_by_number_of_experts(tmp_path, monkeypatch):
    """Models with 2 and 3 experts (X5: 16 and 64) cannot share one panel array: one figure each."""
    from testbed.analysis import report

    for i, (router, table) in enumerate([("a", [[1, 0], [0, 1]]), ("b", [[1, 0, 0], [0, 1, 1]])]):
        run = tmp_path / "sweep" / f"p{i}" / "0"
        fake_run(run, [f"router={router}", "seed=0"], {"status": "finished", "seed": 0, "val/loss": 4.0})
        (run / "analysis").mkdir()
        analysis = {"domains": ["x", "y"], "counts": {"layer0": table}}
        (run / "analysis" / "analysis.json").write_text(json.dumps(analysis))
    seen = {}
    monkeypatch.setattr(
        report,
        "domain_expert_heatmaps",
        lambda counts, d, names, out_path=None, title=None: seen.update(
            {out_path.name: (len(counts[0][0]), names)}
        ),
    )
    runs, _ = report.find_runs([tmp_path / "sweep"])
    paths = report.heatmap_panels(runs, tmp_path)
    assert paths == [tmp_path / "heatmaps.png", tmp_path / "heatmaps_3_experts.png"]
    assert seen == {"heatmaps.png": (2, ["a"]), "heatmaps_3_experts.png": (3, ["b"])}


def test_group_stats_and_metrics_csv_on_pandas(tmp_path):
    """Mean, sample std (0 for one value) and n per group, non-finite values left out; metrics.csv read with
    empty cells as missing, an empty file as no rows."""
    import math

    from testbed.analysis import report

    stats = report.group_stats([0, 0, 1, 2], {"m": [1.0, 3.0, 5.0, float("inf")], "t": ["x", 2, True, None]})
    assert stats.loc[0, ("m", "mean")] == 2.0 and stats.loc[0, ("m", "std")] == math.sqrt(2.0)
    assert stats.loc[1, ("m", "std")] == 0.0 and stats.loc[1, ("m", "n")] == 1
    assert stats.loc[2, ("m", "n")] == 0 and math.isnan(stats.loc[2, ("m", "mean")])
    assert (
        stats.loc[0, ("t", "mean")] == 2.0 and stats.loc[1, ("t", "n")] == 0
    )  # text and bools are no numbers
    mean, std, n = report.aggregate([])
    assert math.isnan(mean) and math.isnan(std) and n == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,val/loss,spec/purity/layer1,spec/purity/layer0\n4,,,\n9,5.0,0.5,0.25\n19,4.5,,\n"
    )
    assert report.curve_of(run, "val/loss") == {9: 5.0, 19: 4.5}
    assert report.last_layer_values(run, "purity") == [0.25, 0.5]
    empty = tmp_path / "empty"  # another file: reads are cached per file version
    empty.mkdir()
    (empty / "metrics.csv").write_text("")
    assert report.curve_of(empty, "val/loss") == {} and report.last_layer_values(empty, "purity") == []


def test_experts_selected_per_seed_group_within_a_grid_only(tmp_path, capsys):
    """X6's path runs carry finetune.experts chosen per seed: in a grid (<out>/<sweep>/<proc>/<job>)
    they are one configuration with n = 3; a hand-made sweep over finetune.experts keeps one row each."""
    experts = ["{layer0:[0,1]}", "{layer0:[2,3]}", "{layer0:[4,5]}"]
    for seed, chosen in enumerate(experts):
        overrides = [f"seed={seed}", f"finetune.experts={chosen}"]
        fake_run(
            tmp_path / "grid" / "path" / f"s{seed}" / "0", overrides, {"val/loss": 4.0 + seed, "seed": seed}
        )
        fake_run(tmp_path / "sweep" / str(seed), overrides, {"val/loss": 4.0 + seed, "seed": seed})
    assert main([str(tmp_path / "grid"), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| n | val/loss") and rows[1] == "| 3 | 5.000 ± 1.000 |"
    assert main([str(tmp_path / "sweep"), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| {layer0")]
    assert len(rows) == 3


def moe_summary(router: str, balance: str, scope: str = "", composition: str = "homogeneous", **values):
    """A summary as training writes it: the chosen config groups and the resolved settings."""
    dense = router == "dense"
    return {
        "status": "finished",
        "config": {"router": "topk_softmax" if dense else router, "balance": balance},
        "resolved": {
            "model": {
                "name": "micro_dense" if dense else "micro",
                "n_layers": 2,
                "dense_layers": 2 if dense else 0,
            },
            "balance": {"scope": scope} if balance != "none" else {},
            "router": {"scope": scope} if router == "sinkhorn" else {},
            "data": {"batch_composition": composition},
        },
        **values,
    }


def test_plot_labels_are_short_names_not_overrides(tmp_path):
    from testbed.analysis import report

    lbl, eb = ("topk_softmax", "load_balance"), ("topk_softmax", "expert_bias")
    configurations = [
        (["balance.scope=global"], moe_summary(*lbl, "global")),
        (["balance=expert_bias", "balance.scope=micro_batch"], moe_summary(*eb, "micro_batch")),
        (["router=sinkhorn", "router.scope=sequence"], moe_summary("sinkhorn", "none", "sequence")),
        (["router=hash", "balance=none"], moe_summary("hash", "none")),
        (["router=oracle", "balance=none"], moe_summary("oracle", "none")),
        (["model=micro_dense"], moe_summary("dense", "load_balance", "micro_batch")),
        (["balance.scope=global", "data.batch_composition=mixed"], moe_summary(*lbl, "global", "mixed")),
        (["balance.scope=global", "balance.coefficient=0.01"], moe_summary(*lbl, "global")),
    ]  # fmt: skip
    for i, (overrides, summary) in enumerate(configurations):
        fake_run(tmp_path / "sweep" / str(i), overrides, summary)
    runs, _ = report.find_runs([tmp_path / "sweep"])
    _, groups = report.group_runs(runs)
    assert report.plot_labels(groups) == [
        "LBL, global",
        "EB, micro_batch",
        "SH, sequence",
        "hash",
        "oracle",
        "dense",
        "LBL, global, mixed batches",
        "LBL, global, coef. 0.01",
    ]


def capture_figures(monkeypatch, report) -> list:
    """Wrap the report's plot functions: each figure they draw is kept for inspection."""
    figures = []
    for name in ("frontier_scatter", "per_layer_curves", "training_curves"):
        real = getattr(report, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            figure = _real(*args, **kwargs)
            figures.append((_name, args, kwargs, figure))
            return figure

        monkeypatch.setattr(report, name, wrapped)
    return figures


def legend_texts(figure) -> list[str]:
    legends = list(figure.legends)
    for ax in figure.axes:
        legends += [a for a in ax.artists if a.__class__.__name__ == "Legend"]
        legends += [ax.get_legend()] if ax.get_legend() else []
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_report_plots_show_95_percent_intervals_and_short_labels(tmp_path, monkeypatch):
    """Three seeds per configuration: frontier error bars, training-curve bands and per-layer bands are the
    95% t interval over the seeds (hand-computed here), titles say so, and no legend shows an override."""
    import matplotlib
    import numpy as np
    import pytest
    from matplotlib.collections import PolyCollection

    from testbed.analysis import report

    t = 4.302652729911275  # t_{0.975, 2}
    purities = {"micro_batch": [0.2, 0.3, 0.5], "global": [0.3, 0.35, 0.4]}
    for scope, values in purities.items():
        for seed, purity in enumerate(values):
            run = tmp_path / "sweep" / f"{scope}{seed}"
            summary = moe_summary("topk_softmax", "load_balance", scope, "mixed")
            summary.update({"seed": seed, "spec/purity/mean": purity, "spec/utilization/mean": 0.9})
            summary.update({"spec/nmi/mean": purity / 2, "spec/reference_precision/mean": purity})
            fake_run(run, [f"balance.scope={scope}", f"seed={seed}"], summary)
            write_metrics_csv(
                run,
                [
                    {"step": 10, "train/spec/purity/mean": purity / 2},
                    {"step": 20, "train/spec/purity/mean": purity},
                    {"step": 20, "spec/purity/layer0": purity - 0.1, "spec/purity/layer1": purity + 0.1},
                ],
            )
    for seed in range(3):  # the oracle: purity 1.0 everywhere, 1.0 by construction on training batches
        run = tmp_path / "sweep" / f"oracle{seed}"
        summary = moe_summary("oracle", "none", composition="mixed", seed=seed)
        summary.update({"spec/purity/mean": 1.0, "spec/utilization/mean": 1.0, "spec/nmi/mean": 0.9})
        summary["spec/reference_precision/mean"] = 1.0
        fake_run(run, ["router=oracle", "balance=none", f"seed={seed}"], summary)
        write_metrics_csv(
            run,
            [
                {"step": 10, "train/spec/purity/mean": 1.0},
                {"step": 20, "train/spec/purity/mean": 1.0},
                {"step": 20, "spec/purity/layer0": 1.0, "spec/purity/layer1": 1.0},
            ],
        )
    figures = capture_figures(monkeypatch, report)
    args = [
        str(tmp_path / "sweep"),
        "--out",
        str(tmp_path / "r" / "r.md"),
        "--plots",
        "--no-committed-baselines",
    ]
    assert report.main(args + ["--curves", "train/spec/purity/mean", "--layer-metrics", "purity"]) == 0

    def half(values):
        return t * np.std(values, ddof=1) / np.sqrt(len(values))

    frontier = next(f for f in figures if f[0] == "frontier_scatter" and f[2]["y"] == "purity")
    points = {p["label"]: p for p in frontier[1][0]}
    assert set(points) == {"LBL, micro_batch", "LBL, global", "oracle"}
    assert points["LBL, micro_batch"]["yerr"] == pytest.approx(half([0.2, 0.3, 0.5]), rel=1e-9)
    assert points["LBL, global"]["yerr"] == pytest.approx(half([0.3, 0.35, 0.4]), rel=1e-9)
    assert points["oracle"]["yerr"] == 0.0
    assert "mean ± 95% CI over n = 3 seeds" in frontier[2]["title"]
    assert frontier[3].axes[0].get_ylim()[1] < 1.0  # the oracle does not set the axis

    (curves,) = [f for f in figures if f[0] == "training_curves"]
    ax = curves[3].axes[0]
    assert sorted(line.get_label() for line in ax.lines) == ["LBL, global", "LBL, micro-batch"]  # no oracle
    assert "1 line omitted, 1.0 by construction: oracle" in [x.get_text() for x in ax.texts]
    assert "mean ± 95% CI over n = 3 seeds" in curves[2]["title"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]  # one per line, in line order
    for line, band, values in zip(ax.lines, bands, ([0.3, 0.35, 0.4], [0.2, 0.3, 0.5]), strict=True):
        assert line.get_label() == ("LBL, global" if values[0] == 0.3 else "LBL, micro-batch")
        at_step_20 = [y for x, y in band.get_paths()[0].vertices if x == 20]
        assert (max(at_step_20) - min(at_step_20)) / 2 == pytest.approx(half(values), rel=1e-9)

    (layers,) = [f for f in figures if f[0] == "per_layer_curves"]
    bands = layers[2]["bands"]
    assert bands["LBL, micro_batch"] == pytest.approx(
        [half([0.1, 0.2, 0.4]), half([0.3, 0.4, 0.6])], rel=1e-9
    )
    assert bands["oracle"] == [0.0, 0.0]
    assert "mean ± 95% CI over n = 3 seeds" in layers[2]["title"]

    texts = [text for figure in figures for text in legend_texts(figure[3])]
    assert "LBL, global" in texts and not [text for text in texts if "=" in text or "_" in text]
    # one look per configuration in every figure: LBL's colour, the scope's marker (global a square)
    (global_line,) = [line for line in ax.lines if line.get_label() == "LBL, global"]
    point = [c for c in frontier[3].axes[0].collections if c.get_offsets()[0][1] == pytest.approx(0.35)]
    assert global_line.get_marker() == "s" and point[0].get_paths()
    assert np.allclose(matplotlib.colors.to_rgba(global_line.get_color()), point[0].get_edgecolor()[0])
    titles = [f[2]["title"] for f in figures]
    assert "purity of the training batches over training (mean ± 95% CI over n = 3 seeds)" in titles
    assert "purity per MoE layer, final validation (mean ± 95% CI over n = 3 seeds)" in titles
    assert not [t for t in titles if "/" in t.split(" (")[0]]  # in words, no raw metric key


def test_result_neutral_settings_are_no_grouping_key(tmp_path, capsys):
    """The same configuration logged to CSV and to TensorBoard (and drawn or not while training) is one
    row of n = 2: where a run logs cannot change its results."""
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0", ["balance.scope=global", "seed=0"], {"val/loss": 4.0, "seed": 0})
    fake_run(
        sweep / "1",
        ["balance.scope=global", "seed=1", "logger=tensorboard", "metrics.plots=false", "+logger.project=x"],
        {"val/loss": 5.0, "seed": 1},
    )
    fake_run(
        sweep / "2", ["balance.scope=sequence", "seed=0", "trainer.progress_bar=false"], {"val/loss": 6.0}
    )
    assert main([str(sweep), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0] == "| balance.scope | n | val/loss |"
    assert lines[1:] == ["| global | 2 | 4.500 ± 0.707 |", "| sequence | 1 | 6.000 |"]
    assert main([str(sweep), "--columns", "val/loss", "--per-run", "--no-committed-baselines"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "| run | balance.scope | seed | val/loss |"  # no logger, plots or progress-bar column


def test_plots_need_a_place_and_say_what_they_skip(tmp_path, capsys, monkeypatch):
    """--plots without --out: into the one folder given (never the current folder); several folders and no
    --out: refused with a message naming --out. A metric logged once per run draws no curve, and says so."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        run = tmp_path / name / "0"
        fake_run(
            run, ["balance.scope=global"], {"spec/utilization/mean": 0.9, "spec/purity/mean": 0.3, "seed": 0}
        )
        write_metrics_csv(run, [{"step": 99, "val/loss": 5.0}, {"step": 49, "train/lm_loss": 5.5}])
    assert main([str(tmp_path / "a"), "--plots", "--curves", "val/loss", "--no-committed-baselines"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "a" / "frontier_purity.png").is_file() and (
        tmp_path / "a" / "frontier_purity.pdf"
    ).is_file()
    assert not list(tmp_path.glob("*.png"))  # nothing in the current folder
    assert "note: --curves val/loss: no curve drawn, every run logged it once" in captured.err
    assert not (tmp_path / "a" / "curve_val_loss.png").exists()
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--plots", "--no-committed-baselines"]) == 2
    assert "--plots with 2 run folders needs --out" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_heatmaps_from_the_count_tables_training_saved(tmp_path, monkeypatch, capsys):
    """No testbed-analyze needed: a run's last routing/counts_step<N>.pt (read with the safe loader) gives
    its panel; an analysis.json, where there is one, still wins; a table holding other objects is refused
    with a warning, never unpickled."""
    import numpy as np
    import torch

    from testbed.analysis import report

    sweep = tmp_path / "sweep"
    for i, router in enumerate(["oracle", "hash", "sigmoid"]):
        run = sweep / f"p{i}" / "0"
        fake_run(run, [f"router={router}", "seed=0"], {"status": "finished", "seed": 0, "val/loss": 4.0})
        (run / "routing").mkdir()
        for step, scale in ((10, 100), (20, 1 + i)):  # the last validation's table (step 20) is used
            counts = torch.tensor([[[1, 1], [1, 1]], [[scale, 0], [0, 2 * scale]]], dtype=torch.float64)
            table = {"step": step, "domains": ["a", "b"], "layers": ["layer0", "layer1"], "counts": counts}
            torch.save(table, run / "routing" / f"counts_step{step}.pt")
    analysed = sweep / "p1" / "0" / "analysis"
    analysed.mkdir()
    analysis = {"domains": ["a", "b"], "counts": {"layer0": [[0, 0], [0, 0]], "layer1": [[7, 0], [0, 7]]}}
    (analysed / "analysis.json").write_text(json.dumps(analysis))

    from argparse import Namespace  # any class: the safe loader refuses it

    torch.save({"counts": Namespace(x=1)}, sweep / "p2" / "0" / "routing" / "counts_step30.pt")
    seen = {}
    monkeypatch.setattr(
        report,
        "domain_expert_heatmaps",
        lambda counts, domains, names, out_path=None, title=None: seen.update(counts=np.asarray(counts)),
    )
    runs, _ = report.find_runs([sweep])
    assert report.heatmap_panels(runs, tmp_path) == [tmp_path / "heatmaps.png"]
    assert seen["counts"].tolist() == [[[1, 0], [0, 2]], [[7, 0], [0, 7]]]  # oracle: step 20; hash: analysis
    assert "counts_step30.pt: not a routing count table" in capsys.readouterr().err  # refused, named


def test_hash_runs_that_balance_are_flagged_not_baselines(tmp_path, capsys):
    """A router sweep with the default balance=load_balance trains its hash run with a balancing term: the
    report names it and the regime check leaves it out of gain_over_hash; hash with balance=none is the
    baseline."""
    model = {"name": "micro", "n_layers": 2, "dense_layers": 0, "moe": {"num_experts": 4, "expert_hidden": 8}}
    base = {"data": {}, "optim": {}, "trainer": {"max_steps": 10}, "model": model}

    def summary(router, balance, loss):
        resolved = {**base, "router": {"name": router, "top_k": 2}}
        config = {"router": router, "balance": balance}
        return {"status": "finished", "seed": 0, "val/loss": loss, "config": config, "resolved": resolved,
                "tokens_seen": 100, "steps": 10}  # fmt: skip

    fake_run(tmp_path / "sweep" / "0", ["router=topk_softmax"], summary("topk_softmax", "load_balance", 4.0))
    fake_run(tmp_path / "sweep" / "1", ["router=hash"], summary("hash", "load_balance", 4.5))
    assert main([str(tmp_path / "sweep"), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    out = capsys.readouterr().out
    assert "**Not a regime baseline**: 1 hash-routed run(s)" in out
    assert f"- {tmp_path / 'sweep' / '1'} (balance=load_balance)" in out
    assert "gain_over_hash" in out and "+0.500" not in out  # no gain over the balancing hash run
    fake_run(tmp_path / "sweep" / "2", ["router=hash", "balance=none"], summary("hash", "none", 4.25))
    assert main([str(tmp_path / "sweep"), "--columns", "val/loss", "--no-committed-baselines"]) == 0
    out = capsys.readouterr().out
    assert "+0.250" in out  # the gain over the balance=none hash run
    assert out.count("(balance=load_balance)") == 1
