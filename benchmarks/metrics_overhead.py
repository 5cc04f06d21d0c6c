"""Cost of routing-statistics collection on training steps (a benchmark, not a test).

Times the training step (forward + backward + optimizer) of a model on the shipped mix with and without
the on-device routing counters attached, interleaving the two so that machine noise hits both alike, and
reports the overhead of a collected step and the amortized overhead at the configured interval
(metrics.train_every_n_steps). Usage:
    python benchmarks/metrics_overhead.py [--steps 60] [--every 50] [--json out.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--every", type=int, default=50, help="collection interval to amortize over")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.moe.num_experts=32")
    args = parser.parse_args()

    from step_time import build, emit  # benchmarks/ is the script's directory

    from testbed.metrics.per_layer import spec_metrics
    from testbed.train.callbacks import count_batch, new_stats

    module, optimizer, batches = build(args.overrides)

    def step(collect: bool, index: int) -> float:
        batch = {k: v.to(module.device) for k, v in next(batches).items()}
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = module.training_step(batch, index)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if collect:  # what the callback does with a measured step's records: count, then the metrics
            stats = new_stats(module)
            count_batch(stats, out["routing"], batch)  # no Trainer: step 0, a measured step
            spec_metrics(stats, module.moe_layer_names, prefix="train/spec")
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(args.warmup):
        step(i % 2 == 0, i)
    plain, collected = [], []
    for i in range(args.steps):
        plain.append(step(False, i))
        collected.append(step(True, i))
    base, with_stats = statistics.median(plain), statistics.median(collected)
    overhead = (with_stats - base) / base
    result = {
        "config": " ".join(args.overrides) or "default (model=tiny)",
        "threads": torch.get_num_threads(),
        "steps_per_variant": args.steps,
        "step_ms_without_stats": round(1000 * base, 1),
        "step_ms_with_stats": round(1000 * with_stats, 1),
        "overhead_collected_step": round(overhead, 4),
        "train_every_n_steps": args.every,
        "overhead_amortized": round(overhead / args.every, 5),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
