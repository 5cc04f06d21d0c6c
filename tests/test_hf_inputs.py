"""Bad input to the --hf commands (testbed/hf/load.py, testbed/hf/cli.py, testbed/hf/intervene.py): each a
clear exit-2 error naming the problem and what is allowed, never a traceback, a hub lookup of a local path, or
code run from a weights file. And the options that reach larger models: --device-map, --revision, and
benchmarks/hf_large_check.py's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the optional extra .[hf] is not installed")

from testbed.hf import load as hf_load  # noqa: E402
from testbed.hf.cli import analyze_main, quiz_main  # noqa: E402
from testbed.hf.intervene import main as intervene_main  # noqa: E402
from tests.test_hf import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny OLMoE with the shipped tokenizer, saved."""
    from testbed.data.loading import SHIPPED_TOKENIZER

    out = tmp_path_factory.mktemp("inputs") / "olmoe"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("olmoe", vocab_size=4096))
    model.save_pretrained(out)
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(SHIPPED_TOKENIZER)).save_pretrained(out)
    return out


def error_of(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------- the source


def test_a_missing_relative_path_is_not_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    """`./x`, `a/b/c` and `models/x` (with a local models/ folder) are paths: 'does not exist', at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(hf_load, "_hub_reachable", lambda *a: pytest.fail("a path was looked up on the hub"))
    for source in ("./olmoe", "models/olmoe", "a/b/c", "olmoe/"):
        err = error_of(capsys, analyze_main(["--hf", source]))
        assert f"--hf {source}: directory does not exist" in err and str(tmp_path) in err
        assert "hub id such as" in err


def test_a_hub_id_without_network_or_cache_fails_at_once(tmp_path, capsys, monkeypatch):
    """No retries against an unreachable hub: one clear message naming both readings of the name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf_load, "_hub_reachable", lambda *a: False)
    start = time.monotonic()
    err = error_of(capsys, analyze_main(["--hf", "someone/no-such-model"]))
    assert time.monotonic() - start < 10
    assert "no local directory" in err and "not reachable" in err and "local hub cache" in err


def test_a_folder_without_tokenizer_files(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    err = error_of(capsys, analyze_main(["--hf", str(bare)]))
    assert "holds no tokenizer files" in err and "tokenizer.json" in err and "--tokenizer" in err
    # --tokenizer names them: then it loads (the quiz reaches the missing quiz file, not the tokenizer)
    assert quiz_main(["--hf", str(bare), "--tokenizer", str(model_dir), "--quiz", str(tmp_path / "q")]) == 2
    assert "tokenizer" not in capsys.readouterr().err
    empty_tokenizer = tmp_path / "tok"
    empty_tokenizer.mkdir()
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--tokenizer", str(empty_tokenizer)]))
    assert f"--tokenizer {empty_tokenizer}: the folder holds no tokenizer files" in err


def test_a_tokenizer_without_a_vocabulary_is_refused(model_dir, monkeypatch):
    class Empty:
        def __len__(self):
            return 2

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Empty())
    with pytest.raises(hf_load.HFModelError, match="has 2 tokens: it was built without a vocabulary"):
        hf_load.load_hf_model(str(model_dir))


# ------------------------------------------------------------------------------------------- the device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA GPU")
def test_device_cuda_without_cuda(model_dir, capsys):
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--device", "cuda"]))
    assert "--device cuda:" in err and ("CPU-only build" in err or "no CUDA GPU" in err)
    assert "--device cpu" in err
    err = error_of(capsys, intervene_main(["prune", "--hf", str(model_dir), "--device", "cuda:1"]))
    assert "--device cuda:1" in err


def test_device_names_and_cuda_builds(model_dir, capsys, monkeypatch):
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--device", "banana"]))
    assert "'banana' is not a device name" in err and "allowed: cpu, cuda, cuda:<index>, mps" in err
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build of torch, but no GPU visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--device", "cuda"]))
    assert "no CUDA GPU is visible" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--device", "cuda:2"]))
    assert "there are 2 GPU(s) (cuda:0 .. cuda:1)" in err


# ------------------------------------------------------------------------------------------ the weights


class Payload:
    """Unpickling this writes the marker file: the code a crafted weights file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_runs_no_code(model_dir, tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    for path in model_dir.iterdir():
        if path.name != "model.safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "marker"
    state = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    torch.save({**state, "extra": Payload(marker)}, folder / "pytorch_model.bin")
    quiz = tmp_path / "quiz_test.csv"
    quiz.write_text("What?,a,b,c,d,A\n")
    for command in (
        lambda: analyze_main(["--hf", str(folder)]),
        lambda: quiz_main(["--hf", str(folder), "--quiz", str(quiz)]),
        lambda: intervene_main(["prune", "--hf", str(folder)]),
    ):
        err = error_of(capsys, command())
        assert "its weights were refused" in err and "pytorch_model.bin" in err and "io.open" in err
        assert "Nothing was loaded" in err
    assert not marker.exists()


def test_other_loader_errors_exit_2(model_dir, tmp_path, capsys, monkeypatch):
    """A corrupt safetensors file, a config that does not fit the weights, and any other exception of the
    loader: exit 2 with its type and first line."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for path in model_dir.iterdir():
        (corrupt / path.name).write_bytes(path.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    err = error_of(capsys, analyze_main(["--hf", str(corrupt)]))
    assert "cannot load its weights (SafetensorError" in err
    config = json.loads((corrupt / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (corrupt / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    err = error_of(capsys, analyze_main(["--hf", str(corrupt)]))
    assert "cannot load its weights (RuntimeError" in err
    (corrupt / "config.json").write_text("{not json")
    err = error_of(capsys, analyze_main(["--hf", str(corrupt)]))
    assert "cannot load its config" in err

    def broken(*args, **kwargs):
        raise KeyError("lm_head.weight")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    err = error_of(capsys, analyze_main(["--hf", str(model_dir)]))
    assert "cannot load its weights (KeyError: 'lm_head.weight')" in err


# ------------------------------------------------------------------------------------------ help texts


@pytest.mark.parametrize(
    "script,expected_end",
    [
        ("testbed-analyze", "and a short Markdown summary."),
        ("testbed-quiz", "per-expert accuracy spread on a quiz)."),
        ("testbed-intervene", "with a bootstrap 95% interval of the effect."),
    ],
)
def test_help_texts_render_whole(script, expected_end):
    """The description is the whole first paragraph, not its first line cut mid-sentence."""
    from testbed.hf.cli import analyze_parser, quiz_parser
    from testbed.hf.intervene import build_parser

    parser = {"testbed-analyze": analyze_parser, "testbed-quiz": quiz_parser}.get(script, build_parser)()
    text = " ".join(parser.format_help().split())
    assert " ".join(parser.description.split()).endswith(expected_end)
    assert expected_end in text
    if script == "testbed-analyze":
        assert "--device-map" in text and "--revision" in text


# ------------------------------------------------------------------------------------------------ reach


def test_device_map_needs_accelerate(model_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "accelerate" else real(n, *a))
    err = error_of(capsys, analyze_main(["--hf", str(model_dir), "--device-map", "auto"]))
    assert "--device-map auto needs the package `accelerate`" in err and "pip install accelerate" in err


def test_device_map_and_revision_reach_from_pretrained(model_dir, monkeypatch):
    """With accelerate present, --device-map goes to from_pretrained and the model stays where it was placed;
    --revision goes to every hub call of a hub id, and is refused for a local folder."""
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "accelerate" else real_find(n, *a)
    )
    seen = {}
    real = {
        name: getattr(transformers, name).from_pretrained
        for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer")
    }

    def recording(name):
        def from_pretrained(source, **kwargs):
            seen.setdefault(name, kwargs)  # the command's own call (not transformers' inner ones)
            kwargs = {
                k: v for k, v in kwargs.items() if k not in ("device_map", "revision", "local_files_only")
            }
            return real[name](model_dir, **kwargs)

        return from_pretrained

    for name in real:
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", recording(name))
    hf = hf_load.load_hf_model(str(model_dir), device_map="auto")
    assert seen["AutoModelForCausalLM"]["device_map"] == "auto" and hf.device_map == "auto"
    assert hf.device == hf.model.get_input_embeddings().weight.device
    assert seen["AutoModelForCausalLM"]["dtype"] == (
        torch.bfloat16 if torch.cuda.is_available() else torch.float32
    )
    with pytest.raises(hf_load.HFModelError, match="--revision v1: applies to hub ids only"):
        hf_load.load_hf_model(str(model_dir), revision="v1")
    monkeypatch.setattr(hf_load, "_hub_reachable", lambda *a: True)
    seen.clear()
    hf = hf_load.load_hf_model("allenai/some-moe", revision="abc123")
    assert all(seen[name]["revision"] == "abc123" for name in real)
    assert hf.revision == "abc123" and hf.spec.family.label == "OLMoE"
    with pytest.raises(hf_load.HFModelError, match="--device-map 'everywhere': allowed: auto, balanced"):
        hf_load.load_hf_model(str(model_dir), device_map="everywhere")


def test_revision_and_device_map_only_with_hf(capsys, tmp_path):
    assert analyze_main([str(tmp_path / "run"), "--revision", "v1"]) == 2
    assert "apply to --hf models only" in capsys.readouterr().err


def test_large_check_dry_run(tmp_path):
    """benchmarks/hf_large_check.py --dry-run: a scaled-down OLMoE on CPU, routed and counted, reported."""
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "hf_large_check.py"), "--dry-run", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert report["dry_run"] and report["device"] == "cpu"
    assert report["config"]["num_experts"] < 64 and report["config"]["num_hidden_layers"] >= 2
    assert report["tokens"] > 0 and report["tokens_per_second"] > 0
    assert report["selection_agreement"] == 1.0
    assert (
        report["count"]["load_total"]
        == report["tokens"]
        * report["config"]["num_experts_per_tok"]
        * (report["config"]["num_hidden_layers"])
    )
    assert report["peak_memory_bytes"] > 0 and report["parameters"] > 0
