"""The `loop` expert backend, indexing the weight bank per expert (w_in[e], before) against unbinding it
once (after): forward + backward of one MoE expert bank, interleaved, median ms and the ratio.

Indexing makes autograd build a full-size zero gradient of the bank for every expert in backward."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from testbed.model.experts import ExpertBank, swiglu


def indexed_loop(bank: ExpertBank, x_sorted, tokens_per_expert):
    chunks = [
        swiglu(x_e @ bank.w_in[e]) @ bank.w_out[e]
        for e, x_e in enumerate(x_sorted.split(tokens_per_expert.tolist()))
    ]
    return torch.cat(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096, help="assignments (tokens x top_k)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    bank = ExpertBank(args.experts, args.d_model, args.hidden, backend="loop")
    x = torch.randn(args.tokens, args.d_model)
    counts = torch.full((args.experts,), args.tokens // args.experts)
    counts[-1] += args.tokens - counts.sum()
    variants = {
        "indexed (before)": lambda: indexed_loop(bank, x, counts),
        "unbind (after)": lambda: bank._loop(x, counts),
    }
    times = {name: [] for name in variants}
    for step in range(args.steps + 3):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn().square().mean().backward()
            bank.zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["indexed (before)"])
    for name, t in times.items():
        print(f"{name}: {1000 * statistics.median(t):.2f} ms, ratio {statistics.median(t) / base:.3f}")
    print(
        f"threads {torch.get_num_threads()}, experts {args.experts}, d {args.d_model}, hidden {args.hidden}"
    )


if __name__ == "__main__":
    main()
