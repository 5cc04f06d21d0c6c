"""Bad input stops before training with one clear message: the key or file, the value, what is allowed."""

import gzip
import json

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from testbed.config import parse_config, plain
from testbed.data.datamodule import DomainMixDataModule
from testbed.errors import ConfigError, DataError
from tests.conftest import compose, synth_overrides


def test_default_config_is_valid():
    run = parse_config(compose())
    assert run.router.name == "topk_softmax" and run.router.top_k == 2
    assert run.balance.name == "load_balance" and run.balance.scope == "micro_batch"
    assert list(run.aux_loss) == ["z_loss"] and run.aux_loss["z_loss"].coefficient == 1e-3
    assert run.model.moe.num_experts == 16 and len(run.data.domains) == 8


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("model.moe.backend=magic", "model.moe.backend", "expected one of [loop, grouped]"),
        ("data.batch_composition=both", "data.batch_composition", "expected one of [mixed, homogeneous]"),
        ("model.n_layers=two", "model.n_layers", "could not be converted to Integer"),
        ("trainer.progress_every_s=often", "trainer.progress_every_s", "could not be converted to Float"),
        ("trainer.accelerator=tpu", "trainer.accelerator", "expected one of [auto, cpu, cuda, gpu, mps]"),
        ("metrics.stiffness_perturbation=blur", "metrics.stiffness_perturbation", "[context, noise]"),
        ("finetune.trainable=gates", "finetune.trainable", "[all, routers, routers_and_experts]"),
        ("seed=abc", "seed", "could not be converted to Integer"),
        ("trainer.deterministic=nope", "trainer.deterministic", "is not a valid bool"),
    ],
)
def test_typed_schema_rejects_bad_values_at_composition(override, key, allowed):
    """conf/config.yaml composes onto `run_schema` (RunConfig in Hydra's ConfigStore): a value of the wrong
    type or outside an Enum field's options fails in Hydra, before any code of ours runs."""
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    message = f"{info.value}\n{info.value.__cause__}"
    assert override in message and f"full_key: {key}" in message and allowed in message


@pytest.mark.parametrize(
    "section,key,value,allowed",
    [
        ("data", "batch_composition", "both", "one of ['mixed', 'homogeneous']"),
        ("model", "n_layers", "two", "an integer"),
        ("logger", "name", "mlflow", "one of ['csv', 'tensorboard', 'wandb']"),
    ],
)
def test_the_same_checks_hold_for_a_config_that_skips_hydra(section, key, value, allowed):
    """parse_config types a plain dict (a checkpoint's config, a test's) through the same dataclasses."""
    raw = OmegaConf.to_container(compose(), resolve=True, enum_to_str=True)
    raw[section][key] = value
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.key == f"{section}.{key}" and info.value.value == value
    assert allowed in info.value.allowed


def test_enum_fields_read_as_their_strings():
    run = parse_config(compose(["data.batch_composition=homogeneous", "balance.scope=global"]))
    assert run.data.batch_composition == "homogeneous" and f"{run.data.batch_composition}" == "homogeneous"
    assert run.balance.scope == "global" and json.dumps(run.balance.scope) == '"global"'
    assert plain(run.balance) == {"name": "load_balance", "coefficient": 1e-2, "scope": "global"}
    assert type(plain(run.data)["batch_composition"]) is str


def test_unknown_group_option_is_rejected_by_hydra_with_the_choices():
    with pytest.raises(ConfigCompositionException, match="topk_softmax"):
        compose(["router=no_such_router"])
    with pytest.raises(ConfigCompositionException, match="no_such_loss"):
        compose(["aux_loss=[no_such_loss]"])


@pytest.mark.parametrize(
    "argv,bad",
    [
        (["aux_loss=[z_loss,no_such_loss]"], "no_such_loss"),
        (["router=topk_softmax,nope"], "nope"),
        (["+balance=wat"], "wat"),
    ],
)
def test_cli_precheck_names_allowed_group_options(argv, bad):
    from testbed.train.cli import check_group_choices

    with pytest.raises(ConfigError) as info:
        check_group_choices(argv)
    assert bad in str(info.value) and "one of [" in str(info.value)
    check_group_choices(["aux_loss=[z_loss]", "router=topk_softmax", "router.top_k=1", "aux_loss=[]"])


def test_unknown_top_level_key():
    cfg = compose()
    OmegaConf.set_struct(cfg, False)
    cfg.learning_rate = 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(cfg)


def setup_data(root, *extra):
    run = parse_config(compose(synth_overrides(root, *extra)))
    DomainMixDataModule(run.data).setup()


def test_unknown_domain_names_available_ones(synth_mix):
    with pytest.raises(DataError) as info:
        setup_data(synth_mix, "data.domains=[alpha,klingon]")
    message = str(info.value)
    assert "klingon" in message and "alpha" in message and "beta" in message


def test_missing_file(synth_mix, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        setup_data(synth_mix, f"+data.sources.alpha.path={tmp_path / 'nothing.jsonl'}")


def test_empty_file(synth_mix, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        setup_data(synth_mix, f"+data.sources.alpha.path={empty}")


def test_non_utf8_file(synth_mix, tmp_path):
    bad = tmp_path / "latin1.jsonl.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(json.dumps({"text": "caf"}).encode()[:-2] + b'\xe9"}\n' + b'{"text": "two"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl.gz is not valid UTF-8 \(byte \d+"):
        setup_data(synth_mix, f"+data.sources.alpha.path={bad}")


def test_missing_text_field(synth_mix, tmp_path):
    path = tmp_path / "body.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(4)))
    with pytest.raises(DataError, match=r"no field 'text'.*\['body'\]"):
        setup_data(synth_mix, f"+data.sources.alpha.path={path}")


def test_too_little_text_for_seq_len(synth_mix, tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(4)))
    with pytest.raises(DataError, match="too little text"):
        setup_data(synth_mix, f"+data.sources.alpha.path={path}")


def test_missing_tokenizer(synth_mix, tmp_path):
    with pytest.raises(DataError, match="tokenizer file"):
        setup_data(synth_mix, f"data.tokenizer={tmp_path / 'none.json'}")
