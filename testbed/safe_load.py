"""Loading a file a user passes in (checkpoints, count tables): tensors and plain containers only.

`torch.load(weights_only=True)` unpickles tensors, numbers, strings, lists, tuples, dicts and None, and
refuses any other Python object, so a crafted file cannot run code while it loads. The project's own
checkpoints (Lightning's `.ckpt` of testbed-train, the routing count tables) hold nothing else: run
configs are stored as plain dicts, RNG states as tensors and ints. A refused file stops the command with
a clear error (exit 2) before anything else happens. To load a file you trust that holds other objects
(a checkpoint written by other code), set TESTBED_TRUST_CHECKPOINTS=1: then it is unpickled in full,
which runs whatever code the file names.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from testbed.errors import CheckpointError

TRUST_ENV = "TESTBED_TRUST_CHECKPOINTS"


def trusted() -> bool:
    """Whether the user opted in to full unpickling (TESTBED_TRUST_CHECKPOINTS=1)."""
    value = os.environ.get(TRUST_ENV, "0").strip().lower()
    if value not in ("0", "1", "", "false", "true"):
        raise CheckpointError(
            f"{TRUST_ENV}={value!r}: allowed are 1 (trust every file loaded) or 0 (default)"
        )
    return value in ("1", "true")


def load_file(path: str | Path, what: str, mmap: bool = False):
    """torch.load of a user-given file with weights_only=True (unless trusted); a refused, unreadable or
    missing file raises CheckpointError naming the file, why, and what to do."""
    path = Path(path)
    what = f"{what}: " if what else ""
    if not path.is_file():
        raise CheckpointError(f"{what}{path} does not exist or is not a file")
    full = trusted()
    try:
        return torch.load(path, map_location="cpu", weights_only=not full, mmap=mmap)
    except pickle.UnpicklingError as err:
        # refused: the restricted unpickler met an object (a GLOBAL) off its allow-list; any other
        # unpickling error is a damaged or foreign file
        if full or "global" not in str(err).lower():
            raise CheckpointError(f"{what}{path} is not a readable torch checkpoint ({err})") from err
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(
            f"{what}{path} was refused: it holds Python objects beyond tensors and plain containers, and "
            f"loading them could run code ({first[:300]}). Files written by testbed-train never do. If you "
            f"trust this file, set {TRUST_ENV}=1 to load it in full"
        ) from err
    except Exception as err:  # garbage, truncated or empty files raise zip, EOF or runtime errors
        raise CheckpointError(
            f"{what}{path} is not a readable torch checkpoint ({type(err).__name__}: {err})"
        ) from err
