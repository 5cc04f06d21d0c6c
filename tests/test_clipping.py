"""Gradient clipping with a fused AdamW under bf16 mixed precision (the first GPU run's failure: Lightning's
mixed-precision plugin refuses to clip for a fused optimizer). Checked on CPU, where fused AdamW and
bf16-mixed autocast exist too: every optimizer step sees gradients whose total norm is at most the limit,
and the limit did bind (the norms before clipping were above it)."""

import lightning as L
import pytest
import torch

from testbed.config import ConfigError, parse_config
from testbed.train.cli import run_training
from tests.conftest import compose, synth_overrides

CLIP = 0.05


class GradNorms(L.Callback):
    """Total gradient norm before clipping (Lightning's hook) and as the optimizer step used it (the step
    leaves the gradients as they were)."""

    def __init__(self):
        self.before, self.at_step = [], []

    def on_train_start(self, trainer, pl_module):
        def post_hook(optimizer, args, kwargs):  # a pre-hook runs before Lightning's closure makes the grads
            self.at_step.append(_norm(optimizer))

        trainer.optimizers[0].register_step_post_hook(post_hook)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(_norm(optimizer))


def _norm(optimizer):
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_mixed_clips_with_and_without_fused_adamw(synth_mix, tmp_path, fused):
    norms = GradNorms()
    cfg = compose(
        synth_overrides(
            synth_mix,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.precision=bf16-mixed",
            f"trainer.fused_optimizer={str(fused).lower()}",
            f"trainer.gradient_clip_val={CLIP}",
            "metrics.plots=false",
        )
    )
    summary = run_training(cfg, tmp_path, quiet=True, callbacks=(norms,))
    assert summary["status"] == "finished" and summary["steps"] == 3
    assert len(norms.at_step) == 3
    assert min(norms.before) > 2 * CLIP  # the limit binds
    assert max(norms.at_step) == pytest.approx(CLIP, rel=1e-3)


def test_fp16_mixed_fused_and_clipping_is_refused(synth_mix):
    cfg = compose(
        synth_overrides(
            synth_mix,
            "trainer.precision=16-mixed",
            "trainer.fused_optimizer=true",
            "trainer.gradient_clip_val=1.0",
        )
    )
    with pytest.raises(ConfigError, match="trainer.fused_optimizer.*16-mixed"):
        parse_config(cfg)
