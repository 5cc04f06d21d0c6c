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
    if torch.cuda.is_available():
        module.cuda()
    fused = torch.cuda.is_available() and run.trainer.fused_optimizer
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=fused or None)
    return module, optimizer, iter(data.train_dataloader())


def model_flops_per_token(run) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + 12 x layers x d x seq_len for attention
    scores and values (PaLM appendix B convention; embeddings excluded, the tied LM head included)."""
    m = run.model
    attention = 4 * m.d_model**2
    moe_layers = m.n_layers - m.dense_layers
    experts = run.router.top_k * 3 * m.d_model * m.moe.expert_hidden + m.d_model * m.moe.num_experts
    shared = m.moe.num_shared_experts * 3 * m.d_model * m.moe.expert_hidden
    dense = 3 * m.d_model * m.dense_hidden
    active = (
        m.n_layers * attention
        + moe_layers * (experts + shared)
        + m.dense_layers * dense
        + m.vocab_size * m.d_model
    )
    return 6 * active + 12 * m.n_layers * m.d_model * run.data.seq_len


def tokens_per_step(variants, name) -> int:
    module = dict(variants)[name][0]
    return module.run_config.data.batch_size * module.run_config.data.seq_len


def timed_step(module, optimizer, batches, index: int) -> float:
    cuda = torch.cuda.is_available()
    batch = {k: v.cuda(non_blocking=True) for k, v in next(batches).items()} if cuda else next(batches)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # GPU: bf16 mixed precision
        loss = module.training_step(batch, index)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="space-separated overrides")
    parser.add_argument("--common", default="", help="overrides applied to every variant")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="dense peak for MFU, e.g. 989 (H100 bf16); 0 = no MFU (CPU)",
    )
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
    flops_per_token = {name: model_flops_per_token(module.run_config) for name, (module, _, _) in variants}
    rows = [
        {
            "variant": name,
            "step_ms": round(1000 * statistics.median(t), 1),
            "ratio_to_baseline": round(statistics.median(t) / baseline, 4),
            "tokens_per_s": round(tokens_per_step(variants, name) / statistics.median(t), 1),
            "mfu": None
            if not args.peak_tflops
            else round(
                flops_per_token[name]
                * tokens_per_step(variants, name)
                / statistics.median(t)
                / (args.peak_tflops * 1e12),
                4,
            ),
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
