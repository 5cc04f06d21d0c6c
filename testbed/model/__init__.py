"""The decoder LM, the MoE layer and the expert backends.

Importing this package does not import torch (testbed.config reads the model's section,
testbed/model/schema.py, without it): the names below are imported from their modules on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from testbed.lazy import lazy_attributes

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

__getattr__ = lazy_attributes(__name__, _LAZY)  # the names of the model's modules, with torch, on first use


__all__ = ["BACKENDS", "DenseSwiGLU", "ExpertBank", "LayerRecord", "MoELayer", "MoETransformer", "combine"]
