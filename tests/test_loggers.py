"""W&B (offline, no account) and TensorBoard runs hold the metrics and the heatmap images on disk."""

import glob
from pathlib import Path

import pytest

from testbed.train.cli import run_training
from tests.conftest import compose, synth_overrides

pytestmark = pytest.mark.slow


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


def test_wandb_offline_run_holds_metrics_and_heatmaps(synth_mix, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run_training(compose(synth_overrides(synth_mix, "logger=wandb")), tmp_path, quiet=True)
    [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)] = item.value_json
    assert float(history["spec/purity/mean"]) == pytest.approx(summary["spec/purity/mean"])
    assert float(history["val/loss/alpha"]) == pytest.approx(summary["val/loss/alpha"])
    images = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "routing" / "*.png")
    )
    assert len(images) == 2  # one heatmap per validation (steps 6 and 12)
    assert Path(images[0]).stat().st_size > 1000


def test_tensorboard_run_holds_metrics_and_heatmaps(synth_mix, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_training(compose(synth_overrides(synth_mix, "logger=tensorboard")), tmp_path, quiet=True)
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
