"""MoE layer forward+backward vs a dense SwiGLU with the same active parameters (a benchmark, not a test).

For each model width d and (E, K), experts have hidden size 2d/K, so K experts hold as many active
parameters as a dense SwiGLU of hidden 2d. Variants: the `loop` backend, the `grouped` backend
(grouped_mm), `grouped` + torch.compile, and the dense block. Reported: median ms of forward+backward,
TFLOP/s counted as 6 x active matmul params x tokens (router included), and the ratios grouped/loop
and MoE/dense (throughput). On CUDA the grid runs with bf16 inputs and weights; on CPU (`--tiny`, CI)
fp32 at tiny sizes, without compile unless asked. GPU times are CUDA events around each repeat (median).

`--models` adds the layers of the configs the GPU runs train (model=small and model=base, top-4 of 32
experts, 32K tokens) as training sees them: fp32 weights and an fp32 residual stream under bf16 autocast,
next to their dense twin of equal active parameters (hidden K x expert hidden), with the MoE layer's
extra time over the dense twin per unit of K (`extra_ms_per_k`), and peers at the same shape and input:
Hugging Face's Qwen3-MoE sparse block with its `grouped_mm` experts (`hf_ms`, where transformers is
installed) and torchtitan's MoE module (`torchtitan_ms`, where torchtitan is installed); a peer that is
missing or fails is recorded with its reason, never silently left out; and the router GEMM's cost in fp32
(what the router runs, so that close top-k choices do not flip) against bf16, with its share of the layer.
On CPU: model=micro's layer, fp32.
    python benchmarks/moe_layer.py [--tiny] [--models] [--compile|--no-compile] [--repeats 20] [--budget S]
        [--json out]
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
    """Median seconds of `fn` over `repeats` after 3 warm-up calls: CUDA events on the GPU (no host
    timing of queued work), wall time on CPU."""
    for _ in range(3):
        fn()
    if device == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) / 1000 for start, end in events)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_peer(d: int, num_experts: int, top_k: int, hidden: int):
    """Hugging Face's Qwen3-MoE sparse block (softmax top-k router, SwiGLU experts as 3-D weights) with its
    `grouped_mm` experts implementation, at the same shape; weights drawn like ours."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=d, moe_intermediate_size=hidden, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=False,
    )  # fmt: skip
    config._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=d**-0.5)
    return _hidden_only(block)


def torchtitan_peer(d: int, num_experts: int, top_k: int, hidden: int):
    """torchtitan's MoE module (0.3 config API: softmax token-choice top-k router, grouped experts with
    torch._grouped_mm, local token dispatcher; no load-balance buffer), at the same shape. Its import
    needs Triton, so it runs on a CUDA machine with the carried wheels (benchmarks/fetch_gpu_wheels.sh)."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    config = MoE.Config(
        num_experts=num_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=d, hidden_dim=hidden, num_experts=num_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=num_experts, top_k=top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=num_experts,
            gate=Linear.Config(in_features=d, out_features=num_experts),
            top_k=top_k,
            score_func="softmax",
        ),
        load_balance_coeff=None,
    )
    block = config.build()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=d**-0.5)
    return _hidden_only(block)


class _hidden_only(torch.nn.Module):
    """A peer block's hidden-state output alone (some return (y, router logits))."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        y = self.block(x)
        return y[0] if isinstance(y, tuple) else y


MODEL_SHAPES = {  # conf/model/*.yaml: d_model, num_experts, expert_hidden; top-4 as the GPU runs train
    "small": (512, 32, 4, 512),
    "base": (1024, 32, 4, 1024),
    "micro": (64, 8, 2, 64),
}


def model_rows(names: list[str], tokens: int, repeats: int, device: str, use_compile: bool) -> list[dict]:
    """Each model's own MoE layer as training runs it (fp32 weights and input, bf16 autocast on CUDA)
    against its dense twin (hidden K x expert hidden): ms, ratio, and the extra ms per unit of K."""
    from testbed.config import MoEConfig
    from testbed.model.experts import DenseSwiGLU
    from testbed.model.moe import MoELayer
    from testbed.routing import RoutingContext
    from testbed.routing.topk_softmax import TopKSoftmaxConfig

    rows = []
    for name in names:
        d, num_experts, top_k, hidden = MODEL_SHAPES[name]
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        layer = MoELayer(
            d, MoEConfig(num_experts=num_experts, expert_hidden=hidden), TopKSoftmaxConfig(top_k=top_k), 0
        )
        dense = DenseSwiGLU(d, top_k * hidden)
        layer, dense = layer.to(device), dense.to(device)
        if use_compile:
            layer.compile()
            dense.compile()
        autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=device == "cuda")

        def moe(layer=layer, x=x, grad=grad, autocast=autocast):
            with autocast():
                y, _ = layer(x, RoutingContext(1, x.shape[1]))
            y.backward(grad)

        def twin(dense=dense, x=x, grad=grad, autocast=autocast):
            with autocast():
                y = dense(x)
            y.backward(grad)

        moe_s, dense_s = timed(moe, repeats, device), timed(twin, repeats, device)
        # the router GEMM [T, d] x [d, E], forward + backward: fp32 (what the router runs, for stable top-k)
        # against bf16 (what it would cost under autocast); its share of the layer is the price of fp32
        gate = layer.router.gate.weight
        router_ms = {}
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            xr = x.detach().reshape(-1, d).to(dtype).requires_grad_(True)
            wr = gate.detach().to(dtype).requires_grad_(True)
            probe = torch.randn(xr.shape[0], num_experts, device=device, dtype=dtype)

            def gemm(xr=xr, wr=wr, probe=probe):
                torch.nn.functional.linear(xr, wr).backward(probe)

            router_ms[precision] = round(1000 * timed(gemm, repeats, device), 4)
        peers = {}
        for peer, make in (("hf", hf_peer), ("torchtitan", torchtitan_peer)):
            try:
                block = make(d, num_experts, top_k, hidden).to(device)
            except Exception as err:  # noqa: BLE001 - recorded: which peer is missing and why
                peers[f"{peer}_ms"], peers[f"{peer}_status"] = None, f"{type(err).__name__}: {err}"[:200]
                continue

            def step(block=block, x=x, grad=grad, autocast=autocast):
                with autocast():
                    y = block(x)
                y.backward(grad)

            try:
                peers[f"{peer}_ms"] = round(1000 * timed(step, repeats, device), 3)
                peers[f"{peer}_status"] = "ok"
                peers[f"moe_over_{peer}"] = round(peers[f"{peer}_ms"] / (1000 * moe_s), 3)
            except Exception as err:  # noqa: BLE001
                peers[f"{peer}_ms"], peers[f"{peer}_status"] = None, f"{type(err).__name__}: {err}"[:200]
        flops = 6 * (top_k * 3 * d * hidden + d * num_experts) * tokens
        rows.append({
            "model": name, "d": d, "experts": num_experts, "top_k": top_k, "expert_hidden": hidden,
            "tokens": tokens, "input": "fp32 under bf16 autocast" if device == "cuda" else "fp32",
            "compile": use_compile, "moe_ms": round(1000 * moe_s, 3), "dense_ms": round(1000 * dense_s, 3),
            "moe_over_dense": round(dense_s / moe_s, 3),
            "extra_ms_per_k": round(1000 * (moe_s - dense_s) / top_k, 3),
            "moe_tflops": round(flops / moe_s / 1e12, 4), "router_fp32_ms": router_ms["fp32"],
            "router_bf16_ms": router_ms["bf16"],
            "router_fp32_share": round(router_ms["fp32"] / (1000 * moe_s), 4), **peers,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


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
    parser.add_argument(
        "--models", action="store_true", help="also the model configs' own layers (see above)"
    )
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
                0,
            ).to(device, dtype)
            variants[backend] = layer
        if use_compile:
            compiled = MoELayer(
                d,
                MoEConfig(num_experts=num_experts, expert_hidden=hidden),
                TopKSoftmaxConfig(top_k=top_k),
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
    models = []
    if args.models:
        names, tokens = (["small", "base"], 32768) if device == "cuda" else (["micro"], 512)
        models = model_rows(names, tokens, args.repeats, device, use_compile)
    result = {**header, "rows": rows, "grid_points": len(points), "complete": len(rows) == len(points)}
    emit({**result, "models": models}, args.json)


if __name__ == "__main__":
    main()
