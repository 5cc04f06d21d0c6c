"""What a training run prints and logs (README "Console output"): a step-based progress bar with the last
val loss and tokens/s, no Lightning advert or FLOPs table, the run folder at the end, train/spec/* only at
the steps where routing was measured, and TensorBoard's hp_metric = the final val loss."""

import csv
import json
import os
import re
import subprocess
import sys

from tests.conftest import synth_overrides


def test_console_output_logged_steps_and_hp_metric(synth_mix, tmp_path):
    out = tmp_path / "run"
    exe = os.path.join(os.path.dirname(sys.executable), "testbed-train")
    result = subprocess.run(
        [
            exe,
            *synth_overrides(synth_mix),
            "trainer.progress_bar=true",
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=2",
            "metrics.train_every_n_steps=5",
            "metrics.plots=false",
            "logger=tensorboard",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "litlogger" not in text and "Total FLOPs" not in text and "Epoch 0/-2" not in text
    assert "train " in text and "tok/s" in text  # the bar: "train ━━━ ... val: ... tok/s: ..."
    assert result.stdout.rstrip().endswith(f"run folder: {out}")
    # the first line that is not a log record (the token store's): "model: N parameters (N trainable)"
    first = next(line for line in result.stdout.splitlines() if not re.match(r"^\d\d:\d\d:\d\d ", line))
    assert "parameters" in first
    # one logging setup (conf/hydra/job_logging/rich.yaml): each record once on the console, as one plain
    # "HH:MM:SS LEVEL message" line where stdout is no terminal, and in Hydra's format in the run's cli.log
    records = [line for line in result.stdout.splitlines() if " INFO " in line or " WARNING " in line]
    epochs = [line for line in records if "epochs over each domain" in line]
    assert len(epochs) == 1 and re.match(r"^\d\d:\d\d:\d\d INFO    epochs over each domain", epochs[0])
    assert len(records) == len(set(records)) and "token cache: read" not in text
    log_file = (out / "cli.log").read_text()
    assert "[testbed.data.datamodule][INFO] - epochs over each domain" in log_file

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((out / "summary.json").read_text())
    hp = []
    for events in (out / "tensorboard").glob("events*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "hp_metric" in acc.Tags()["scalars"]:
            hp += [e.value for e in acc.Scalars("hp_metric")]
    assert hp and abs(hp[-1] - summary["val/loss"]) < 1e-4


def test_train_spec_is_logged_only_where_measured(synth_mix, tmp_path):
    from testbed.train.cli import run_training
    from tests.conftest import compose

    cfg = compose(
        synth_overrides(
            synth_mix, "trainer.max_steps=12", "trainer.log_every_n_steps=2", "metrics.train_every_n_steps=5"
        )
    )
    run_training(cfg, tmp_path, quiet=True)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    measured = [int(r["step"]) for r in rows if r.get("train/spec/purity/mean")]
    assert measured == [0, 5, 10]  # not repeated at every logging step in between
    assert len([r for r in rows if r.get("train/loss")]) == 6  # Lightning's own step logging is unchanged


def test_default_threads_warn_only_on_a_busy_machine(monkeypatch, caplog):
    """trainer.num_threads=0 keeps torch's default; a CPU run then warns when other processes want the CPU
    (benchmarks/threads.py: 2.5x slower steps there), and stays quiet on an idle machine or with 1 thread."""
    import logging

    import torch
    from hydra import compose, initialize_config_dir

    from testbed import CONF_DIR
    from testbed.config import parse_config
    from testbed.train import cli

    assert cli.runnable_elsewhere(samples=1, interval=0) is not None  # /proc/loadavg on Linux
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        default = parse_config(compose("config", overrides=["trainer.accelerator=cpu"]))
        one = parse_config(compose("config", overrides=["trainer.accelerator=cpu", "trainer.num_threads=1"]))
    before = torch.get_num_threads()
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    try:
        torch.set_num_threads(2)
        for busy, warned in [(0, False), (1, True), (None, False)]:
            monkeypatch.setattr(cli, "runnable_elsewhere", lambda busy=busy: busy)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger=cli.log.name):
                cli.set_cpu_threads(default)
            assert ("trainer.num_threads=1" in caplog.text) == warned, (busy, caplog.text)
            assert torch.get_num_threads() == 2  # the default is left alone
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=cli.log.name):
            cli.set_cpu_threads(one)  # busy (runnable_elsewhere = None from the loop), explicit setting
        assert torch.get_num_threads() == 1 and caplog.text == ""
        monkeypatch.setattr(cli, "runnable_elsewhere", lambda: 3)
        with caplog.at_level(logging.WARNING, logger=cli.log.name):
            cli.set_cpu_threads(default)  # torch already on 1 thread: nothing to oversubscribe
        assert caplog.text == ""
    finally:
        torch.set_num_threads(before)
