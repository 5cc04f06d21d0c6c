"""The decoder LM, the MoE layer and the expert backends."""

from testbed.model.experts import BACKENDS, DenseSwiGLU, ExpertBank, combine
from testbed.model.moe import LayerRecord, MoELayer
from testbed.model.transformer import MoETransformer

__all__ = ["BACKENDS", "DenseSwiGLU", "ExpertBank", "LayerRecord", "MoELayer", "MoETransformer", "combine"]
