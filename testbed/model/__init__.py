"""The decoder LM, the MoE layer and the expert backends.

Importing this package does not import torch (testbed.config reads the model's section,
testbed/model/schema.py, without it): the names below are imported from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.model.experts import BACKENDS, DenseSwiGLU, ExpertBank, combine
    from testbed.model.moe import LayerRecord, MoELayer
    from testbed.model.transformer import MoETransformer

_LAZY = {
    "BACKENDS": "experts",
    "DenseSwiGLU": "experts",
    "ExpertBank": "experts",
    "combine": "experts",
    "LayerRecord": "moe",
    "MoELayer": "moe",
    "MoETransformer": "transformer",
}


def __getattr__(name: str):
    """The names of the model's modules, imported (with torch) on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = ["BACKENDS", "DenseSwiGLU", "ExpertBank", "LayerRecord", "MoELayer", "MoETransformer", "combine"]
