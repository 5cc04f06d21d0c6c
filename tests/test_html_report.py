"""testbed-report --html: one self-contained page (tables, regime check, interactive frontiers, heatmaps and
curves, plotly.js inlined), checked as text here and, where Chromium is installed, in a headless browser:
no console error, figures drawn, a screenshot that shows them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from testbed.analysis.html_report import markdown_html
from testbed.analysis.report import main

DOMAINS = ["code", "fiction", "legal"]


def fake_run(path, overrides, summary, counts=None, curve=None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "summary.json").write_text(json.dumps(summary))
    if counts is not None:  # the last validation's routing table, as training saves it
        (path / "routing").mkdir()
        table = {"step": 20, "domains": DOMAINS, "layers": ["layer0", "layer1"], "counts": counts}
        torch.save(table, path / "routing" / "counts_step20.pt")
    if curve is not None:
        rows = ["step,val/loss"] + [f"{step},{value}" for step, value in curve]
        (path / "metrics.csv").write_text("\n".join(rows) + "\n")


def summary(router, balance, scope, seed, purity):
    return {
        "status": "finished",
        "seed": seed,
        "config": {"router": router, "balance": balance},
        "resolved": {
            "model": {"name": "micro", "n_layers": 2, "dense_layers": 0},
            "balance": {"scope": scope} if balance != "none" else {},
            "router": {},
            "data": {"batch_composition": "homogeneous"},
        },
        "val/loss": 4.0 + purity + 0.01 * seed,
        "spec/utilization/mean": 0.9 - 0.01 * seed,
        "spec/purity/mean": purity + 0.01 * seed,
        "spec/nmi/mean": purity / 2,
        "spec/reference_precision/mean": purity,
    }


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A sweep of LBL at two scopes and the oracle, three seeds each, with routing tables and val/loss
    curves; the page `testbed-report --html` writes into it (no --out: into the one folder given)."""
    root = tmp_path_factory.mktemp("html")
    sweep = root / "sweep"
    rng = np.random.default_rng(0)
    for name, router, balance, scope, purity in [
        ("lbl_global", "topk_softmax", "load_balance", "global", 0.4),
        ("lbl_sequence", "topk_softmax", "load_balance", "sequence", 0.3),
        ("oracle", "oracle", "none", "", 1.0),
    ]:
        for seed in range(3):
            overrides = [f"router={router}", f"balance={balance}", f"seed={seed}"]
            overrides += [f"balance.scope={scope}"] if scope else []
            counts = torch.tensor(rng.integers(0, 20, size=(2, 3, 6)), dtype=torch.float64)
            curve = [(9, 6.0 - purity), (19, 5.0 - purity + 0.01 * seed)]
            fake_run(
                sweep / f"{name}{seed}",
                overrides,
                summary(router, balance, scope, seed, purity),
                counts,
                curve,
            )
    args = [str(sweep), "--html", "--no-committed-baselines", "--curves", "val/loss"]
    assert main(args + ["--columns", "val/loss,spec/purity/mean"]) == 0
    return sweep / "report.html"


def test_page_is_self_contained_with_tables_and_figures(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)  # offline
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inlined, once
    assert text.count("plotly.js v") <= 2
    assert "<h2>Configurations</h2>" in text and "<table>" in text
    assert "0.400 ± 0.010" in text or "0.410 ± 0.010" in text  # the table's numbers
    for figure in ("frontier-0", "frontier-1", "frontier-2", "heatmap-0", "curve-0"):
        assert f'id="{figure}"' in text
    assert "LBL (load-balancing loss)" in text  # legends in words
    assert "p(expert | domain)" in text


def test_markdown_tables_lists_and_emphasis_become_html():
    out = markdown_html("| a | b |\n|---|---|\n| 1 | x<y |\n\n**Note** `k=v`:\n- one\n- two")
    assert "<th>a</th><th>b</th>" in out and "<td>x&lt;y</td>" in out
    assert "<strong>Note</strong> <code>k=v</code>:" in out and "<ul><li>one</li><li>two</li></ul>" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (Debian: apt-get install chromium): the page is checked in a "
    "headless browser only where one is installed",
)
def test_page_renders_in_a_headless_browser_without_console_errors(page, tmp_path):
    """Chromium loads the page offline: no console message reports an error, plotly drew every figure (an
    SVG per figure in the DOM after the scripts ran), and the screenshot is a real picture."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    flags += ["--virtual-time-budget=15000", "--window-size=1280,3000", "--hide-scrollbars"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    errors = [line for line in console if re.search(r"uncaught|error|exception", line, re.IGNORECASE)]
    assert not errors, errors
    assert dom.stdout.count('class="main-svg"') >= 5  # 3 frontiers, the heatmap, the curve: drawn
    shot = tmp_path / "page.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from matplotlib.image import imread

    image = imread(shot)[..., :3]
    assert image.shape[:2] == (3000, 1280)
    assert image.std() > 0.05  # not a blank page
    colours = np.unique((image.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 200  # figures in colour, not just black text on white
