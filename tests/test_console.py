"""What a training run prints and logs (docs/running.md, "What a run prints"): progress lines where stdout is
no terminal and a step bar on one, no Lightning or plugin lines nobody can act on, one line per notice, the
run folder at the end, train/spec/* only at the steps where routing was measured, TensorBoard's hp_metric =
the final val loss, and the thread choice of a run on the default."""

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import synth_overrides

TRAIN = os.path.join(os.path.dirname(sys.executable), "testbed-train")

NOISE = (
    "GPU available",
    "TPU available",
    "HPU available",
    "limit_val_batches",
    "was configured so",
    "`Trainer.fit` stopped",
    "litlogger",
    "Total FLOPs",
    "Epoch 0/-2",
    "LOCAL_RANK",
)
"""Lightning's lines nobody can act on, and what its own bar and model summary printed."""

PROGRESS = re.compile(
    r"^\d\d:\d\d:\d\d INFO    step (\d+)/12 \(\d+%\) \| [\d,]+ tok/s \| ETA \w+"
    r"( \| val \d+\.\d{3} \(step (\d+)\))?$"
)


def test_a_piped_run_prints_progress_lines_and_no_noise(synth_mix, tmp_path):
    """stdout to a file (as in a sweep's or a cluster's log): progress lines, nothing from Lightning that
    nobody can act on, each notice and table title on one line, the run folder last."""
    out = tmp_path / "run"
    log_path = tmp_path / "stdout.log"
    with open(log_path, "w") as stdout:
        result = subprocess.run(
            [
                TRAIN,
                *synth_overrides(synth_mix),
                "trainer.progress_bar=true",  # a terminal's bar: where stdout is a file, lines instead
                "trainer.progress_every_s=0.001",  # a line after every step as well
                "trainer.max_steps=12",
                "trainer.log_every_n_steps=2",
                "metrics.train_every_n_steps=5",
                "metrics.plots=false",
                "logger=[csv,tensorboard]",
                f"hydra.run.dir={out}",
            ],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COLUMNS": "80"},
            timeout=300,
        )
    stdout_text = log_path.read_text()
    assert result.returncode == 0, result.stderr[-2000:]
    text = stdout_text + result.stderr
    assert not [line for line in text.splitlines() if any(noise in line for noise in NOISE)]
    lines = stdout_text.splitlines()
    # one progress line per step (every_s ~ 0) and one after each validation (steps 6 and 12), each whole
    progress = [PROGRESS.match(line) for line in lines if " INFO    step " in line]
    assert progress and all(progress), [line for line in lines if " INFO    step " in line]
    steps = [int(m.group(1)) for m in progress]
    assert steps == sorted(steps) and steps[-1] == 12 and set(range(1, 13)) <= set(steps)
    validated = [(int(m.group(1)), int(m.group(3))) for m in progress if m.group(3)]
    assert (6, 6) in validated and (12, 12) in validated
    trained = r"^\d\d:\d\d:\d\d INFO    trained 12 steps in \w+ \([\d,]+ tok/s\)$"
    assert len([line for line in lines if re.match(trained, line)]) == 1
    # the threads line: once, on one line
    assert len([line for line in lines if " INFO    threads: " in line]) == 1
    # titles and notices on one line each, whatever the width (80 columns here)
    assert "validation loss per domain (nats/token) after 12 steps, 3,072 tokens" in stdout_text
    assert "regime check (validation loss, nats/token; gain > 0: this run is better)" in stdout_text
    assert "specialization (mean over MoE layers)" in stdout_text
    baseline = [line for line in lines if line.startswith("no baseline runs yet for: ")]
    assert len(baseline) == 1 and baseline[0].endswith("(README: regime check)")
    assert stdout_text.rstrip().endswith(f"run folder: {out}")
    # the first line that is not a log record (the token store's): "model: N parameters (N trainable)"
    first = next(line for line in lines if not re.match(r"^\d\d:\d\d:\d\d ", line))
    assert "parameters" in first
    # one logging setup (conf/hydra/job_logging/rich.yaml): each record once on the console, as one plain
    # "HH:MM:SS LEVEL message" line where stdout is no terminal, and in Hydra's format in the run's cli.log
    records = [line for line in lines if " INFO " in line or " WARNING " in line]
    epochs = [line for line in records if "epochs over each domain" in line]
    assert len(epochs) == 1 and re.match(r"^\d\d:\d\d:\d\d INFO    epochs over each domain", epochs[0])
    assert len(records) == len(set(records)) and "token cache: read" not in text
    log_file = (out / "cli.log").read_text()
    assert "[testbed.data.datamodule][INFO] - epochs over each domain" in log_file
    assert "[testbed.train.progress][INFO] - step 12/12" in log_file  # the progress lines are in cli.log too

    # logger=[csv,tensorboard]: both written; hp_metric is the final val loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv") as f:
        assert any(row.get("val/loss") for row in csv.DictReader(f))
    hp = []
    for events in (out / "tensorboard").glob("events*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "hp_metric" in acc.Tags()["scalars"]:
            hp += [e.value for e in acc.Scalars("hp_metric")]
    assert hp and abs(hp[-1] - summary["val/loss"]) < 1e-4


def fake_trainer(step: int, total: int = 1500, fn: str = "fit"):
    return SimpleNamespace(
        global_step=step,
        max_steps=total,
        is_global_zero=True,
        sanity_checking=False,
        state=SimpleNamespace(fn=fn),
    )


def test_the_terminal_bar_counts_optimizer_steps_of_the_run(monkeypatch):
    """The bar's total is trainer.max_steps and its count the optimizer step, across the data loader's
    epochs (whose batch index restarts) and gradient accumulation; a resumed run starts at its step; the
    metrics are cut at the terminal's edge, never wrapped; the bar stops once."""
    import rich
    from rich.console import Console

    from testbed.train.progress import StepProgressBar

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=72, color_system=None)
    monkeypatch.setattr(rich, "get_console", lambda: console)
    module = SimpleNamespace(tokens_seen=0, last_val_metrics={}, last_val_step=None)
    bar = StepProgressBar()
    trainer = fake_trainer(step=300, total=1500)  # resumed at step 300
    bar.on_train_start(trainer, module)
    task = bar.progress.tasks[0]
    assert (task.total, task.completed) == (1500, 300)
    for batch_idx, step in enumerate(range(301, 1501)):
        trainer.global_step = step
        module.tokens_seen += 2048 * 1000  # a big rate: a long tokens/s figure
        # the loader's epoch ends every 293 batches: the batch index restarts, the step does not
        bar.on_train_batch_end(trainer, module, None, None, batch_idx % 293)
        if step == 1000:
            module.last_val_metrics = {"val/loss": 4.5678}
            bar.on_validation_end(trainer, module)
    task = bar.progress.tasks[0]
    assert (task.total, task.completed) == (1500, 1500)
    bar.on_train_end(trainer, module)
    bar.teardown(trainer, module, "fit")  # stopped already: nothing more drawn
    rendered = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # the cursor moves
    frames = [line for line in re.split(r"[\r\n]", rendered) if line.strip()]
    assert all(len(line) <= 72 for line in frames)  # the long tokens/s figure is cut, not wrapped
    assert all(line.startswith(("train ", "val ")) for line in frames)
    last = [line for line in frames if "1500/1500" in line]
    assert last and last[-1].startswith("train ") and "val 4.568" in last[-1]
    assert not re.search(r"\d+/(293|1207)\b", rendered)  # never a count of the loader's epoch


def test_plain_progress_line_format():
    from testbed.train.progress import ProgressLines, duration

    lines = ProgressLines(every_s=30)
    trainer = fake_trainer(step=0, total=1500)
    module = SimpleNamespace(tokens_seen=0, last_val_metrics={}, last_val_step=None)
    lines.on_train_start(trainer, module)
    assert lines.line(trainer, module) == "step 0/1500 (0%) | ? tok/s | ETA ?"
    lines.clock.start = (lines.clock.start[0] - 100.0, 0, 0)  # 100 s ago
    trainer.global_step, module.tokens_seen = 250, 512_000
    module.last_val_metrics, module.last_val_step = {"val/loss": 4.51234}, 250
    line = lines.line(trainer, module)
    expected = r"step 250/1500 \(17%\) \| 5,1\d\d tok/s \| ETA 8m\d\ds \| val 4\.512 \(step 250\)"
    assert re.fullmatch(expected, line), line
    assert [duration(s) for s in (None, 5, 125, 3 * 3600 + 300)] == ["?", "5s", "2m05s", "3h05m"]


def test_progress_where_stdout_is_no_terminal():
    from testbed.train.progress import ProgressLines, StepProgressBar, progress_callback

    class Stream(io.StringIO):
        def __init__(self, tty: bool):
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert isinstance(progress_callback(True, 30, Stream(tty=True)), StepProgressBar)
    assert progress_callback(False, 30, Stream(tty=True)) is None
    for bar in (True, False):  # a log file has no bar to turn off: the lines either way
        assert isinstance(progress_callback(bar, 30, Stream(tty=False)), ProgressLines)


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


@pytest.mark.parametrize(
    ("cores", "busy", "processes", "threads"),
    [
        (2, 0, 1, 2),  # alone: every core
        (2, 1, 1, 1),  # one other busy process on 2 cores: one thread (2.5x faster than two there)
        (2, 3, 1, 1),  # overloaded: still one
        (16, 3, 1, 13),
        (16, 0, 4, 4),  # CPU DDP: the free cores shared by the ranks
        (8, None, 1, 8),  # load unknown: torch's default
    ],
)
def test_thread_choice(cores, busy, processes, threads):
    from testbed.train.threads import choose_threads

    assert choose_threads(cores, busy, processes) == threads


def test_other_processes_from_the_load():
    from testbed.train.threads import other_processes

    assert other_processes(0, 0.3) == 0  # idle (this process's own imports in the load average)
    assert other_processes(0, 2.3) == 1  # a background run that is not runnable at this instant
    assert other_processes(2, 0.5) == 2
    assert other_processes(None, None) is None and other_processes(None, 1.2) == 0


def test_threads_follow_the_load_unless_chosen(monkeypatch, caplog):
    """trainer.num_threads=0 on a CPU run: the cores other processes leave free (patched here), logged once
    in one line; an explicit trainer.num_threads or OMP_NUM_THREADS wins; a GPU run keeps torch's default."""
    import torch
    from hydra import compose, initialize_config_dir

    from testbed import CONF_DIR
    from testbed.config import parse_config
    from testbed.train import threads

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        default = parse_config(compose("config", overrides=["trainer.accelerator=cpu"]))
        three = parse_config(compose("config", overrides=["trainer.num_threads=3"]))
        gpu = parse_config(compose("config", overrides=["trainer=gpu"]))
    before = torch.get_num_threads()
    for name in threads.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "load_average", lambda: 2.3)
    try:
        for busy, expected in [(0, 1), (2, 1)]:  # load 2.3: one other process, whatever is runnable now
            monkeypatch.setattr(threads, "runnable_elsewhere", lambda busy=busy: busy)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger=threads.log.name):
                assert threads.set_cpu_threads(default) == expected
            assert torch.get_num_threads() == expected
            assert caplog.messages == [
                f"threads: {expected} (load 2.3 on 2 cores; set trainer.num_threads to choose)"
            ]
        monkeypatch.setattr(threads, "load_average", lambda: 0.2)
        monkeypatch.setattr(threads, "runnable_elsewhere", lambda: 0)
        assert threads.set_cpu_threads(default, verbose=False) == 2  # idle: both cores
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=threads.log.name):
            assert threads.set_cpu_threads(three) == 3 and torch.get_num_threads() == 3
        assert caplog.messages == ["threads: 3 (trainer.num_threads)"]
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=threads.log.name):
            assert threads.set_cpu_threads(default) == 1
        assert caplog.messages[0].startswith("threads: 1 (OMP_NUM_THREADS=1;")
        assert threads.set_cpu_threads(gpu, verbose=False) is None
    finally:
        torch.set_num_threads(before)


def test_runnable_elsewhere_reads_this_machine():
    from testbed.train.threads import runnable_elsewhere

    busy = runnable_elsewhere(samples=1, interval=0)
    assert busy is None or busy >= 0


def sweep(tmp_path, *overrides: str, synth_mix) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [
            TRAIN,
            "-m",
            *synth_overrides(synth_mix, "trainer.max_steps=3", "trainer.val_check_interval=3"),
            "trainer.num_threads=1",
            "metrics.plots=false",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_slurm_jobs_leave_no_folder_named_after_a_job_id_pattern():
    """submitit makes its folder before the job id exists: a `%j` level left an empty folder named `%j`."""
    from hydra import compose, initialize_config_dir

    from testbed import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    folder = cfg.hydra.launcher.submitit_folder
    assert folder.endswith("/.submitit") and "%" not in folder


@pytest.mark.heavy
def test_a_submitit_job_logs_its_end_once(synth_mix, tmp_path):
    """A submitit job (the local executor, with conf/hydra/launcher/slurm.yaml's folder): submitit's own
    INFO lines, which it printed twice ("Job completed successfully"), are off; no empty `%j` folder."""
    sweep_dir = tmp_path / "sweep"
    sweep(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.submitit_folder=${hydra.sweep.dir}/.submitit",
        f"hydra.sweep.dir={sweep_dir}",
        synth_mix=synth_mix,
    )
    logs = list((sweep_dir / ".submitit").glob("*_log.out"))
    assert logs, sorted((sweep_dir / ".submitit").iterdir())
    text = "\n".join(path.read_text() for path in logs)
    assert "INFO    step 3/3" in text and "run folder:" in text  # the job's own lines are there
    assert "Job completed successfully" not in text and "Exiting after successful completion" not in text
    assert not [p for p in sweep_dir.rglob("*") if "%" in p.name]


@pytest.mark.heavy
def test_an_optuna_sweep_prints_no_setup_lines(synth_mix, tmp_path):
    result = sweep(
        tmp_path,
        "hydra/sweeper=optuna_lr_balance",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={tmp_path / 'optuna'}",
        synth_mix=synth_mix,
    )
    text = result.stdout + result.stderr
    for line in ("Study name:", "Storage:", "Sampler:", "Directions:", "A new study created"):
        assert line not in text
    assert "Best value:" in text  # the search's result stays
