"""`testbed-quiz`: a multiple-choice quiz in MMLU's format built from held-out text, and its evaluation with
the routing analysis of Chernov (2025) (experiment X5: dead experts, gate entropy per layer, per-expert
accuracy spread on a quiz).

`testbed-quiz build [overrides] --out DIR` writes one `<domain>_test.csv` per domain, exactly in the format of
MMLU's `data/test/*_test.csv` files (no header; columns question,A,B,C,D,answer), plus `manifest.json` and
`provenance.jsonl`. An item is taken from a *validation* document of the data config (the holdout of
`testbed.data.prepare.mix_splits`, the one training uses), so the quiz never contains training text:
- question: `--prefix-tokens` consecutive tokens of the document, decoded to text;
- true option: the next `--answer-tokens` tokens of the same document, decoded;
- three distractors: spans of `--answer-tokens` tokens from other positions or other validation documents of
  the same domain (never overlapping the item's own passage, never equal to another option's text);
- the answer letter is a seeded permutation, so it is deterministic given `--seed`.
Every option starts at a token that begins with whitespace (a word boundary of the byte-level BPE), and a span
is used only if decoding and re-encoding it gives the same token ids, so at evaluation the model sees exactly
the original tokens. Item passages of one domain do not overlap each other.

`testbed-quiz --hf <model id or directory> --quiz <dir or csv files>` does Chernov's analysis of a pretrained
Hugging Face MoE instead (testbed/hf/quiz.py: MMLU prompt, letter scoring, routing at the answer position).

`testbed-quiz eval <run dir or .ckpt> --quiz <dir or csv files> [--out DIR]` scores these files or real MMLU
files (`load_quiz`: a `*_test.csv` file, a directory of them, or the hendrycks layout with `test/` or
`data/test/`; the subject is the file stem without `_test`). Definitions [defined here, after Chernov 2025]:
- score of an option: the log-likelihood of its tokens given the question, sum over the option's tokens
  (cloze form). The option follows the question directly when either side has whitespace at the join (always
  the case for built quizzes), else with one space between them (MMLU). `accuracy` takes the option with the
  highest sum; `accuracy_norm` divides each sum by the option's length in UTF-8 bytes first (the
  lm-evaluation-harness `acc_norm` convention; a per-token normalization would rank the options of a built
  quiz exactly like the sum, since all of them have `--answer-tokens` tokens). Ties go to the earlier letter.
- evaluation packs an item into one row: the question, then the four options, each option attending only to
  the question and to itself, at the positions it would have right after the question (`pack_items`); this
  computes what four separate question + option sequences would, with the question computed once.
- counted tokens: the question tokens once and the tokens of each of the four options, i.e. every token of
  an item's row; padding is never counted. With `--positions answer`, only the answer position is counted:
  the last question token, whose output predicts the answer (as the HF quiz counts the prompt's last token).
- `dead_experts` (per layer): fraction of experts with no assignment from any counted token
  (`specialization.dead_experts` of the subject x expert count table).
- `gate_entropy` (per layer): mean over counted tokens of H(p_t) / log E, the full router distribution
  (`RoutingStats` entropy sums and `specialization.gate_entropy`).
- per-expert accuracy (per layer): each item is given to the expert that receives the most assignments from
  its question tokens (ties: the lowest expert id); an expert's accuracy is the `accuracy` over its items.
  `expert_accuracy_spread` / `expert_accuracy_range` are the std and max - min of that accuracy across the
  experts with at least one item (`specialization.accuracy_spread` with items in place of tokens).
  `experts_with_items` says how many experts that is.
Routers whose choice depends on the batch (expert_choice) route quiz tokens together with the other items
and the padding of their batch; the oracle router needs each subject to be one of the model's domains.

The code, one module per job, all of it importable from here: items and CSV files in `quiz_items`; building
from held-out text, the manifest and its holdout check in `quiz_build`; encoding, packing and scoring in
`quiz_score`; the routing collected and the per-layer metrics in `quiz_metrics`; the quiz.json payload and
quiz.md in `quiz_eval`; the command line (`testbed-quiz build` / `eval`) here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from testbed import CONF_DIR
from testbed.analysis.analyze import load_run, resolve_checkpoint
from testbed.analysis.quiz_build import (
    MANIFEST,
    PROVENANCE,
    build_domain,
    build_quiz,
    data_description,
    holdout_check,
)
from testbed.analysis.quiz_eval import evaluate_quiz, json_finite, markdown
from testbed.analysis.quiz_items import (
    LETTERS,
    QuizError,
    QuizItem,
    load_quiz,
    quiz_files,
    read_quiz_csv,
    subject_of,
    write_quiz_csv,
)
from testbed.analysis.quiz_metrics import QuizRouting, expert_item_accuracy, layer_report, restrict
from testbed.analysis.quiz_score import (
    PAD_ID,
    EncodedItem,
    choose,
    encode_items,
    join,
    pack_items,
    score_items,
)
from testbed.config import parse_config
from testbed.data.loading import SHIPPED_TOKENIZER
from testbed.data.tokenizer import load_tokenizer
from testbed.train.checkpoint import load_weights
from testbed.train.module import MoELanguageModel

__all__ = [  # the quiz's names, from the modules that do each job (see the docstring)
    "LETTERS",
    "MANIFEST",
    "PAD_ID",
    "PROVENANCE",
    "EncodedItem",
    "QuizError",
    "QuizItem",
    "QuizRouting",
    "build_domain",
    "build_main",
    "build_parser",
    "build_quiz",
    "choose",
    "compose_data",
    "data_description",
    "encode_items",
    "eval_main",
    "evaluate_quiz",
    "expert_item_accuracy",
    "holdout_check",
    "join",
    "json_finite",
    "layer_report",
    "load_quiz",
    "load_tokenizer_of",
    "markdown",
    "pack_items",
    "parse_args",
    "quiz_files",
    "read_quiz_csv",
    "restrict",
    "score_items",
    "subject_of",
    "write_quiz_csv",
]


# ---------------------------------------------------------------------------------------------------- CLI


def compose_data(overrides: list[str]):
    """The data config of the default run with Hydra-style overrides (`data=shipped data.split_seed=1`)."""
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as err:
        raise QuizError(f"config overrides {overrides}: {err}") from err
    return parse_config(cfg).data


def build_main(args: argparse.Namespace) -> int:
    """`testbed-quiz build [overrides] --out DIR` with parsed options (`parse_args`)."""
    if args.from_run is not None:
        data = load_run(resolve_checkpoint(args.from_run), args.overrides).data
    else:
        data = compose_data(args.overrides)
    manifest = build_quiz(
        data, args.out, args.items_per_domain, args.prefix_tokens, args.answer_tokens, args.seed
    )
    total = sum(d["items"] for d in manifest["domains"].values())
    print(
        f"wrote {total} items in {len(manifest['domains'])} files, {MANIFEST} and {PROVENANCE} to {args.out}"
    )
    return 0


def load_tokenizer_of(run):
    """The tokenizer a run was trained with."""
    return load_tokenizer(run.data.tokenizer or SHIPPED_TOKENIZER)


def eval_main(args: argparse.Namespace) -> int:
    """`testbed-quiz eval <run dir or .ckpt> --quiz FILES` with parsed options (`parse_args`)."""
    if args.checkpoint is None:
        raise QuizError("testbed-quiz eval: give a checkpoint (or run directory), or --hf MODEL")

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = resolve_checkpoint(args.checkpoint)
    run = load_run(checkpoint, [])
    items = load_quiz(args.quiz)
    tokenizer = load_tokenizer_of(run)
    module = MoELanguageModel(run, list(run.data.domains))
    load_weights(module, checkpoint, what="testbed-quiz")
    module.to(args.device)
    check = holdout_check(args.quiz, run.data)
    for problem in check["problems"]:
        print(
            f"warning: quiz holdout differs from the model's, items may be training text: {problem}",
            file=sys.stderr,
        )
    result = evaluate_quiz(module, tokenizer, items, args.batch_items, args.device, args.positions)
    result["positions"] = args.positions
    result = {"checkpoint": str(checkpoint), "quiz": [str(p) for p in args.quiz], "holdout": check, **result}
    out = args.out or checkpoint.parent.parent / "quiz"
    out.mkdir(parents=True, exist_ok=True)
    (out / "quiz.json").write_text(json.dumps(json_finite(result), indent=2) + "\n")
    (out / "quiz.md").write_text(markdown(result))
    print((out / "quiz.md").read_text())
    print(f"wrote {out}/quiz.json and quiz.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The options of `testbed-quiz` (its entry point, `testbed.hf.cli.quiz_main`, runs `build_main`,
    `eval_main` or, with --hf, the Hugging Face evaluation)."""
    parser = argparse.ArgumentParser(prog="testbed-quiz", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build an MMLU-format quiz from the validation documents")
    build.add_argument("overrides", nargs="*", help="Hydra-style config overrides, e.g. data=shipped")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--from-run", type=Path, help="take the data config from this run dir or .ckpt")
    build.add_argument("--items-per-domain", type=int, default=100)
    build.add_argument("--prefix-tokens", type=int, default=64, help="question length in tokens")
    build.add_argument("--answer-tokens", type=int, default=16, help="option length in tokens")
    build.add_argument("--seed", type=int, default=0)
    ev = commands.add_parser("eval", help="score a checkpoint on quiz files, with the routing analysis")
    ev.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        help="a .ckpt file, or a run directory with checkpoints/last.ckpt (not with --hf)",
    )
    ev.add_argument(
        "--quiz", type=Path, nargs="+", required=True, help="quiz directories or *_test.csv files"
    )
    ev.add_argument("--out", type=Path, help="output directory (default: <run dir>/quiz)")
    ev.add_argument("--batch-items", type=int, default=32, help="items per forward pass (one row each)")
    ev.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument(
        "--positions",
        choices=["all", "answer"],
        default="all",
        help="count routing over every token of an item (all) or at its answer position only (answer: the "
        "last question token; each item goes to that token's top-1 expert)",
    )
    hf = ev.add_argument_group("pretrained Hugging Face MoEs (pip install -e .[hf]; testbed/hf/quiz.py)")
    hf.add_argument("--hf", help="a hub model id or a local model directory, instead of a checkpoint")
    hf.add_argument("--tokenizer", help="tokenizer directory or id (default: the model's own)")
    hf.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    hf.add_argument("--max-length", type=int, default=2048, help="prompt tokens kept (the end is kept)")
    hf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(
    argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The command line of `testbed-quiz` parsed (`build` overrides may also come after the options);
    `parser`: another parser of the same command (testbed.hf.cli adds the --hf placement options)."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--hf"):  # `testbed-quiz --hf MODEL --quiz ...` means `eval --hf`
        argv.insert(0, "eval")
    args, extra = parser.parse_known_args(argv)  # overrides may also come after the options
    if args.command == "build" and not any(x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
