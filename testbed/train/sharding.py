"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`): `trainer.strategy=fsdp2`
(testbed.config.FSDP2, validated there).

Lightning's `fsdp` strategy wraps the model in the first FSDP API and refuses any accelerator but CUDA.
`fsdp2` goes through Lightning's `ModelParallelStrategy` instead, with a one-dimensional data-parallel mesh
(every process holds one shard of every parameter, gradients are reduce-scattered), so the same code runs
on CPU processes (gloo: how the tests check it) and on GPUs (NCCL). Each transformer block is one FSDP unit
(its parameters are gathered for its forward and backward only), and the model root holds the embeddings,
final norm and output head. Checkpoints are gathered into one full `last.ckpt` with DDP's keys:
`testbed-analyze` and `init_from` read them anywhere, and `resume` continues them on the same number of
processes (as for any checkpoint: MoELanguageModel.check_same_layout).
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with data parallelism only: a mesh of all processes of all nodes, no tensor
    parallelism, full (not distributed) checkpoints."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        # known here: Lightning has set the parallel devices and the number of nodes
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_model(model: nn.Module, mesh) -> None:
    """fully_shard every transformer block, then the root (embeddings, final norm, output head), over the
    data-parallel `mesh`; in place, once."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    local = sum(p.to_local().numel() for p in params)
    if mesh.get_rank() == 0:  # one line per run, not one per process
        logger.info(
            "fsdp2: %d parameter tensors sharded over %d processes (%d blocks + root); rank 0 holds %d of "
            "%d values",
            len(params),
            mesh.size(),
            len(model.blocks),
            local,
            sum(p.numel() for p in params),
        )


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a DTensor outside its block's forward), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # DTensor, without importing it
