"""Training-step time of the default CPU config at 1 thread and at torch's default (all cores), on an idle
machine and on a loaded one (a benchmark, not a test; it chose the documented `trainer.num_threads` advice).

Each measurement is a fresh process that builds the default model, sets its thread count, runs warm-up
steps and then timed steps, and prints its median step time. Three situations:
  idle    one training process alone;
  pair    two training processes at once (a sweep or `testbed-experiment --jobs 2` on 2 cores);
  shared  one training process next to a CPU-bound neighbour (one busy single-threaded process).
Configurations are interleaved over repeats so that drifts in machine load hit them alike.
    python benchmarks/threads.py --steps 30 --warmup 5 --repeats 3 --overrides "data.cache_dir=.cache/data" \
        --json benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SITUATIONS = ("idle", "pair", "shared")


def worker(threads: int, steps: int, warmup: int, overrides: list[str]) -> None:
    import torch
    from step_time import build, timed_step

    module, optimizer, batches = build(overrides)
    torch.set_num_threads(threads)
    for i in range(warmup):
        timed_step(module, optimizer, batches, i)
    times = [timed_step(module, optimizer, batches, warmup + i) for i in range(steps)]
    run = module.run_config
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "step_ms": 1000 * statistics.median(times),
                "tokens_per_step": run.data.batch_size * run.data.seq_len,
            }
        )
    )


def spin(stop_after: float) -> None:
    """A CPU-bound neighbour: one busy thread until killed (or `stop_after` seconds)."""
    end = time.time() + stop_after
    x = 0
    while time.time() < end:
        x += 1


def launch(threads: int, args) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--overrides", args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=root)


def measure(situation: str, threads: int, args) -> list[dict]:
    neighbour = None
    if situation == "shared":
        neighbour = subprocess.Popen([sys.executable, __file__, "--spin", "3600"])
    procs = [launch(threads, args) for _ in range(2 if situation == "pair" else 1)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({situation}, {threads} threads)")
        results.append(json.loads(out.strip().splitlines()[-1]))
    if neighbour is not None:
        neighbour.kill()
        neighbour.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts to compare")
    parser.add_argument("--overrides", default="", help="space-separated Hydra overrides for every run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spin", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin is not None:
        return spin(args.spin)
    if args.worker is not None:
        return worker(args.worker, args.steps, args.warmup, args.overrides.split())

    thread_counts = [int(t) for t in args.threads.split(",")]
    samples: dict[tuple[str, int], list[float]] = {}
    tokens = 0
    for repeat in range(args.repeats):
        order = thread_counts if repeat % 2 == 0 else thread_counts[::-1]
        for situation in SITUATIONS:
            for threads in order:
                results = measure(situation, threads, args)
                tokens = results[0]["tokens_per_step"]
                samples.setdefault((situation, threads), []).extend(r["step_ms"] for r in results)
                times = ", ".join(f"{r['step_ms']:.1f} ms" for r in results)
                print(f"{situation:6s} threads={threads}: {times}")
    rows = []
    for situation in SITUATIONS:
        base = statistics.median(samples[(situation, thread_counts[0])])
        for threads in thread_counts:
            step = statistics.median(samples[(situation, threads)])
            processes = 2 if situation == "pair" else 1
            rows.append(
                {
                    "situation": situation,
                    "threads": threads,
                    "step_ms": round(step, 1),
                    "ratio_to_1_thread": round(step / base, 3),
                    "tokens_per_s_total": round(processes * tokens / (step / 1000), 1),
                    "n": len(samples[(situation, threads)]),
                }
            )
    result = {"cpus": os.cpu_count(), "steps": args.steps, "overrides": args.overrides, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
