"""MoE layer forward+backward vs a dense SwiGLU with the same active parameters (a benchmark, not a test).

For each model width d and (E, K), experts have hidden size 2d/K, so K experts hold as many active
parameters as a dense SwiGLU of hidden 2d. Variants: the `loop` backend, the `grouped` backend
(grouped_mm), `grouped` + torch.compile, and the dense block. Reported: median ms of forward+backward,
TFLOP/s counted as 6 x active matmul params x tokens (router included), and the ratios grouped/loop
and MoE/dense (throughput). On CUDA it runs the issue-7 grid in bf16; on CPU (`--tiny`, CI) fp32 at
tiny sizes, without compile unless asked.
    python benchmarks/moe_layer.py [--tiny] [--compile|--no-compile] [--repeats 20] [--budget S] [--json out]
`--budget` stops starting new grid points after S seconds; the JSON is rewritten after every point, so a
run cut short still leaves the rows it measured (`make gpu-check` uses both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from step_time import emit  # benchmarks/ is the script's directory


def moe_step(layer, x, grad, context_cls) -> None:
    y, _ = layer(x, context_cls(1, x.shape[1]))
    y.backward(grad)


def dense_step(block, x, grad) -> None:
    block(x).backward(grad)


def timed(fn, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from testbed.config import MoEConfig
    from testbed.model.experts import DenseSwiGLU
    from testbed.model.moe import MoELayer
    from testbed.routing import RoutingContext
    from testbed.routing.topk_softmax import TopKSoftmaxConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU sizes (CI)")
    parser.add_argument(
        "--compile", action="store_true", help="also grouped + torch.compile (default on CUDA)"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip grouped + torch.compile")
    parser.add_argument("--budget", type=float, default=0.0, help="seconds; no new grid point after it")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    widths, tokens_list = ([512, 1024], [8192, 32768]) if device == "cuda" else ([64], [512])
    expert_configs = [(8, 2), (32, 4), (64, 8)] if device == "cuda" else [(8, 2), (16, 4)]
    use_compile = (args.compile or device == "cuda") and not args.no_compile
    rows = []
    started = time.perf_counter()
    header = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "compile": use_compile,
        "repeats": args.repeats,
    }
    points = [(d, e, k, t) for d in widths for e, k in expert_configs for t in tokens_list]
    for d, num_experts, top_k, tokens in points:
        if args.budget and time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:.0f} s reached: {len(rows)} of {len(points)} grid points measured")
            break
        hidden = 2 * d // top_k
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        active = top_k * 3 * d * hidden + d * num_experts  # experts + router
        flops = 6 * active * tokens
        row = {
            "d": d,
            "experts": num_experts,
            "top_k": top_k,
            "expert_hidden": hidden,
            "tokens": tokens,
        }
        variants = {}
        for backend in ("loop", "grouped"):
            layer = MoELayer(
                d,
                MoEConfig(num_experts=num_experts, expert_hidden=hidden, backend=backend),
                TopKSoftmaxConfig(top_k=top_k),
                [],
                0,
            ).to(device, dtype)
            variants[backend] = layer
        if use_compile:
            compiled = MoELayer(
                d,
                MoEConfig(num_experts=num_experts, expert_hidden=hidden),
                TopKSoftmaxConfig(top_k=top_k),
                [],
                0,
            ).to(device, dtype)
            compiled.compile()
            variants["grouped+compile"] = compiled
        for name, layer in variants.items():
            seconds = timed(partial(moe_step, layer, x, grad, RoutingContext), args.repeats, device)
            row[f"{name}_ms"] = round(1000 * seconds, 3)
            row[f"{name}_tflops"] = round(flops / seconds / 1e12, 4)
        dense = DenseSwiGLU(d, 2 * d).to(device, dtype)
        seconds = timed(partial(dense_step, dense, x, grad), args.repeats, device)
        row["dense_ms"] = round(1000 * seconds, 3)
        row["grouped_over_loop"] = round(row["loop_ms"] / row["grouped_ms"], 3)
        row["moe_over_dense"] = round(row["dense_ms"] / row["grouped_ms"], 3)
        rows.append(row)
        print(row, flush=True)
        if args.json:  # partial results survive a timeout
            with open(args.json, "w") as fh:
                json.dump({**header, "rows": rows, "complete": False}, fh, indent=2)
    emit(
        {**header, "rows": rows, "grid_points": len(points), "complete": len(rows) == len(points)}, args.json
    )


if __name__ == "__main__":
    main()
