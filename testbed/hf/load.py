"""Load a pretrained Hugging Face MoE causal LM (a hub id or a local directory) with its tokenizer.

`transformers` is an optional extra (`pip install -e .[hf]`); every problem is an `HFModelError` naming what
is wrong and what is allowed (the CLIs print it and exit with code 2). Checked before any weight loads:
- the source: an existing directory with a config.json, or a hub id (`org/name`). A path-like source that
  does not exist (`./x`, `a/b/c`, or `models/x` where `models/` is a local folder) is reported as a missing
  directory, never sent to the hub; a hub id that is neither reachable (no network, or HF_HUB_OFFLINE=1) nor
  in the local cache is reported as such at once, without the hub client's retries;
- the tokenizer: a local folder must hold tokenizer files (or `--tokenizer` names them), and a loaded
  tokenizer with fewer than 16 tokens is refused (transformers builds an empty one from a bare config);
- the device: `cpu`, `cuda`, `cuda:<i>` (an existing GPU of a CUDA build of torch) or `mps` (when available);
  `--device-map auto|balanced|balanced_low_0|sequential` instead places the layers with accelerate;
- the weights: safetensors where the folder has them; a pickled `.bin` is scanned for Python objects beyond
  tensors (`torch.serialization.get_unsafe_globals_in_checkpoint`, which reads the pickle without running
  it) and refused if it names any; it then loads with weights_only=True (transformers' own setting).
Any other error of config, weights or tokenizer loading (corrupt files, shape mismatches, a missing optional
package) becomes an `HFModelError` with its type and first line, not a traceback.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from testbed.errors import TestbedError
from testbed.hf.families import FAMILIES, RouterSpec, spec_for

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)
MIN_VOCAB = 16
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    source: str | None = None  # the --hf argument (a local directory or a hub id)
    stored_dtype: torch.dtype | None = None  # the dtype the checkpoint's config declares
    revision: str | None = None
    device_map: str | None = None

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


def check_device(device: str) -> torch.device:
    """A device this torch can use: cpu, cuda, cuda:<i> (CUDA build, GPU present) or mps (when available)."""
    allowed = "allowed: cpu, cuda, cuda:<index>, mps"
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise HFModelError(f"--device {device!r} is not a device name; {allowed}") from err
    if torch_device.type == "cuda":
        if torch.version.cuda is None:
            raise HFModelError(
                f"--device {device}: this torch ({torch.__version__}) is a CPU-only build without CUDA; use "
                "--device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise HFModelError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
        if torch_device.index is not None and torch_device.index >= count:
            raise HFModelError(
                f"--device {device}: there are {count} GPU(s) (cuda:0 .. cuda:{count - 1}); pick one of them"
            )
    elif torch_device.type == "mps" and not torch.backends.mps.is_available():
        raise HFModelError(f"--device {device}: MPS is not available here; use --device cpu")
    elif torch_device.type not in ("cpu", "cuda", "mps"):
        raise HFModelError(f"--device {device}: {allowed}")
    return torch_device


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub's host resolves (a name lookup in a thread, so a hanging resolver costs `timeout`)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = re.sub(r"^\w+://", "", constants.ENDPOINT).split("/")[0].split(":")[0]
    result: list[bool] = []

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an invalid id or revision for the cache layout: not cached
        return False
    return isinstance(found, str)


def looks_like_path(source: str) -> bool:
    """A source that can only be meant as a local path (it is never sent to the hub)."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.endswith("/"):
        return True
    if source.count("/") > 1 or not HUB_ID.match(source):
        return True
    first = source.split("/")[0]
    return "/" in source and Path(first).is_dir()  # models/x with a local models/ folder


def check_source(source: str, revision: str | None = None) -> bool:
    """Check `source` before anything loads; True when it is to be read from the local hub cache only (a
    hub id that is cached while the hub is unreachable)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise HFModelError(
                f"--hf {source}: not a model directory (no config.json in it); pass the folder written by "
                "save_pretrained / huggingface-cli download"
            )
        if revision is not None:
            raise HFModelError(
                f"--revision {revision}: applies to hub ids only, and {source} is a local directory; drop "
                "--revision or pass a hub id"
            )
        return False
    if looks_like_path(source):
        raise HFModelError(
            f"--hf {source}: directory does not exist ({path.absolute()}); pass a local model directory "
            "(with config.json) or a hub id such as allenai/OLMoE-1B-7B-0924"
        )
    if _hub_reachable():
        return False
    if _in_hub_cache(source, revision):
        return True
    raise HFModelError(
        f"--hf {source}: there is no local directory of that name ({path.absolute()}), and as a hub id it "
        "cannot be fetched: the Hugging Face hub is not reachable from here (no network, or "
        "HF_HUB_OFFLINE=1) and the local hub cache does not hold it. Pass an existing model directory (with "
        "config.json), or a hub id on a machine with network access or a filled cache"
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


def check_pickled_weights(source: str) -> None:
    """A local folder without safetensors: every pickled .bin must name no Python object beyond what
    weights_only allows (the pickle is read as data, nothing in it runs)."""
    folder = Path(source)
    if not folder.is_dir() or has_safetensors(source):
        return
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(folder.glob("*.bin")):
        try:
            unsafe = get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip-format torch file: transformers' weights_only load judges it
            continue
        if unsafe:
            raise HFModelError(
                f"--hf {source}: its weights were refused: the pickled weights file {path.name} names "
                f"Python objects beyond tensors ({', '.join(unsafe[:5])}), and loading it could run code. "
                "Nothing was loaded. Use a copy with .safetensors weights, or convert the weights where you "
                "trust them"
            )


def check_tokenizer_files(source: str, tokenizer: str | None) -> None:
    """A local tokenizer folder (the model's own, or --tokenizer) must hold a vocabulary file."""
    folder = Path(tokenizer or source).expanduser()
    if not folder.is_dir():
        return
    if any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return
    what = f"--tokenizer {tokenizer}" if tokenizer else f"--hf {source}"
    raise HFModelError(
        f"{what}: the folder holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}, *.tiktoken); "
        "pass --tokenizer with the model's tokenizer (a folder or a hub id)"
    )


def _load_error(source: str, what: str, err: Exception) -> HFModelError:
    first = (str(err).splitlines() or [""])[0][:300]
    if isinstance(err, pickle.UnpicklingError):
        return HFModelError(
            f"--hf {source}: its weights were refused: a pickled weights file (.bin) holds Python objects "
            f"beyond tensors, and loading them could run code ({first[:200]}). Use a copy with "
            ".safetensors weights, or convert the weights where you trust them"
        )
    if isinstance(err, ImportError):
        return HFModelError(f"--hf {source}: loading its {what} needs a package that is missing ({first})")
    if isinstance(err, OSError | ValueError):
        return HFModelError(f"--hf {source}: cannot load its {what} ({first})")
    return HFModelError(f"--hf {source}: cannot load its {what} ({type(err).__name__}: {first})")


def check_device_map(device_map: str | None) -> None:
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise HFModelError(f"--device-map {device_map!r}: allowed: {', '.join(DEVICE_MAPS)}")
    if importlib.util.find_spec("accelerate") is None:
        raise HFModelError(
            f"--device-map {device_map} needs the package `accelerate`, which is not installed; install it "
            "(`pip install accelerate`) or use --device instead"
        )


def load_hf_model(
    source: str,
    device: str = "cpu",
    dtype: str = "auto",
    tokenizer: str | None = None,
    revision: str | None = None,
    device_map: str | None = None,
) -> HFModel:
    """Config, weights and tokenizer of `source` in eval mode; the config is checked before weights load.

    device_map: None (the whole model on `device`) or an accelerate placement (`DEVICE_MAPS`); dtype `auto`
    is then bf16 when a GPU is present. revision: a hub branch, tag or commit (hub ids only)."""
    transformers = require_transformers()
    check_device_map(device_map)
    torch_device = check_device(device) if device_map is None else None
    cache_only = check_source(source, revision)
    hub = {"revision": revision} if revision is not None else {}
    if cache_only:
        hub["local_files_only"] = True
    try:  # a model folder's own code never runs (trust_remote_code=False: no prompt on a terminal either)
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False, **hub)
    except Exception as err:
        raise _load_error(source, "config", err) from err
    spec = router_spec(config)
    check_pickled_weights(source)
    check_tokenizer_files(source, tokenizer)
    placed = torch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, placed)
    stored = getattr(config, "dtype", None)
    stored = stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or ""), None)
    placement = {"device_map": device_map} if device_map is not None else {}
    try:  # safetensors where the folder has them; a pickled .bin loads with weights_only (tensors only)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            trust_remote_code=False,
            use_safetensors=has_safetensors(source),
            **hub,
            **placement,
        )
    except Exception as err:
        raise _load_error(source, "weights", err) from err
    tokenizer_hub = hub if tokenizer is None else {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            tokenizer or source, trust_remote_code=False, **tokenizer_hub
        )
    except Exception as err:
        raise _load_error(tokenizer or source, "tokenizer", err) from err
    if len(tok) < MIN_VOCAB:
        raise HFModelError(
            f"the tokenizer of {tokenizer or source} has {len(tok)} tokens: it was built without a "
            "vocabulary file; pass --tokenizer with the model's tokenizer (a folder or a hub id)"
        )
    if device_map is None:
        model.to(torch_device)
        model_device = torch_device
    else:
        model_device = model.get_input_embeddings().weight.device
    model.eval()
    return HFModel(
        str(source),
        model,
        tok,
        spec,
        model_device,
        torch_dtype,
        source=str(source),
        stored_dtype=stored if isinstance(stored, torch.dtype) else None,
        revision=revision,
        device_map=device_map,
    )


def wrap_model(model, tokenizer, name: str = "in-memory model") -> HFModel:
    """An already loaded model (Python API, tests)."""
    require_transformers()
    parameter = next(model.parameters())
    return HFModel(
        name, model.eval(), tokenizer, router_spec(model.config), parameter.device, parameter.dtype
    )
