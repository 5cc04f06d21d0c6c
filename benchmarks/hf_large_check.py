"""The routing analysis of testbed/hf/ at the size of a real pretrained MoE, without downloading one: a
randomly initialised model with OLMoE-1B-7B's published configuration (allenai/OLMoE-1B-7B-0924: 16
layers, d_model 2048, 16 attention heads, 64 experts of hidden size 1024, top-8, vocabulary 50304, 4096
positions, softmax gates not renormalized) is built on a GPU in bf16, random token batches go through it,
and every layer's routing is reconstructed from its router logits and counted (testbed/hf/count.py, the
counter `testbed-intervene prune` uses: it keeps [layers, experts] tables and nothing per token beyond a
batch).

Reported as one JSON line (and `--out FILE`): tokens per second over the timed batches (after `--warmup`
untimed ones), peak memory (CUDA: `torch.cuda.max_memory_allocated` over the timed part; CPU: the process's
peak resident set), the fraction of tokens whose reconstructed expert set equals the model's own (lowest
layer), and the parameter count.

    python benchmarks/hf_large_check.py                 # on a GPU: ~7B parameters, ~14 GB in bf16
    python benchmarks/hf_large_check.py --dry-run       # a scaled-down config on CPU (seconds; the test)

Exit 2 with a message when no GPU is present and --dry-run is not given.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

OLMOE_1B_7B = dict(  # the published config of allenai/OLMoE-1B-7B-0924 (transformers' OlmoeConfig fields)
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    norm_topk_prob=False,
    clip_qkv=None,
    tie_word_embeddings=False,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
)
DRY_RUN = OLMOE_1B_7B | dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    pad_token_id=1,
    eos_token_id=2,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--dry-run", action="store_true", help="a scaled-down config on CPU")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (8; dry: 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048; dry: 64)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (16; dry: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (2; dry: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = dict(
        device="cpu" if dry else "cuda",
        batch_size=4 if dry else 8,
        seq_len=64 if dry else 2048,
        batches=3 if dry else 16,
        warmup=1 if dry else 2,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def random_batches(vocab: int, batch_size: int, seq_len: int, count: int, device, seed: int):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(count):
        yield torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    from testbed.hf.count import count_usage
    from testbed.hf.load import HFModelError, check_device, wrap_model

    try:
        device = check_device(args.device)
    except HFModelError as err:
        print(f"error: {err}; or run the scaled-down check with --dry-run", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    values = DRY_RUN if args.dry_run else OLMOE_1B_7B
    if args.seq_len > values["max_position_embeddings"]:
        print(
            f"error: --seq-len {args.seq_len} > {values['max_position_embeddings']} positions",
            file=sys.stderr,
        )
        return 2
    config = transformers.OlmoeConfig(**values)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with device:  # initialised where it runs: no 28 GB fp32 copy on the host first
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build_seconds = time.perf_counter() - start
    hf = wrap_model(model, None)
    vocab = config.vocab_size
    count_usage(
        hf,
        random_batches(vocab, args.batch_size, args.seq_len, args.warmup, device, args.seed + 1),
        grow=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    batches = random_batches(vocab, args.batch_size, args.seq_len, args.batches, device, args.seed + 2)
    count = count_usage(hf, batches, grow=False, source="random tokens")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    seconds = time.perf_counter() - start
    agreement = [a for a in count.agreement.values() if a is not None]
    report = {
        "dry_run": args.dry_run,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "dtype": args.dtype,
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_experts",
                "num_experts_per_tok",
                "norm_topk_prob",
            )
        },  # fmt: skip
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": build_seconds,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batches": args.batches,
        "tokens": count.tokens,
        "seconds": seconds,
        "tokens_per_second": count.tokens / seconds,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": peak_kind,
        "selection_agreement": min(agreement) if agreement else None,
        "count": {
            "load_total": int(count.load.sum()),
            "never_used_per_layer": [len(n) for n in count.never_used()],
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    line = json.dumps(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
