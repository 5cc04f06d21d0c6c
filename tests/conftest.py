"""Shared fixtures: a small synthetic domain mix with its tokenizer, and Hydra config composition."""

from __future__ import annotations

import gzip
import json
import os
import random
import tempfile

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# token stores of the runs under test go to a fresh folder per test process, never the user's cache
os.environ["TESTBED_CACHE"] = tempfile.mkdtemp(prefix="testbed-cache-")

# the run schema Hydra composes onto (registered on import; testbed.train.cli imports it only when needed)
import testbed.config  # noqa: E402, F401

SYNTH_DOMAINS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="session")
def synth_mix(tmp_path_factory):
    return make_synth_mix(tmp_path_factory.mktemp("synth_mix"))


def make_synth_mix(root):
    """Three domains with disjoint alphabets (trivially distinguishable), 24 documents each; BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    alphabets = {"alpha": "abcdef", "beta": "ghijkl", "gamma": "mnopqr"}
    texts = []
    for domain, letters in alphabets.items():
        vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(60)]
        with gzip.open(root / f"{domain}.jsonl.gz", "wt", encoding="utf-8") as fh:
            for _ in range(24):
                text = " ".join(rng.choice(vocab) for _ in range(300))
                texts.append(text)
                fh.write(json.dumps({"text": text, "domain": domain}) + "\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


SMALL_MODEL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.moe.num_experts=6",
    "model.moe.expert_hidden=32",
    "model.vocab_size=512",
]


def synth_overrides(root, *extra: str) -> list[str]:
    return [
        "data=shipped",  # the shipped mix's split settings (no test split, no dedup); the synthetic files
        f"data.root={root}",
        f"data.tokenizer={root / 'tokenizer.json'}",
        f"data.domains=[{','.join(SYNTH_DOMAINS)}]",
        "data.seq_len=32",
        "data.batch_size=8",
        "data.val_tokens_per_domain=512",
        *SMALL_MODEL,
        "trainer.progress_bar=false",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        *extra,
    ]


def compose(overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from testbed.train.cli import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [])


def layer_step(layer, x, context, losses=(), stats=None, observe=False):
    """One MoE layer and what training does around it (the layer itself is pure): every loss on its
    record with the layer's own context, stateful losses observing it when `observe`, and the routing
    counters when `stats` is given. Returns (y, record, {loss name: unweighted value})."""
    from testbed.losses import layer_loss_terms

    y, record = layer(x, context)
    layer_context = layer.layer_context(context)
    if observe:
        for loss in losses:
            if loss.stateful:
                loss.observe(layer.moe_index, record.routing, layer_context)
    terms = layer_loss_terms(list(losses), record.routing, layer_context, record.expert_outputs)
    if stats is not None:
        shape = (context.batch_size, context.seq_len)
        stats.update(layer.moe_index, record.routing, context.domain_ids, record.expert_outputs, shape)
    return y, record, terms
