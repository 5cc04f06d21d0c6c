"""Bad input: every bad value or file stops before training with its key or file, the bad value
and what is allowed (exit code 2 on the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testbed.config import DomainSourceConfig, parse_config
from testbed.data.loading import load_documents
from testbed.data.tokenizer import load_tokenizer
from testbed.errors import ConfigError, DataError
from testbed.hf.cli import analyze_main
from testbed.train.cli import check_overrides, quote_values_with_equals
from tests.conftest import compose, synth_overrides

TRAIN = Path(sys.executable).with_name("testbed-train")


BA = ["router=balanced_assignment", "balance=none"]
GUO = ["aux_loss=[z_loss,variance]"]
BAD_CONFIGS = [
    # routers and their options
    (["router.name=no_such"], "router", "topk_softmax"),
    (["router.top_k=17"], "router.top_k", "from 1 to the number of experts"),
    (["router.top_k=0"], "router.top_k", "from 1 to the number of experts"),
    (["router=hash", "router.top_k=17"], "router.top_k", "from 1 to the number of experts"),
    (["+router.temperature=2"], "router.temperature", "options of router 'topk_softmax'"),
    (["router.renormalize=nope"], "router.renormalize", "a boolean (true or false)"),
    (["router.jitter=abc"], "router.jitter", "a number"),
    (["router=sigmoid", "router.scale=0"], "router.scale", "a float > 0"),
    (["router=sinkhorn", "router.iterations=abc"], "router.iterations", "an integer"),
    (["router=sinkhorn", "router.scope=galaxy"], "router.scope", "global"),
    (["router=hash", "balance=none", "router.seed=abc"], "router.seed", "an integer"),
    (["router=expert_choice", "router.scope=global"], "router.scope", "['sequence', 'micro_batch']"),
    (["router=expert_choice", "router.capacity_factor=0"], "router.capacity_factor", "a float > 0"),
    (["router=expert_choice", "router.capacity_factor=-1.5"], "router.capacity_factor", "a float > 0"),
    ([*BA, "router.scope=global"], "router.scope", "cannot span accumulated micro-batches"),
    ([*BA, "router.eps=0"], "router.eps", "a number > 0"),
    ([*BA, "router.eps_factor=1"], "router.eps_factor", "a number > 1"),
    ([*BA, "router.max_rounds=0"], "router.max_rounds", "an integer >= 1"),
    ([*BA, "router.top_k=17"], "router.top_k", "an integer from 1"),
    # capacity
    (["model.moe.capacity_factor=0"], "model.moe.capacity_factor", "null (dropless) or a float > 0"),
    (["model.moe.capacity_factor=-1.5"], "model.moe.capacity_factor", "null (dropless) or a float > 0"),
    (["router=expert_choice", "model.moe.capacity_factor=1.0"], "model.moe.capacity_factor", "null with"),
    # balancing methods and auxiliary losses
    (["balance.name=no_such"], "balance", "load_balance"),
    (["balance.scope=galaxy"], "balance.scope", "micro_batch"),
    (["balance.scope=rank"], "balance.scope", "global"),
    (["balance=expert_bias", "router=sinkhorn"], "balance", "support ['sigmoid', 'topk_softmax']"),
    (["balance=expert_bias", "router=expert_choice"], "balance", "use balance=load_balance or balance=none"),
    (["balance=expert_bias", "balance.scope=everywhere"], "balance.scope", "micro_batch"),
    (["balance=expert_bias", "balance.gamma=0"], "balance.gamma", "a float > 0"),
    (["router=sigmoid", "balance=expert_bias", "balance.gamma=abc"], "balance.gamma", "a number"),
    (["+aux_loss.no_such.coefficient=1"], "aux_loss.no_such", "z_loss"),
    (["aux_loss.z_loss.coefficient=abc"], "aux_loss.z_loss.coefficient", "a number"),
    ([*GUO, "aux_loss.variance.coefficient=-1"], "aux_loss.variance.coefficient", 'a float >= 0, or "auto"'),
    ([*GUO, "aux_loss.variance.target=0"], "aux_loss.variance.target", "a float > 0 (coefficient: auto)"),
    ([*GUO, "aux_loss.z_loss.coefficient=auto"], "aux_loss.z_loss.coefficient", "a number"),
    # model
    (["model.d_model=130"], "model.d_model", "multiple of model.n_heads"),
    (["model.n_heads=0"], "model.n_heads", "positive integer"),
    (["+model.foo=1"], "model.foo", "the fields of ModelConfig"),
    # data
    (["data.seq_len=4096"], "data.seq_len", "model.max_seq_len"),
    (["data.weights=[1,2]"], "data.weights", "one per data.domains"),
    (["data.val_tokens_per_domain=-1"], "data.val_tokens_per_domain", "an integer >= 0"),
    (["data.split_seed=-1"], "data.split_seed", "an integer from 0"),
    (["data.num_workers=-1"], "data.num_workers", "an integer >= 0"),
    (["data.test_fraction=0.95"], "data.test_fraction", "a fraction in [0, 1 - data.val_fraction"),
    (["data.group_field=''"], "data.group_field", "null or the name of a field of the documents"),
    # trainer
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches", "a fraction in (0, 1]"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "a number >= 0.0"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps", "a positive integer"),
    (["trainer.precision=fp7"], "trainer.precision", "'bf16-mixed'"),
    (["trainer.devices=0"], "trainer.devices", "a count >= 1, -1 (all devices)"),
    (["trainer.num_nodes=0"], "trainer.num_nodes", "a positive integer"),
    (["trainer.strategy=nonsense"], "trainer.strategy", "'ddp_find_unused_parameters_true'"),
    (["trainer.strategy=fsdp"], "trainer.strategy", "fsdp2 for sharded training"),
    # optimizer, router knobs included
    (["optim.min_lr_ratio=-1"], "optim.min_lr_ratio", "a number in [0.0, 1.0]"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay", "a number >= 0.0"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps", "an integer >= 0"),
    (["optim.beta1=1.5"], "optim.beta1", "a number in [0.0, 1.0)"),
    (["trainer.max_steps=12", "optim.router_freeze_step=13"], "optim.router_freeze_step",
     "[0, trainer.max_steps = 12]"),
    (["optim.router_init_scale=-1"], "optim.router_init_scale", "a float >= 0"),
    # metrics and post-training
    (["metrics.train_counts_window=-1"], "metrics.train_every_n_steps/stiffness_batches/train_counts_window",
     "integers >= 0"),
    ([*GUO, "finetune.experts=[1,99]", "finetune.trainable=routers_and_experts"], "finetune.experts.layer0",
     "a list of expert ids in [0, 16)"),
    ([*GUO, "finetune.experts=[1]"], "finetune.experts", "null unless finetune.trainable"),
    # NaN passes every < and > check and an infinite rate diverges later: both are refused up front
    (["optim.lr=nan"], "optim.lr", "a finite number"),
    (["optim.lr=inf"], "optim.lr", "a finite number"),
    (["optim.lr=-inf"], "optim.lr", "a finite number"),
    (["optim.beta1=nan"], "optim.beta1", "a finite number"),
    (["optim.min_lr_ratio=nan"], "optim.min_lr_ratio", "a finite number"),
    (["optim.weight_decay=nan"], "optim.weight_decay", "a finite number"),
    (["trainer.gradient_clip_val=nan"], "trainer.gradient_clip_val", "a finite number"),
    (["model.moe.capacity_factor=nan"], "model.moe.capacity_factor", "a finite number"),
    (["balance.coefficient=nan"], "balance.coefficient", "a finite number"),
]  # fmt: skip
"""Every bad value or combination refused before training: the overrides, the key the error names and part
of what it says is allowed."""


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"), BAD_CONFIGS, ids=[" ".join(o) for o, _, _ in BAD_CONFIGS]
)
def test_bad_value_names_key_value_and_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_config(compose(overrides))
    assert info.value.key == key
    assert allowed in info.value.allowed
    assert str(info.value) == f"config key '{key}': got {info.value.value!r}; allowed: {info.value.allowed}"
    last_key, _, bad = overrides[-1].lstrip("+").partition("=")
    if last_key == key and not bad.startswith("["):  # the bad value itself, not "got None"
        assert bad.strip("'") in str(info.value.value)


def test_fsdp2_refuses_what_sharding_would_silently_break():
    """trainer.strategy=fsdp2 is accepted; with post-training gradient masks (finetune.experts: sharding
    replaces the masked weights) or with compile (untested) it is refused before training."""
    assert parse_config(compose(["trainer.strategy=fsdp2"])).trainer.strategy == "fsdp2"
    with pytest.raises(ConfigError) as info:
        parse_config(compose(["trainer.strategy=fsdp2", "trainer.compile=true"]))
    assert info.value.key == "trainer.compile" and "false with trainer.strategy=fsdp2" in info.value.allowed
    with pytest.raises(
        ConfigError, match="trainer.precision"
    ):  # Lightning's ModelParallelStrategy has no fp16 AMP
        parse_config(compose(["trainer.strategy=fsdp2", "trainer.precision=16-mixed"]))
    masked = ["finetune.trainable=routers_and_experts", "finetune.experts=[1,2]"]
    with pytest.raises(ConfigError) as info:
        parse_config(compose(["trainer.strategy=fsdp2", *masked]))
    assert info.value.key == "finetune.experts" and "gradient masks" in info.value.allowed
    assert parse_config(compose(["trainer.strategy=ddp", *masked])).finetune.experts == [1, 2]


def test_init_from_directory_says_it_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config(compose([f"init_from={tmp_path}"]))
    assert info.value.key == "init_from"
    assert "not a directory" in info.value.allowed and "checkpoints/last.ckpt" in info.value.allowed


def test_limit_val_batches_above_one_is_a_batch_count():
    assert parse_config(compose(["trainer.limit_val_batches=3"])).trainer.limit_val_batches == 3
    assert parse_config(compose(["trainer.limit_val_batches=0.5"])).trainer.limit_val_batches == 0.5


def test_gpu_config_on_a_machine_without_gpu():
    from testbed.config import check_hardware

    run = parse_config(compose(["trainer=gpu"]))  # valid as a config (testbed-analyze reads GPU runs)
    if torch.cuda.is_available():
        check_hardware(run)
        return
    with pytest.raises(ConfigError) as info:
        check_hardware(run)
    assert info.value.key == "trainer.accelerator" and "no CUDA GPU" in info.value.allowed


@pytest.mark.parametrize(
    "argv,key,allowed",
    [
        (["foo=1"], "foo", "top-level keys: ['aux_loss'"),
        (["model.foo=1"], "model.foo", "model keys: ['d_model'"),
        (["seed=[1,2"], "seed", "Hydra's override syntax"),
        (["-m", "seed=0,1", "optim.nope=1,2"], "optim.nope", "optim keys: ["),
        (["data.batch_composition=both"], "data.batch_composition", "one of ['mixed', 'homogeneous']"),
        (["-m", "seed=0,1", "model.moe.backend=fast"], "model.moe.backend", "['loop', 'grouped']"),
        (["seed=abc"], "seed", "an integer"),
        (["trainer.deterministic=nope"], "trainer.deterministic", "a boolean (true or false)"),
    ],
)
def test_unknown_key_or_malformed_override(argv, key, allowed):
    with pytest.raises(ConfigError) as info:
        check_overrides(argv)
    assert info.value.key == key and allowed in info.value.allowed
    check_overrides(["-m", "seed=0,1", "router=topk_softmax", "aux_loss=[z_loss],[]"])  # good ones pass


def test_paths_with_equals_are_quoted_for_hydra():
    argv = ["init_from=/runs/lr=1e-3/last.ckpt", "seed=1", "-m", "data.root='/a=b'"]
    assert quote_values_with_equals(argv) == [
        "init_from='/runs/lr=1e-3/last.ckpt'",
        "seed=1",
        "-m",
        "data.root='/a=b'",
    ]
    check_overrides(quote_values_with_equals(argv))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "value,shown",
    [("5", "= 5 (int)"), ("null", "= null (null)"), ('["a", "b"]', '= ["a", "b"] (list)')],
)
def test_data_row_whose_text_is_not_a_string(tmp_path, value, shown):
    path = _write(tmp_path / "d.jsonl", ['{"text": "one doc"}', f'{{"text": {value}}}', '{"text": "two"}'])
    with pytest.raises(DataError) as info:
        load_documents("a", DomainSourceConfig(path=str(path)), None)
    assert str(info.value) == (
        f"data file {path}: row 2 has 'text' {shown}; allowed: a string (fix or remove the row)"
    )


def test_malformed_json_row_is_named(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"text": "a"}', '{"text": "b"', '{"text": "c"}'])
    with pytest.raises(DataError, match=r"d.jsonl: row 2 \(line 2\) is not valid JSON"):
        load_documents("a", DomainSourceConfig(path=str(path)), None)


def test_folder_of_csv_files_is_refused(tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    for name in ("x.csv", "y.csv"):
        (folder / name).write_text("a,b\n1,2\n")
    with pytest.raises(DataError) as info:
        load_documents("a", DomainSourceConfig(path=str(folder)), None)
    message = str(info.value)
    assert "file x.csv is not a text file" in message and "['.txt', '.text']" in message
    assert "'.jsonl', '.parquet'" in message


def test_single_text_file_is_explained(tmp_path):
    path = _write(tmp_path / "one.txt", ["a single document", "of two lines"])
    with pytest.raises(DataError, match="single text file, read as one document.*directory of .txt files"):
        load_documents("a", DomainSourceConfig(path=str(path)), None)


def test_missing_tokenizer_does_not_suggest_the_shipped_mix(tmp_path):
    with pytest.raises(DataError) as info:
        load_tokenizer(tmp_path / "mine" / "tokenizer.json")
    message = str(info.value)
    assert "--out data/mix" not in message and "--out <your data folder>" in message
    assert str(tmp_path / "mine" / "tokenizer.json") in message


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"PK\x03\x04truncated zip"])
def test_analyze_unreadable_checkpoint_exits_2(tmp_path, capsys, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    assert analyze_main([str(path)]) == 2
    assert f"error: {path} is not a readable torch checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["data.root", "=3", "model.d_model=[1"])
def test_analyze_malformed_override_exits_2(tmp_path, capsys, override):
    path = tmp_path / "run.ckpt"
    torch.save({"hyper_parameters": {"run": json.loads(json.dumps({"seed": 0}))}}, path)
    assert analyze_main([str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key") and override in err


def test_dense_layers_covering_every_layer_trains(synth_mix, tmp_path):
    """model.dense_layers = n_layers (a dense model in MoE clothing): no routing metrics, no plot crash."""
    from testbed.train.cli import run_training

    cfg = compose(
        synth_overrides(
            synth_mix,
            "model.dense_layers=2",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.num_threads=1",
        )
    )
    summary = run_training(cfg, tmp_path / "run", quiet=True)
    assert summary["steps"] == 2 and summary["val/loss"] > 0
    assert not any(key.startswith("spec/") for key in summary)


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(TRAIN), *args, "trainer.num_threads=1", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["foo=1"], "error: config key 'foo': got '1'; allowed: an existing key"),
        (
            ["router.renormalize=nope"],
            "error: config key 'router.renormalize': got 'nope'; allowed: a boolean",
        ),
        (
            ["data.batch_composition=both"],
            "error: config key 'data.batch_composition': got 'both'; allowed: one of ['mixed', 'homog",
        ),
    ],
)
def test_cli_exit_code_2(tmp_path, args, expected):
    done = _cli(*args, tmp_path=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("steps", ["1000000000000", "100000000000000000000", "100000001"])
def test_absurd_step_counts_are_refused(steps):
    with pytest.raises(ConfigError, match="at most 100,000,000 optimizer steps") as info:
        parse_config(compose([f"trainer.max_steps={steps}"]))
    assert info.value.key == "trainer.max_steps"
    parse_config(compose(["trainer.max_steps=100000000"]))  # the bound itself is allowed


def test_experiment_seeds_and_report_curves_are_checked(tmp_path, capsys):
    from testbed.analysis.report import main as report_main
    from testbed.experiment import main as experiment_main

    assert experiment_main(["x2", "--seeds", "abc", "--dry-run"]) == 2
    assert "--seeds 'abc': allowed are comma-separated integers" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"val/loss": 1.0, "status": "finished", "steps": 2}))
    (run / "metrics.csv").write_text("step,train/loss\n0,2.0\n1,1.5\n")
    assert (
        report_main([str(run), "--plots", "--curves", "nosuch/metric", "--out", str(tmp_path / "r.md")]) == 2
    )
    assert "--curves nosuch/metric: no run's metrics.csv has this column" in capsys.readouterr().err
    assert (
        report_main([str(run), "--plots", "--curves", "train/aux/z_loss", "--out", str(tmp_path / "r.md")])
        == 0
    )
    assert "warning: --curves train/aux/z_loss: no run logged it" in capsys.readouterr().err


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    from testbed.train.cli import check_output_dirs

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file") as info:
        check_output_dirs([f"hydra.run.dir={blocker}"])
    assert info.value.key == "hydra.run.dir"
    with pytest.raises(ConfigError, match=r"is under a file \("):
        check_output_dirs([f"hydra.sweep.dir={blocker / 'sub' / 'dir'}"])
    check_output_dirs([f"hydra.run.dir={tmp_path / 'new' / 'run'}", "seed=1"])  # can be made: fine
    assert not (tmp_path / "new").exists()  # and nothing is made by the check


def test_unwritable_cache_dir_is_named_not_taken_for_a_parse_error(synth_mix, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"data.cache_dir .*cannot write there") as info:
        load_documents("alpha", None, str(synth_mix), cache_dir=str(blocker / "cache"))
    assert "cannot parse" not in str(info.value)
    assert len(load_documents("alpha", None, str(synth_mix), cache_dir=str(tmp_path / "cache"))) == 24


def test_a_one_token_tokenizer_is_named_as_such(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"<|endoftext|>": 0}, unk_token="<|endoftext|>")).save(str(path))
    with pytest.raises(DataError, match=r"has 1 token\(s\): it cannot encode text") as info:
        load_tokenizer(path)
    assert "too little text" not in str(info.value)
