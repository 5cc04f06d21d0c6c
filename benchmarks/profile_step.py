"""Profile a few training steps (a benchmark, not a test): top kernels and time per category.

Builds the config like benchmarks/step_time.py (Hydra overrides; `trainer.compile=true` compiles the model),
runs warm-up steps, then profiles `--steps` steps with torch.profiler. Reported, in at most ~1 MB of JSON:
- time per category of device kernels (CPU ops on a CPU run): gemm, grouped_gemm, attention, sort_index
  (sort, gather, scatter, index), optimizer, norm_activation, copy_cast, elementwise, other; and on CUDA
  `idle`, the step's wall time not covered by any kernel;
- the top kernels by total self time (names cut to 160 characters), with calls and share;
- step wall time (median) and tokens/s.
    python benchmarks/profile_step.py --common "model=small trainer=gpu ..." [--steps 4] [--warmup 6]
        [--top 25] [--json out]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step_time import build, emit, timed_step  # benchmarks/ is the script's directory

CATEGORIES = [  # first match wins; lower-case substrings of kernel or operator names
    ("grouped_gemm", ("grouped_mm", "grouped_gemm", "groupedgemm", "_grouped")),
    ("attention", ("flash", "attention", "fmha", "sdpa", "efficient_attention", "cudnn_sdp")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "optimizer", "_fused_adamw")),
    ("sort_index", ("sort", "argsort", "radix", "gather", "scatter", "index", "take_along", "cumsum")),
    (
        "gemm",
        ("gemm", "matmul", "aten::mm", "aten::bmm", "addmm", "cutlass", "xmma", "cublas", "sm90_", "linear"),
    ),
    (
        "norm_activation",
        ("norm", "silu", "gelu", "softmax", "rsqrt", "swiglu", "cross_entropy", "log_softmax"),
    ),
    ("copy_cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill", "_to_")),
    ("elementwise", ("elementwise", "vectorized", "mul", "add", "sub", "div", "where", "cat", "exp", "pow")),
]


def category(name: str) -> str:
    lower = name.lower()
    for label, keys in CATEGORIES:
        if any(key in lower for key in keys):
            return label
    return "other"


def summarize(events, wall_s: float, steps: int, cuda: bool, top: int) -> dict:
    """Kernel (CUDA) or self-CPU-op times by category and the top entries, per step."""
    totals: dict[str, dict] = {}
    for event in events:
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            if event.device_type != torch.autograd.DeviceType.CPU or event.key.startswith("ProfilerStep"):
                continue
            micros = event.self_cpu_time_total
        if micros <= 0:
            continue
        entry = totals.setdefault(event.key, {"us": 0.0, "calls": 0})
        entry["us"] += micros
        entry["calls"] += event.count
    busy_ms = sum(e["us"] for e in totals.values()) / 1000 / steps
    by_category: dict[str, float] = {}
    for name, entry in totals.items():
        key = category(name)
        by_category[key] = by_category.get(key, 0.0) + entry["us"] / 1000 / steps
    step_ms = 1000 * wall_s
    if cuda:
        by_category["idle"] = max(0.0, step_ms - busy_ms)
    ranked = sorted(totals.items(), key=lambda item: -item[1]["us"])[:top]
    return {
        "timing": "CUDA kernel self time" if cuda else "CPU operator self time",
        "step_ms": round(step_ms, 3),
        "busy_ms_per_step": round(busy_ms, 3),
        "ms_per_step_by_category": {
            k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda i: -i[1])
        },
        "top": [
            {
                "name": name[:160],
                "category": category(name),
                "ms_per_step": round(entry["us"] / 1000 / steps, 4),
                "calls_per_step": round(entry["calls"] / steps, 1),
                "share": round(entry["us"] / 1000 / steps / max(busy_ms, 1e-9), 4),
            }
            for name, entry in ranked
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--common", default="", help="space-separated Hydra overrides")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=6, help="steps before profiling (compilation)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    module, optimizer, batches = build(args.common.split())
    cuda = torch.cuda.is_available()
    for i in range(args.warmup):
        timed_step(module, optimizer, batches, i)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    times = []
    with torch.profiler.profile(activities=activities) as profiler:
        for i in range(args.steps):
            times.append(timed_step(module, optimizer, batches, args.warmup + i))
    wall = statistics.median(times)
    run = module.run_config
    tokens = run.data.batch_size * run.data.seq_len
    result = {
        "common": args.common,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "compile": bool(run.trainer.compile),
        "steps": args.steps,
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **summarize(profiler.key_averages(), wall, args.steps, cuda, args.top),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
