"""Load a pretrained Hugging Face MoE causal LM (a hub id or a local directory) with its tokenizer.

`transformers` is an optional extra (`pip install -e .[hf]`); every problem is an `HFModelError` naming what
is wrong and what is allowed (the CLIs print it and exit with code 2).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.errors import TestbedError
from testbed.hf.families import FAMILIES, RouterSpec, spec_for


class HFModelError(TestbedError):
    """A Hugging Face model that cannot be analysed here."""


def require_transformers():
    try:
        import transformers
    except ImportError as err:
        raise HFModelError(
            "--hf needs the optional dependency `transformers`, which is not installed; "
            "install it with `pip install -e .[hf]` (or `pip install 'transformers>=4.56'`)"
        ) from err
    return transformers


@dataclass
class HFModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    spec: RouterSpec
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 elsewhere (bf16 on these CPUs is ~30x slower)."""
    allowed = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise HFModelError(f"--dtype: got {dtype!r}; allowed: {sorted(allowed)}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return allowed[dtype]


def check_source(source: str) -> None:
    """A path-like source must be an existing directory with a config.json."""
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.exists() or source.count("/") > 1
    if not looks_local:
        return
    if not path.exists():
        raise HFModelError(
            f"--hf {source}: directory does not exist; pass a local model directory (with config.json) "
            "or a hub id such as allenai/OLMoE-1B-7B-0924"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise HFModelError(
            f"--hf {source}: not a model directory (no config.json in it); pass the folder written by "
            "save_pretrained / huggingface-cli download"
        )


def router_spec(config) -> RouterSpec:
    """The routing settings of a config, or an error naming the model type and the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        experts = any(
            getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")
        )
        what = "an MoE family whose router is not reconstructed here" if experts else "not an MoE model"
        raise HFModelError(f"model_type {model_type!r} is {what}; supported model types: {sorted(FAMILIES)}")
    return spec_for(config)


def has_safetensors(source: str) -> bool | None:
    """True for a local folder with .safetensors weights (then only those load), None otherwise (hub ids:
    transformers prefers safetensors itself, and a .bin loads with weights_only)."""
    folder = Path(source)
    if folder.is_dir():
        return any(folder.glob("*.safetensors")) or None
    return None


def load_hf_model(
    source: str, device: str = "cpu", dtype: str = "auto", tokenizer: str | None = None
) -> HFModel:
    """Config, weights and tokenizer of `source` in eval mode; the config is checked before weights load."""
    transformers = require_transformers()
    check_source(source)
    try:  # a model folder's own code never runs (trust_remote_code=False: no prompt on a terminal either)
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise HFModelError(f"--hf {source}: cannot read its config ({str(err).splitlines()[0]})") from err
    spec = router_spec(config)
    torch_device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:  # safetensors where the folder has them; a pickled .bin loads with weights_only (tensors only)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=False, use_safetensors=has_safetensors(source)
        )
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or source, trust_remote_code=False)
    except pickle.UnpicklingError as err:
        raise HFModelError(
            f"--hf {source}: its weights were refused: a pickled weights file (.bin) holds Python objects "
            f"beyond tensors, and loading them could run code ({str(err).splitlines()[0][:200]}). Use a "
            "copy with .safetensors weights, or convert the weights where you trust them"
        ) from err
    except (OSError, ValueError) as err:
        raise HFModelError(f"--hf {source}: cannot load it ({str(err).splitlines()[0]})") from err
    model.to(torch_device).eval()
    return HFModel(str(source), model, tok, spec, torch_device, torch_dtype)


def wrap_model(model, tokenizer, name: str = "in-memory model") -> HFModel:
    """An already loaded model (Python API, tests)."""
    require_transformers()
    parameter = next(model.parameters())
    return HFModel(
        name, model.eval(), tokenizer, router_spec(model.config), parameter.device, parameter.dtype
    )
