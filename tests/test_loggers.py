"""Loggers as a list (`logger=[csv,tensorboard,wandb]`): metrics.csv in every run, TensorBoard and W&B
(offline, no account) beside it holding the metrics and the heatmap images; W&B's name, group, tags and
project from the config with defaults read from the run, and no W&B console lines unless asked for."""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from testbed.errors import ConfigError
from tests.conftest import compose, synth_overrides

TRAIN = os.path.join(os.path.dirname(sys.executable), "testbed-train")


def wandb_records(path):
    """Records of an offline .wandb file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks
    (wandb >= 0.19 ships no Python reader for it; the protobuf Record type is still in the package)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, chunks = Path(path).read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            chunks.append(pending + chunk)
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def wandb_run(run_dir: Path):
    """(the run record: name, group, tags, project; the history {key: value}) of the offline run."""
    [run_file] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    run, history = None, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)] = item.value_json
    return run, history


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- the logger section -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        ([], ["csv"]),
        (["logger=[csv,tensorboard]"], ["csv", "tensorboard"]),
        (["logger=tensorboard"], ["csv", "tensorboard"]),  # one logger without brackets; CSV kept
        (["logger=[tensorboard,wandb]"], ["csv", "tensorboard", "wandb"]),
        (["logger=[]"], ["csv"]),
    ],
)
def test_logger_accepts_a_list_and_keeps_csv(choice, names):
    from testbed.config import parse_config

    assert parse_config(compose(choice)).logger.names() == names


def test_wandb_options_compose_and_earlier_configs_still_read():
    from testbed.config import parse_config

    run = parse_config(compose(["logger=[wandb]", "logger.wandb.project=p", "logger.wandb.tags=[a,b]"]))
    wandb = run.logger.wandb
    assert (wandb.project, wandb.tags, wandb.offline) == ("p", ["a", "b"], True)
    # a checkpoint of an earlier run holds the single-logger form: still read, as that logger alone
    raw = OmegaConf.to_container(compose(), resolve=True, enum_to_str=True)
    raw["logger"] = {"name": "wandb", "project": "old", "offline": True}
    old = parse_config(raw).logger
    assert old.names() == ["csv", "wandb"] and old.wandb.project == "old"
    raw["logger"] = {"name": "mlflow"}
    with pytest.raises(ConfigError, match="one of \\['csv', 'tensorboard', 'wandb'\\]"):
        parse_config(raw)


def test_options_of_a_logger_not_chosen_are_refused_by_name():
    from testbed.train.cli import check_logger_options

    check_logger_options(["logger=[csv,wandb]", "logger.wandb.project=x"])
    with pytest.raises(ConfigError) as info:
        check_logger_options(["logger=[tensorboard]", "logger.wandb.project=x"])
    assert info.value.key == "logger.wandb.project" and "logger=[csv,tensorboard,wandb]" in info.value.allowed


def test_wandb_defaults_come_from_the_run(monkeypatch, tmp_path):
    from testbed.config import WandbLoggerConfig
    from testbed.train import run_loggers

    monkeypatch.chdir(tmp_path)
    long_path = "data.root=/" + "x" * 80
    monkeypatch.setattr(
        run_loggers,
        "hydra_job",
        lambda: ("multirun/sweep", ["router.top_k=1", "hydra.sweep.dir=multirun/sweep", long_path, "seed=2"]),
    )
    settings = run_loggers.wandb_settings(WandbLoggerConfig(), tmp_path / "multirun" / "sweep" / "3")
    assert settings == {
        "project": "moe-testbed",
        "name": "multirun/sweep/3",  # the run folder, as the run prints it
        "group": "multirun/sweep",  # the sweep's folder
        "tags": [
            "router.top_k=1",
            "seed=2",
        ],  # the overrides; Hydra's own and those over 64 characters left out
        "mode": "offline",
    }
    chosen = WandbLoggerConfig(project="p", name="n", group="g", tags=["t"], offline=False)
    assert run_loggers.wandb_settings(chosen, tmp_path / "x") == {
        "project": "p",
        "name": "n",
        "group": "g",
        "tags": ["t"],
        "mode": "online",
    }


# ---- runs ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_heatmaps_and_its_names(synth_mix, tmp_path, monkeypatch):
    from testbed.train.cli import run_training

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = synth_overrides(
        synth_mix,
        "logger=[wandb]",
        "logger.wandb.name=my-run",
        "logger.wandb.group=my-group",
        "logger.wandb.tags=[one,two]",
        "logger.wandb.project=my-project",
    )
    summary = run_training(compose(overrides), tmp_path, quiet=True)
    run, history = wandb_run(tmp_path)
    assert (run.display_name, run.run_group, list(run.tags), run.project) == (
        "my-run",
        "my-group",
        ["one", "two"],
        "my-project",
    )
    assert float(history["spec/purity/mean"]) == pytest.approx(summary["spec/purity/mean"])
    assert float(history["val/loss/alpha"]) == pytest.approx(summary["val/loss/alpha"])
    images = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "routing" / "*.png")
    )
    assert len(images) == 2  # one heatmap per validation (steps 6 and 12)
    assert Path(images[0]).stat().st_size > 1000
    assert any(row.get("val/loss") for row in csv_rows(tmp_path))  # metrics.csv all the same


@pytest.mark.slow
def test_tensorboard_alone_still_writes_metrics_csv(synth_mix, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from testbed.train.cli import run_training

    summary = run_training(compose(synth_overrides(synth_mix, "logger=[tensorboard]")), tmp_path, quiet=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {"spec/purity/mean", "spec/nmi/layer1", "val/loss/beta", "train/aux/load_balance"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Scalars("spec/purity/mean")[-1].value == pytest.approx(
        summary["spec/purity/mean"], rel=1e-6
    )
    heatmaps = events.Images("routing/heatmap")
    assert [image.step for image in heatmaps] == [6, 12]
    assert heatmaps[-1].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    # the curves testbed-report reads: in metrics.csv, though only TensorBoard was listed
    val = [float(row["val/loss"]) for row in csv_rows(tmp_path) if row.get("val/loss")]
    assert len(val) == 2 and val[-1] == pytest.approx(summary["val/loss"], rel=1e-6)


@pytest.mark.slow
def test_a_sweep_job_on_wandb_is_quiet_and_named_from_its_sweep(synth_mix, tmp_path):
    """W&B's own console lines are off by default; a -m job's W&B group is its sweep folder, its name its
    run folder and its tags its overrides."""
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    result = subprocess.run(
        [
            TRAIN,
            "-m",
            *synth_overrides(synth_mix, "trainer.max_steps=4", "trainer.val_check_interval=4"),
            "metrics.plots=false",
            "logger=[csv,wandb]",
            "seed=3",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        env={**env, "WANDB_MODE": "offline"},
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if line.lower().startswith("wandb")] == []
    sync = "W&B offline run saved; to upload it: wandb sync "
    assert len([line for line in output.splitlines() if sync in line]) == 1
    run, _ = wandb_run(sweep / "0")
    assert (run.display_name, run.run_group) == ("sweep/0", "sweep")
    assert "seed=3" in run.tags and not any(tag.startswith("hydra.") for tag in run.tags)
    assert any(row.get("val/loss") for row in csv_rows(sweep / "0"))
