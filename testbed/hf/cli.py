"""Entry points of `testbed-analyze` and `testbed-quiz`: each runs the path for a testbed checkpoint
(testbed.analysis) or, with --hf, the one for a pretrained Hugging Face MoE (testbed.hf). They live here,
above testbed.analysis in the layering, so that testbed.analysis never imports testbed.hf
(docs/architecture.md, "Layers"). The options and messages are defined with the checkpoint paths
(`build_parser`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from testbed.analysis import analyze, quiz
from testbed.errors import TestbedError
from testbed.hf.load import DEVICE_MAPS, load_hf_model
from testbed.hf.mix import analyze_mix
from testbed.hf.peers import run_hf_peers
from testbed.hf.quiz import chernov_figures, evaluate_hf_quiz, quiz_payload
from testbed.hf.quiz import markdown as hf_markdown


def analyze_hf(args) -> int:
    """`testbed-analyze --hf MODEL [data overrides]`: the same report for a pretrained Hugging Face MoE."""
    hf = load_hf_model(args.hf, args.device, args.dtype, args.tokenizer, args.revision, args.device_map)
    data = quiz.compose_data(args.overrides)
    seq_len = args.seq_len or data.seq_len
    budget = data.val_tokens_per_domain if args.max_tokens_per_domain is None else args.max_tokens_per_domain
    result = analyze_mix(hf, data, seq_len, args.batch_size, budget, progress=not args.no_progress)
    out = args.out or Path("analysis") / Path(str(args.hf).rstrip("/")).name
    extra = {
        "hf": {
            "model": hf.name,
            **hf.spec.describe(),
            "dtype": str(hf.dtype).removeprefix("torch."),
            "tokens": result.extra["tokens"],
            "seq_len": seq_len,
            "max_tokens_per_domain": budget,
            "selection_agreement": result.agreement,
        }
    }
    analyze.write_report(
        out,
        hf.name,
        hf.spec.family.label,
        result.domains,
        result.losses,
        result.stats,
        result.layer_names,
        extra,
        files=not args.summary_only,
    )
    print((out / "summary.md").read_text())
    plots = "" if args.summary_only else ", heatmap.png and per-layer plots"
    print(f"wrote {out}/analysis.json, summary.md{plots}")
    if args.peers is not None:  # the analyses of other MoE studies (testbed/hf/peers.py)
        files = run_hf_peers(args, hf, data, seq_len, budget, out)
        print(f"wrote {out}/{', '.join(files)}")
    return 0


def quiz_hf(args) -> int:
    """`testbed-quiz --hf MODEL --quiz FILES`: Chernov's per-layer analysis of a pretrained HF MoE
    (testbed/hf/quiz.py: letter scoring, routing at the answer position) and its three figures."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    items = quiz.load_quiz(args.quiz)
    hf = load_hf_model(args.hf, args.device, args.dtype, args.tokenizer, args.revision, args.device_map)
    result = evaluate_hf_quiz(hf, items, args.batch_items, args.max_length, progress=not args.no_progress)
    payload = {"quiz": [str(p) for p in args.quiz], **quiz_payload(hf, result, items)}
    out = args.out or Path("quiz") / Path(str(args.hf).rstrip("/")).name
    out.mkdir(parents=True, exist_ok=True)
    (out / "quiz.json").write_text(json.dumps(quiz.json_finite(payload), indent=2) + "\n")
    (out / "quiz.md").write_text(hf_markdown(payload))
    figures = chernov_figures(payload, out)
    print((out / "quiz.md").read_text())
    print(f"wrote {out}/quiz.json, quiz.md, {', '.join(figures)}")
    return 0


def first_paragraph(doc: str) -> str:
    """A module docstring's first paragraph as one line: the whole sentence for --help (argparse's
    description), never its first line only."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def add_hf_reach_options(parser: argparse.ArgumentParser) -> None:
    """--revision and --device-map of the --hf paths (testbed/hf/load.py)."""
    group = parser.add_argument_group("pretrained Hugging Face MoEs: placement and version")
    group.add_argument("--revision", help="a hub branch, tag or commit of --hf (hub ids only)")
    group.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        help="place the layers with accelerate (needs `pip install accelerate`) instead of --device; "
        "--dtype auto is then bf16 when a GPU is present",
    )


def analyze_parser() -> argparse.ArgumentParser:
    parser = analyze.build_parser()
    parser.description = first_paragraph(analyze.__doc__)
    add_hf_reach_options(parser)
    return parser


def quiz_parser() -> argparse.ArgumentParser:
    parser = quiz.build_parser()
    parser.description = first_paragraph(quiz.__doc__)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and "eval" in action.choices:
            add_hf_reach_options(action.choices["eval"])
    return parser


def parse_quiz_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`quiz.parse_args` with the --hf placement options added to `eval` and the whole description."""
    return quiz.parse_args(argv, parser=quiz_parser())


def analyze_main(argv: list[str] | None = None) -> int:
    """`testbed-analyze`: a testbed checkpoint or run directory, or `--hf MODEL`."""
    parser = analyze_parser()
    args = parser.parse_args(argv)
    if args.hf is not None:
        if args.checkpoint is not None:  # argparse puts the first override into `checkpoint`
            args.overrides.insert(0, str(args.checkpoint))
        try:
            return analyze_hf(args)
        except TestbedError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.checkpoint is None:
        parser.error("give a checkpoint (or run directory), or --hf MODEL")
    if args.revision is not None or args.device_map is not None:
        print("error: --revision and --device-map apply to --hf models only", file=sys.stderr)
        return 2
    return analyze.analyze_checkpoint(args)


def quiz_main(argv: list[str] | None = None) -> int:
    """`testbed-quiz build ...`, `testbed-quiz eval <run> ...` or `testbed-quiz [eval] --hf MODEL ...`."""
    args = parse_quiz_args(argv)
    try:
        if args.command == "build":
            return quiz.build_main(args)
        if args.hf is None and (args.revision is not None or args.device_map is not None):
            raise TestbedError("--revision and --device-map apply to --hf models only")
        return quiz_hf(args) if args.hf is not None else quiz.eval_main(args)
    except TestbedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
