"""Lightning/Hydra-template habits: `experiment=<id>` (one run with the settings its grid shares, the grid
itself through testbed-experiment), the `callbacks` group (Lightning callbacks from `_target_` entries),
`trainer.fast_dev_run` and `trainer.overfit_batches` and the `debug` group that sets them; a bad value in
each is a clear exit-2 error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from omegaconf import OmegaConf

from testbed.config import parse_config
from testbed.errors import ConfigError
from testbed.train.cli import CONF_DIR, check_group_choices, check_overrides, run_training
from testbed.train.run_options import build_callbacks
from testbed.train.sweeps import experiment_overrides
from tests.conftest import compose, synth_overrides
from tests.inprocess import train

EXPERIMENTS = sorted(
    p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml") if not p.stem.startswith("_")
)
TINY = ("trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.num_threads=1", "metrics.plots=false")


# --- experiment=<id> ------------------------------------------------------------------------------------


def test_experiment_without_plus_selects_the_experiments_settings(capsys):
    """`experiment=x2` (Hydra said "Could not override 'experiment'") is the experiment's single-run
    settings, the same as the `+experiment=x2` that testbed-experiment gives each of its runs; a note says
    where the grid runs."""
    assert experiment_overrides(["experiment=x2", "seed=1"], CONF_DIR) == ["+experiment=x2", "seed=1"]
    note = capsys.readouterr().err
    assert "experiment=x2: one run with the settings every run of its grid shares" in note
    assert "sweeps capacity; seeds [0, 1, 2]) runs with `testbed-experiment x2`" in note
    run = parse_config(compose(["+experiment=x2"]))
    assert (run.balance.scope, run.balance.coefficient, run.trainer.max_steps) == ("global", 0.1, 1500)
    assert (run.data.seq_len, run.data.batch_composition) == (32, "homogeneous")  # x2's _scope settings


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_is_a_single_run_config(name):
    """One file per experiment (conf/experiment/<id>.yaml, the folders of experiments/ name theirs): its
    settings compose and validate as one run."""
    run = parse_config(compose([f"+experiment={name}"]))
    assert run.trainer.max_steps > 0


def test_asking_testbed_train_for_a_grid_names_testbed_experiment():
    """`-m experiment=x1` alone can only mean the grid: refused (exit 2) with the command that runs it;
    with keys to sweep it sweeps them over the experiment's settings."""
    with pytest.raises(ConfigError) as caught:
        experiment_overrides(["-m", "experiment=x1"], CONF_DIR)
    message = str(caught.value)
    assert "runs with `testbed-experiment x1`" in message and "sweeps dense, references, lbl" in message
    assert experiment_overrides(["-m", "experiment=x1", "seed=0,1"], CONF_DIR) == [
        "-m",
        "+experiment=x1",
        "seed=0,1",
    ]
    result = train("-m", "experiment=x1")
    assert result.code == 2 and "testbed-experiment x1" in result.stderr


def test_an_unknown_experiment_is_exit_2_listing_the_ids():
    with pytest.raises(ConfigError, match=r"one of \[.*'x1'.*\] \(files in conf/experiment/\)"):
        check_group_choices(experiment_overrides(["experiment=x99"], CONF_DIR))


# --- callbacks ------------------------------------------------------------------------------------------


def test_the_callbacks_group_builds_lightning_callbacks(tmp_path):
    run = parse_config(compose(["callbacks=default", "callbacks.early_stopping.patience=5"]))
    built = build_callbacks(run, tmp_path)
    stop = next(c for c in built if isinstance(c, EarlyStopping))
    best = next(c for c in built if isinstance(c, ModelCheckpoint))
    assert (stop.monitor, stop.patience, stop.mode) == ("val/loss", 5, "min")
    assert (best.monitor, best.save_top_k, Path(best.dirpath)) == (
        "val/loss",
        2,
        tmp_path / "checkpoints" / "best",
    )
    assert build_callbacks(parse_config(compose()), tmp_path) == []  # the default: callbacks=none
    one = parse_config(compose(["callbacks=default", "callbacks.model_checkpoint=null"]))
    assert [type(c) for c in build_callbacks(one, tmp_path)] == [EarlyStopping]
    extra = compose(["+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor"])
    assert type(build_callbacks(parse_config(extra), tmp_path)[0]).__name__ == "LearningRateMonitor"


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["callbacks.early_stopping.patience=-1"], "callbacks.early_stopping.patience", "an integer >= 0"),
        (
            ["callbacks.early_stopping.monitor=val/los"],
            "callbacks.early_stopping.monitor",
            "'val/loss/alpha'",
        ),
        (
            ["callbacks.model_checkpoint.monitor=val/loss/code"],
            "callbacks.model_checkpoint.monitor",
            "logged",
        ),
        (["callbacks.early_stopping.mode=sideways"], "callbacks.early_stopping", "EarlyStopping accepts"),
        (
            ["callbacks.model_checkpoint.save_top_k=-2"],
            "callbacks.model_checkpoint",
            "ModelCheckpoint accepts",
        ),
        (
            ["callbacks.early_stopping._target_=no.such.Callback"],
            "callbacks.early_stopping._target_",
            "import",
        ),
        (
            ["callbacks.early_stopping._target_=collections.OrderedDict"],
            "callbacks.early_stopping._target_",
            "Lightning",
        ),
        (["trainer.enable_checkpointing=false"], "callbacks.model_checkpoint", "enable_checkpointing=false"),
        (["+callbacks.x=3"], "callbacks.x", "_target_"),
    ],
)
def test_bad_callback_values_are_config_errors(synth_mix, tmp_path, overrides, key, fragment):
    with pytest.raises(ConfigError) as caught:
        cfg = compose(synth_overrides(synth_mix, "callbacks=default", *overrides))
        build_callbacks(parse_config(cfg), tmp_path)
    assert caught.value.key == key and fragment in str(caught.value), str(caught.value)


def test_a_bad_callback_value_is_exit_2_before_training(synth_mix, tmp_path):
    out = tmp_path / "run"
    result = train(
        *synth_overrides(synth_mix, *TINY),
        "callbacks=default",
        "callbacks.early_stopping.patience=-1",
        f"hydra.run.dir={out}",
    )
    assert result.code == 2 and "callbacks.early_stopping.patience" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


@pytest.mark.slow
def test_early_stopping_and_best_checkpoints_in_a_run(synth_mix, tmp_path):
    """Early stopping with patience 0 and a min_delta no step reaches stops at the second validation; the
    best-k callback keeps its best checkpoint (k = 1 of the two validations) beside last.ckpt."""
    cfg = compose(
        synth_overrides(
            synth_mix,
            "trainer.num_threads=1",
            "trainer.max_steps=12",
            "trainer.val_check_interval=2",
            "callbacks=default",
            "callbacks.early_stopping.patience=0",
            "callbacks.early_stopping.min_delta=100.0",
            "callbacks.model_checkpoint.save_top_k=1",
        )
    )
    summary = run_training(cfg, tmp_path, quiet=True)
    assert summary["status"] == "finished" and summary["steps"] == 4
    best = sorted((tmp_path / "checkpoints" / "best").glob("*.ckpt"))
    assert len(best) == 1 and best[0].name.startswith(("step000002-val_loss", "step000004-val_loss"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


# --- fast_dev_run, overfit_batches, debug ---------------------------------------------------------------


def test_the_debug_group():
    """debug=default: fast_dev_run with DEBUG records; debug=overfit: 3 batches repeated for 200 steps."""
    cfg = compose(["debug=default"])
    assert cfg.trainer.fast_dev_run == 1 and parse_config(cfg).trainer.fast_dev_run == 1
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        hydra_cfg = hydra_compose("config", overrides=["debug=default"], return_hydra_config=True)
    assert list(hydra_cfg.hydra.verbose) == ["testbed", "lightning"]
    overfit = parse_config(compose(["debug=overfit"])).trainer
    assert (overfit.overfit_batches, overfit.max_steps, overfit.fast_dev_run) == (3, 200, 0)
    with pytest.raises(ConfigError, match=r"one of \['default', 'overfit'\] \(files in conf/debug/\)"):
        check_group_choices(["debug=nope"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer.fast_dev_run=-1"], "trainer.fast_dev_run"),
        (["trainer.fast_dev_run=abc"], "trainer.fast_dev_run"),
        (["trainer.fast_dev_run=0.5"], "trainer.fast_dev_run"),
        (["trainer.overfit_batches=-2"], "trainer.overfit_batches"),
        (["trainer.overfit_batches=0.5"], "trainer.overfit_batches"),
        (["debug=default", "trainer.overfit_batches=2"], "trainer.overfit_batches"),
    ],
)
def test_bad_debug_values_are_config_errors(overrides, key):
    """Refused by the pre-check's composition (a type the schema refuses) or by the run's checks."""
    with pytest.raises(ConfigError) as caught:
        check_overrides(overrides)
        parse_config(compose(overrides))
    assert caught.value.key == key


def test_bad_debug_values_are_exit_2(tmp_path):
    assert train("debug=nope").code == 2
    result = train("trainer.fast_dev_run=-1", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.code == 2 and "config key 'trainer.fast_dev_run': got -1" in result.stderr


def test_fast_dev_run_runs_n_batches_and_writes_nothing(synth_mix, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose(
        synth_overrides(synth_mix, "trainer.num_threads=1", "trainer.fast_dev_run=2", "callbacks=default")
    )
    result = run_training(cfg, run_dir, quiet=True)
    assert result["status"] == "fast_dev_run" and result["steps"] == 2 and result["val/loss"] > 0
    assert sorted(p.name for p in run_dir.rglob("*")) == []  # no checkpoint, metrics.csv, summary or record
    with pytest.raises(ConfigError, match="null with trainer.fast_dev_run"):
        run_training(OmegaConf.merge(cfg, {"resume": "auto"}), run_dir, quiet=True)


class BatchRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())


def test_overfit_batches_repeats_the_first_batches(synth_mix, tmp_path):
    recorder = BatchRecorder()
    cfg = compose(
        synth_overrides(
            synth_mix,
            "trainer.num_threads=1",
            "trainer.overfit_batches=2",
            "trainer.max_steps=5",
            "trainer.val_check_interval=5",
            "metrics.plots=false",
        )
    )
    summary = run_training(cfg, tmp_path, quiet=True, callbacks=(recorder,))
    assert summary["steps"] == 5 and len(recorder.batches) == 5
    first, second = recorder.batches[:2]
    assert not torch.equal(first, second)
    for i, batch in enumerate(recorder.batches):
        assert torch.equal(batch, (first, second)[i % 2])


def test_debug_default_through_the_command_line(synth_mix, tmp_path):
    """debug=default: one batch of each, DEBUG records (the composed config, the callbacks built), and the
    run folder left empty."""
    out = tmp_path / "run"
    result = train(
        *synth_overrides(synth_mix, "trainer.num_threads=1"),
        "debug=default",
        "callbacks=default",
        f"hydra.run.dir={out}",
    )
    assert result.code == 0, result.stderr[-3000:]
    assert "fast_dev_run: 1 training step(s) and 1 validation batch(es) ran" in result.stdout
    printed = result.stdout + result.stderr
    assert "the run's composed config:" in printed and "callback early_stopping: " in printed
    assert not list(out.rglob("*"))
