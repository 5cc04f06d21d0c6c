"""`trainer.val_check_interval` counts optimizer steps, also with gradient accumulation (Lightning's
own argument counts micro-batches: X2's and X7's curves showed four times the validations asked
for)."""

import csv

from testbed.train.cli import run_training
from tests.conftest import compose, synth_overrides


def test_validation_every_n_optimizer_steps_with_accumulation(synth_mix, tmp_path):
    cfg = compose(
        synth_overrides(
            synth_mix,
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.accumulate_grad_batches=2",
            "metrics.plots=false",
        )
    )
    summary = run_training(cfg, tmp_path, quiet=True)
    assert summary["steps"] == 6
    with open(tmp_path / "metrics.csv") as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("val/loss")})
    assert steps == [2, 5]  # Lightning logs a validation at the last finished step's index (3 - 1, 6 - 1)
