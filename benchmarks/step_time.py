"""Training-step time of config variants against a baseline, measured in one run (a benchmark, not a test).

Each variant is a set of Hydra overrides; steps of all variants are interleaved so machine noise hits them
alike, and the median step time of each is reported with its ratio to the first (the baseline). Example,
the cost of the Guo et al. losses on the tiny CPU config:
    python benchmarks/step_time.py --variant "aux_loss=[]" --variant "aux_loss=[orthogonality]" \\
        --variant "aux_loss=[variance]" --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from testbed.config import parse_config
    from testbed.data.datamodule import DomainMixDataModule
    from testbed.train.cli import CONF_DIR
    from testbed.train.module import MoELanguageModel

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        run = parse_config(compose("config", overrides=overrides))
    torch.manual_seed(0)
    data = DomainMixDataModule(run.data, seed=0)
    data.setup()
    module = MoELanguageModel(run, data.domains)
    module.log = lambda *a, **k: None
    return module, torch.optim.AdamW(module.parameters(), lr=1e-3), iter(data.train_dataloader())


def timed_step(module, optimizer, batches, index: int) -> float:
    batch = next(batches)
    start = time.perf_counter()
    loss = module.training_step(batch, index)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="space-separated overrides")
    parser.add_argument("--common", default="", help="overrides applied to every variant")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    common = args.common.split()
    variants = [(v, build(common + v.split())) for v in args.variant]
    for i in range(args.warmup):
        for _, (module, optimizer, batches) in variants:
            timed_step(module, optimizer, batches, i)
    times = {name: [] for name, _ in variants}
    for i in range(args.steps):
        for name, (module, optimizer, batches) in variants:
            times[name].append(timed_step(module, optimizer, batches, i))
    baseline = statistics.median(times[variants[0][0]])
    rows = [
        {
            "variant": name,
            "step_ms": round(1000 * statistics.median(t), 1),
            "ratio_to_baseline": round(statistics.median(t) / baseline, 4),
        }
        for name, t in times.items()
    ]
    emit(
        {"common": args.common, "threads": torch.get_num_threads(), "steps": args.steps, "rows": rows},
        args.json,
    )


def emit(result: dict, path: str | None) -> None:
    """Print the result as JSON and, if asked, write it to `path`."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
