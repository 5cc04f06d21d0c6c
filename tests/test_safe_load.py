"""No code runs from a file a user passes in: a checkpoint or table whose pickle would run code is refused
by every command that opens one (exit 2, nothing executed), while the project's own files load as before;
TESTBED_TRUST_CHECKPOINTS=1 is the documented way to load a trusted file in full."""

from __future__ import annotations

import datetime
import pathlib

import pytest
import torch

from testbed.errors import CheckpointError
from testbed.safe_load import TRUST_ENV, load_file


class Payload:
    """Unpickling this object creates `marker`: the code a crafted checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def own_checkpoint(synth_mix, tmp_path_factory):
    """A real testbed-train checkpoint (2 steps on the synthetic mix)."""
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides

    run_dir = tmp_path_factory.mktemp("own")
    overrides = synth_overrides(synth_mix, "trainer.max_steps=2", "trainer.val_check_interval=2")
    run_training(compose(overrides), run_dir, quiet=True)
    return run_dir / "checkpoints" / "last.ckpt"


def crafted(own_checkpoint, tmp_path):
    """The real checkpoint with a code-running object added; returns (file, marker)."""
    marker = tmp_path / "marker"
    payload = torch.load(own_checkpoint, map_location="cpu", weights_only=True)
    payload["note"] = Payload(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(payload, path)
    return path, marker


def test_own_files_load_and_crafted_ones_are_refused(own_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    assert set(load_file(own_checkpoint, "resume")) >= {"state_dict", "optimizer_states", "testbed"}
    path, marker = crafted(own_checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match=rf"resume: {path} was refused: .*{TRUST_ENV}=1"):
        load_file(path, "resume")
    assert not marker.exists()
    plain = tmp_path / "date.pt"  # a harmless object outside the allow-list: refused, loads when trusted
    torch.save({"when": datetime.date(2026, 1, 1)}, plain)
    with pytest.raises(CheckpointError, match="was refused"):
        load_file(plain, "table")
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_file(plain, "table")["when"] == datetime.date(2026, 1, 1)
    monkeypatch.setenv(TRUST_ENV, "yes")
    with pytest.raises(CheckpointError, match=f"{TRUST_ENV}='yes': allowed are 1"):
        load_file(plain, "table")


def test_every_command_refuses_a_crafted_checkpoint(own_checkpoint, tmp_path, synth_mix, capsys, monkeypatch):
    """testbed-analyze, testbed-train init_from and resume, testbed-quiz eval, testbed-intervene, and the
    experiment grid's expert-path tables: exit 2 (or the error the CLI turns into exit 2), no code run."""
    from testbed.experiment import ExperimentError, expert_path_override
    from testbed.hf.cli import analyze_main, quiz_main
    from testbed.hf.intervene import main as intervene_main
    from testbed.train.checkpoint import read_checkpoint
    from testbed.train.cli import run_training
    from tests.conftest import compose, synth_overrides

    monkeypatch.delenv(TRUST_ENV, raising=False)
    path, marker = crafted(own_checkpoint, tmp_path)
    quiz = tmp_path / "quiz.csv"
    quiz.write_text("what?,a,b,c,d,A\n")
    assert analyze_main([str(path)]) == 2
    assert quiz_main(["eval", str(path), "--quiz", str(quiz)]) == 2
    assert intervene_main(["prune", str(path), "--quiz", str(quiz)]) == 2
    assert capsys.readouterr().err.count("was refused") == 3
    with pytest.raises(CheckpointError, match="init_from: .* was refused"):
        run_training(compose(synth_overrides(synth_mix, f"init_from={path}")), tmp_path / "init", quiet=True)
    with pytest.raises(CheckpointError, match="resume: .* was refused"):
        read_checkpoint(path)
    routing = tmp_path / "grid_run" / "routing"
    routing.mkdir(parents=True)
    table = {"domains": ["a"], "layers": ["layer0"], "step": 1, "counts": torch.ones(1, 1, 4)}
    torch.save({**table, "note": Payload(marker)}, routing / "train_counts_step1.pt")
    with pytest.raises(ExperimentError, match="expert path: .* was refused"):
        expert_path_override(tmp_path / "grid_run", "a", 0.5)
    assert not marker.exists()


def test_a_crafted_weights_file_in_a_model_folder_is_refused(tmp_path, monkeypatch):
    """A Hugging Face folder whose pytorch_model.bin would run code: a clear HFModelError, no code run;
    a model folder's own Python code is never run either (trust_remote_code=False)."""
    transformers = pytest.importorskip("transformers")
    from testbed.hf.load import HFModelError, load_hf_model

    folder = tmp_path / "model"
    config = transformers.OlmoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    config.save_pretrained(folder)
    marker = tmp_path / "marker"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(64, 16), "x": Payload(marker)}, folder / "pytorch_model.bin"
    )
    with pytest.raises(HFModelError, match="its weights were refused"):
        load_hf_model(str(folder))
    assert not marker.exists()
