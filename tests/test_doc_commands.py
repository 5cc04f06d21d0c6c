"""Every shell command in README.md and docs/*.md runs here in a smoke form, so that a stale example fails
the build.

The commands: each line of a fenced ```bash block (continuation lines joined, comments dropped) and each
line outside the blocks that starts with `testbed-` or `make `. Placeholders such as `<run dir>` stand for
what an earlier step made. Each program has its smoke form:

- `testbed-train`: the command as written goes through the training command's pre-check (every sweep
  value included) and is composed and validated (fast). Commands that can train on this machine then
  train for real (slow): the synthetic mix of tests/conftest.py, a tiny model, `trainer.max_steps=2`, the
  first value of each sweep, one Optuna trial, and run folders under a temporary folder.
- Commands that need a GPU, several processes, a cluster, the network or data this machine does not have
  are composed only (their reason is in NOT_RUN_HERE): the config they would train is composed and
  validated, nothing trains.
- `make <target>`: `make -n` (the target exists and expands); `make train` and `make experiment` also run
  as the commands they stand for; `make test` is not run inside the test suite.
- `testbed-experiment` (and experiments/run_gpu.sh): `--dry-run`, which composes and validates every
  point of the grid and prints the training commands (slow); a grid is never trained here.
- `testbed-report`, `testbed-analyze`, `testbed-quiz`, `testbed-intervene`, `testbed-data`: their
  arguments are parsed by the program's own parser (fast), then the program runs on a smoke run, its
  checkpoint and a quiz built from it (slow). Those that load a Hugging Face model (`--hf`, GPU or
  network) or read external data (MMLU's CSV files) are parsed only; their Hydra overrides are composed.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.config import parse_config
from testbed.train.cli import (
    CONF_DIR,
    check_group_choices,
    check_overrides,
    first_sweep_value,
    quote_values_with_equals,
)
from testbed.train.sweeps import experiment_overrides, is_multirun, sweeper_params_as_overrides
from tests import inprocess
from tests.conftest import SMALL_MODEL, SYNTH_DOMAINS, compose, synth_overrides

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
SHELL = ("bash", "sh", "shell", "console")
PLACEHOLDER = re.compile(r"<([^<>\n]+)>")


@dataclass(frozen=True)
class DocCommand:
    source: str  # docs/running.md:12
    text: str
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return self.argv[0].removeprefix(".venv/bin/")

    @property
    def args(self) -> list[str]:
        return list(self.argv[1:])


def shell_words(text: str) -> tuple[str, ...]:
    """The words the shell would pass (quotes removed, comment dropped), a placeholder such as `<run dir>`
    kept as one word `@run_dir`."""
    text = PLACEHOLDER.sub(lambda m: "@" + re.sub(r"\W+", "_", m.group(1)).strip("_"), text)
    return tuple(shlex.split(text, comments=True))


def commands_in(path: Path) -> list[DocCommand]:
    out, lang, pending, start = [], None, "", 0
    name = str(path.relative_to(ROOT))
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        text = line.strip()
        if lang in SHELL:
            start = start if pending else number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text, pending = (pending + text).strip(), ""
            text = text.removeprefix("$ ")
        elif lang is not None or not re.match(r"(\.venv/bin/)?testbed-|make ", text):
            continue
        else:
            start = number
        words = shell_words(text) if text and not text.startswith("#") else ()
        if words:
            out.append(DocCommand(f"{name}:{start}", text, words))
    return out


def doc_commands() -> list[DocCommand]:
    """Every command once (README.md and docs/index.md share their first lines): the first place it is
    written."""
    seen, out = set(), []
    for command in (command for path in SOURCES for command in commands_in(path)):
        if command.argv not in seen:
            seen.add(command.argv)
            out.append(command)
    return out


COMMANDS = doc_commands()
IDS = [f"{c.source} {c.program} {' '.join(c.args)[:60]}" for c in COMMANDS]


def test_command_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\n.venv/bin/testbed-train a=1 \\\n  b='[x,y]'   # a comment\n# only a comment\n\n```\n"
        "```python\ntestbed-train not=this\n```\n"
        "  ```bash\n  make experiment NAME=x1\n  ```\n"
        "testbed-report <run dir> --out r.md\nmake test is not a shell line here either\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = commands_in(page)
    finally:
        ROOT = saved
    assert [(c.source, c.argv) for c in found] == [
        ("page.md:3", (".venv/bin/testbed-train", "a=1", "b=[x,y]")),
        ("page.md:12", ("make", "experiment", "NAME=x1")),
        ("page.md:14", ("testbed-report", "@run_dir", "--out", "r.md")),
        ("page.md:15", ("make", "test", "is", "not", "a", "shell", "line", "here", "either")),
    ]
    assert len(COMMANDS) >= 40  # README.md and docs/ hold dozens of commands


# --- what each command needs --------------------------------------------------------------------------

GPU_OVERRIDES = re.compile(r"^(trainer=(gpu|ddp)|trainer\.accelerator=(gpu|cuda))$")
PROCESSES = re.compile(r"^trainer\.(devices=([2-9]|\d\d)|num_nodes=([2-9]|\d\d)|strategy=(ddp|fsdp2).*)$")


def not_run_here(command: DocCommand) -> str | None:
    """Why a command is composed or parsed only (None: it runs in its smoke form)."""
    args = command.args
    if "--hf" in args:
        return "loads a Hugging Face model (a local copy or the hub: GPU, network)"
    if "--device" in args and "cuda" in args:
        return "needs a GPU"
    if any(GPU_OVERRIDES.match(a) for a in args):
        return "needs a GPU"
    if any(a.startswith("hydra/launcher=slurm") for a in args):
        return "submits to a SLURM cluster"
    if any(PROCESSES.match(a) for a in args):
        return "starts several training processes (tests/test_ddp.py trains that on CPU)"
    if any(a in ("data=pile", "data=wikipedia_languages") for a in args):
        return "streams its data from the Hugging Face hub (network)"
    if "data=languages" in args:
        return "needs data/languages (make data-languages: Debian packages)"
    if any(a.startswith("~") or "mmlu" in a for a in args):
        return "reads MMLU's CSV files (external data)"
    if command.program == "experiments/run_gpu.sh":
        return "packs a grid on a GPU; its grid is composed with --dry-run"
    if command.program == "make" and args[:1] in (["test"], ["test-all"]):
        return "the test suite itself: make -n only"
    if command.program == "make" and args[:1] and args[0].startswith("data"):
        return "installs source packages (apt, npm, network): make -n only"
    return None


NOT_RUN_HERE = {c.source + " " + c.text: not_run_here(c) for c in COMMANDS if not_run_here(c)}
"""The commands composed or parsed only, with the reason (printed by -v in the test ids' failures)."""

TOOLS = {"testbed-report", "testbed-analyze", "testbed-quiz", "testbed-intervene", "testbed-data"}
PROGRAMS = {"testbed-train", "testbed-experiment", "make", "experiments/run_gpu.sh", *TOOLS}


def test_every_command_has_a_smoke_form():
    unknown = [f"{c.source}: {c.text}" for c in COMMANDS if c.program not in PROGRAMS]
    assert not unknown, f"commands without a smoke form here (add one to {Path(__file__).name}): {unknown}"


# --- testbed-train: composed as written ----------------------------------------------------------------


def train_command(command: DocCommand) -> list[str] | None:
    """The testbed-train arguments of a command (make train: its ARGS), None for other commands."""
    if command.program == "testbed-train":
        return command.args
    if command.program == "make" and command.args[:1] == ["train"]:
        found = [a.partition("=")[2] for a in command.args[1:] if a.startswith("ARGS=")]
        return shlex.split(found[0]) if found else []
    return None


def compose_as_written(args: list[str], tmp_path: Path):
    """The training command's pre-check (as testbed-train runs it, every sweep value checked), then the
    composed config of its first run, validated; run folders moved under `tmp_path`. No hardware check:
    a GPU command composes on this machine."""
    args = [
        f"{a.partition('=')[0]}={tmp_path / a.partition('=')[2]}"
        if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
        else a
        for a in args
        if a not in ("--cfg", "job")
    ]
    args = experiment_overrides(quote_values_with_equals(sweeper_params_as_overrides(args)), CONF_DIR)
    check_group_choices(args)
    extra = check_overrides(args)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    first = []
    for arg in [*args, *extra]:
        if "=" not in arg or arg.startswith("-") or arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        override = parser.parse_override(arg)
        if override.is_sweep_override():
            value = first_sweep_value(override)
            arg = f"{override.get_key_element()}={value}" if value is not None else None
        if arg:
            first.append(arg)
    return parse_config(compose(first))


TRAIN_COMMANDS = [(c, i) for c, i in zip(COMMANDS, IDS, strict=True) if train_command(c) is not None]


@pytest.mark.parametrize("command", [c for c, _ in TRAIN_COMMANDS], ids=[i for _, i in TRAIN_COMMANDS])
def test_training_commands_compose(command, tmp_path):
    """Each testbed-train command (and make train) as written: pre-check, composition, validation."""
    run = compose_as_written(train_command(command), tmp_path)
    assert run.trainer.max_steps > 0


# --- make: the target exists ----------------------------------------------------------------------------

MAKE_COMMANDS = [(c, i) for c, i in zip(COMMANDS, IDS, strict=True) if c.program == "make"]


@pytest.mark.parametrize("command", [c for c, _ in MAKE_COMMANDS], ids=[i for _, i in MAKE_COMMANDS])
def test_make_targets_expand(command):
    """`make -n`: the target exists and its recipe expands (nothing runs; the stamp of .venv is taken as
    up to date, so no install is planned)."""
    result = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", *command.args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), f"make -n {' '.join(command.args)} planned nothing"


# --- the other programs: parsed by their own parser -----------------------------------------------------


class Parsed(Exception):
    pass


def parse_only(program: str, args: list[str], monkeypatch) -> argparse.Namespace:
    """The program's arguments through its own parser, stopping there (argparse errors exit 2)."""
    if program == "testbed-quiz":
        from testbed.hf.cli import parse_quiz_args

        return parse_quiz_args(args)
    if program == "testbed-analyze":
        from testbed.hf.cli import analyze_parser

        return analyze_parser().parse_args(args)
    if program == "testbed-intervene":
        from testbed.hf.intervene import build_parser

        return build_parser().parse_args(args)
    mains = {"testbed-report": "testbed.analysis.report", "testbed-data": "testbed.data.build"}
    module = mains.get(program, "testbed.experiment")
    main = __import__(module, fromlist=["main"]).main
    for name in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, name)

        def stop(self, *a, _original=original, **k):
            raise Parsed(_original(self, *a, **k))

        monkeypatch.setattr(argparse.ArgumentParser, name, stop)
    try:
        main(args)
    except Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{program} finished without parsing its arguments")


def overrides_of(args: list[str]) -> list[str]:
    return [a for a in args if re.match(r"^[+~]*[\w.]+(@[\w.]+)?=", a) and not a.startswith("-")]


OTHER_COMMANDS = [
    (c, i)
    for c, i in zip(COMMANDS, IDS, strict=True)
    if c.program in TOOLS or c.program == "testbed-experiment"
]


@pytest.mark.parametrize("command", [c for c, _ in OTHER_COMMANDS], ids=[i for _, i in OTHER_COMMANDS])
def test_other_commands_parse(command, monkeypatch):
    """Each report/analyze/quiz/intervene/data/experiment command's arguments parse; its Hydra overrides
    (data=..., model=...) compose and validate; an experiment id exists."""
    with monkeypatch.context() as patch:
        try:
            parse_only(command.program, command.args, patch)
        except SystemExit as err:
            pytest.fail(f"{command.source}: {command.text}: the parser refused it (exit {err.code})")
    overrides = overrides_of(command.args)
    if command.program == "testbed-experiment":
        from testbed.experiment import load_experiment

        load_experiment(command.args[0])
    elif overrides and command.program != "testbed-data":  # testbed-data's data overrides name new files
        parse_config(compose(overrides))


def test_gpu_grid_script():
    """experiments/run_gpu.sh: the script parses (bash -n) and names an experiment that exists; its grid is
    composed by test_grids_dry_run."""
    script_commands = [c for c in COMMANDS if c.program == "experiments/run_gpu.sh"]
    from testbed.experiment import load_experiment

    for command in script_commands:
        assert subprocess.run(["bash", "-n", str(ROOT / command.program)], check=False).returncode == 0
        load_experiment(command.args[0])


# --- the smoke forms that run (slow) --------------------------------------------------------------------

SMOKE_TRAIN = (
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.num_threads=1",
    "trainer.progress_bar=false",
    "metrics.plots=false",
    "metrics.stiffness_batches=1",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.val_tokens_per_domain=256",
)


OTHER_DOMAIN_KEY = re.compile(rf"^val/loss/(?!({'|'.join(SYNTH_DOMAINS)})$)\w+$")


def key_of(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~")


def first_value(value: str) -> str:
    """The first value of a sweep list (`a,b` -> `a`; commas inside brackets do not split)."""
    depth = 0
    for i, char in enumerate(value):
        depth += char in "[({"
        depth -= char in "])}"
        if char == "," and depth == 0:
            return value[:i]
    return value


@dataclass
class Artifacts:
    """What the smoke forms run on: the synthetic mix, a finished smoke run (with its checkpoint), a quiz
    built from it, a folder with your-own-data sources and a tokenizer made by the documented
    testbed-data command, and a scratch folder for this command's outputs."""

    mix: Path
    run: Path
    quiz: Path
    own_data: Path
    tmp: Path

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / "last.ckpt"


def smoke_train_args(args: list[str], art: Artifacts) -> list[str]:
    """A documented testbed-train command at smoke size: the synthetic mix (unless it trains on sources
    of its own; a documented domain's val/loss/<domain> becomes the mix's first), a tiny model, 2 steps,
    each sweep's first value, one Optuna trial, its run folders under the scratch folder, and a
    checkpoint to start from that exists."""
    own_data = any(key_of(a).startswith(("data.sources.", "data.tokenizer")) for a in args)
    dense = any(re.fullmatch(r"model=\w*dense\w*", a) for a in args)
    smoke = [*SMOKE_TRAIN, *SMALL_MODEL, *(["model.dense_layers=2"] if dense else [])]
    if own_data:  # its tokenizer's vocabulary: the model's default size holds it
        smoke = [a for a in smoke if not a.startswith("model.vocab_size=")]
    else:
        smoke += [a for a in synth_overrides(art.mix) if key_of(a).startswith("data")]
    replaced = {key_of(a) for a in smoke}
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if not sep or arg.startswith("-"):
            out.append(arg)  # -m, --cfg job
            continue
        if bare in replaced:
            continue
        if bare in ("hydra.run.dir", "hydra.sweep.dir"):
            value = str(art.tmp / "runs" / value)
        elif bare == "hydra.sweeper.n_trials":
            value = "1"
        elif bare == "init_from" and not Path(value).exists():
            value = str(art.ckpt)
        else:
            value = first_value(value)
            if not own_data:  # a documented domain's key (val/loss/code): the synthetic mix's first domain
                value = OTHER_DOMAIN_KEY.sub(f"val/loss/{SYNTH_DOMAINS[0]}", value)
        out.append(f"{key}={value}")
    if any(a.startswith("hydra/sweeper=optuna") for a in out) and "hydra.sweeper.n_trials" not in map(
        key_of, out
    ):
        out.append("hydra.sweeper.n_trials=1")
    if not any(key_of(a) in ("hydra.run.dir", "hydra.sweep.dir") for a in out):
        where = "hydra.sweep.dir" if is_multirun(args) else "hydra.run.dir"
        out.append(f"{where}={art.tmp / 'runs' / 'run'}")
    return [*out, *smoke]


def smoke_experiment_args(command: DocCommand, art: Artifacts) -> list[str]:
    """A grid command as `testbed-experiment <id> ... --dry-run` (make experiment and run_gpu.sh too)."""
    if command.program == "make":
        values = dict(a.split("=", 1) for a in command.args[1:] if "=" in a)
        args = [
            values["NAME"],
            *(["--smoke"] if values.get("SMOKE") else []),
            *shlex.split(values.get("ARGS", "")),
        ]
    elif command.program == "experiments/run_gpu.sh":  # NAME DEADLINE_S [JOBS] [overrides...]
        args = [command.args[0], *[a for a in command.args[1:] if "=" in a]]
    else:
        args = command.args
    out, prev = [], None
    for arg in args:
        out.append(str(art.tmp / arg) if prev == "--out" else arg)
        prev = arg
    return [*out, "--dry-run"]


PATH_FLAGS = {"--out", "--quiz", "--from-run", "--compare"}


def smoke_tool_args(command: DocCommand, art: Artifacts) -> list[str]:
    """A report/analyze/quiz/intervene/data command on the smoke artifacts: run folders and checkpoints
    named in the docs become the smoke run (testbed-report: the folder holding it), --quiz the smoke quiz,
    --out a scratch folder; a quiz built from `data=...` builds from the synthetic mix."""
    out, prev = [], None
    for arg in command.args:
        value = arg
        if prev == "--out":
            value = str(art.tmp / "out" / arg)
        elif prev == "--quiz":
            value = str(art.quiz)
        elif prev in ("--from-run", "--compare"):
            value = str(art.ckpt if arg.endswith(".ckpt") else art.run)
        elif prev is not None and prev.startswith("--") or arg.startswith("-") or "=" in arg:
            pass
        elif "/" in arg or arg.startswith("@"):
            value = str(
                art.run.parent
                if command.program == "testbed-report"
                else art.ckpt
                if arg.endswith(".ckpt")
                else art.run
            )
        out.append(value)
        prev = arg
    if command.program == "testbed-quiz" and out[:1] == ["build"] and "--from-run" not in out:
        out += [a for a in synth_overrides(art.mix) if key_of(a).startswith("data")]
    return out


def write_own_sources(folder: Path, mix: Path) -> None:
    """a.jsonl and b_texts/*.txt (docs/data.md's own domains) from the synthetic mix's texts."""
    import gzip
    import json

    texts = {
        domain: [json.loads(line)["text"] for line in gzip.open(mix / f"{domain}.jsonl.gz", "rt")]
        for domain in SYNTH_DOMAINS[:2]
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[SYNTH_DOMAINS[0]]))
    (folder / "b_texts").mkdir(exist_ok=True)
    for i, text in enumerate(texts[SYNTH_DOMAINS[1]]):
        (folder / "b_texts" / f"{i:03d}.txt").write_text(text)


@pytest.fixture(scope="module")
def artifacts(synth_mix, tmp_path_factory) -> Artifacts:
    from testbed.hf.cli import quiz_main
    from testbed.train.cli import run_training

    root = tmp_path_factory.mktemp("doc_smoke")
    run = root / "runs" / "smoke"
    cfg = compose(synth_overrides(synth_mix, *SMOKE_TRAIN))
    run_training(cfg, run, quiet=True)
    quiz = root / "quiz"
    built = inprocess.run_entry(
        quiz_main, ["build", "--from-run", str(run), "--out", str(quiz)], "testbed-quiz", pass_argv=True
    )
    assert built.code == 0, built.stderr[-3000:]
    own = root / "own"
    write_own_sources(own, synth_mix)
    from testbed.data.build import main as data_main

    for command in COMMANDS:  # the documented tokenizer of your own domains, made as the docs make it
        if command.program == "testbed-data":
            made = inprocess.run_entry(data_main, command.args, "testbed-data", cwd=own, pass_argv=True)
            assert made.code == 0, f"{command.source}: {made.stderr[-3000:]}"
    return Artifacts(synth_mix, run, quiz, own, root)


def runnable(kind: str) -> list[tuple[DocCommand, str]]:
    picked = []
    for command, name in zip(COMMANDS, IDS, strict=True):
        if not_run_here(command) and kind != "grid":
            continue
        if kind == "train" and train_command(command) is not None:
            picked.append((command, name))
        elif kind == "grid" and (
            command.program in ("testbed-experiment", "experiments/run_gpu.sh")
            or command.program == "make"
            and command.args[:1] == ["experiment"]
        ):
            picked.append((command, name))
        elif kind == "tool" and command.program in TOOLS:
            picked.append((command, name))
    return picked


@pytest.mark.slow
@pytest.mark.heavy  # CI composes and validates every training command (test_training_commands_compose)
@pytest.mark.parametrize("command", [c for c, _ in runnable("train")], ids=[i for _, i in runnable("train")])
def test_training_commands_train(command, artifacts, tmp_path):
    """Each testbed-train command that can train here (make train too), through the real command line
    in this process, at smoke size; a run of several commands in one folder (resume) reuses the folder."""
    art = Artifacts(artifacts.mix, artifacts.run, artifacts.quiz, artifacts.own_data, tmp_path)
    args = smoke_train_args(train_command(command), art)
    own = any(key_of(a).startswith("data.sources.") for a in args)
    result = inprocess.train(*args, cwd=artifacts.own_data if own else None)
    assert result.code == 0, f"{command.source}: {' '.join(args)}\n{result.stderr[-3000:]}"
    if any(a in ("--cfg", "--help", "-h", "--hydra-help", "--info") for a in args):  # prints, trains nothing
        assert result.stdout.strip()
    else:
        assert list((tmp_path / "runs").rglob("summary.json")), f"{command.source}: no run finished"


def test_runs_of_one_folder_share_it(tmp_path):
    """The resume example (docs/running.md): both commands name out/a, and their smoke forms one folder."""
    art = Artifacts(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path)
    first = smoke_train_args(["hydra.run.dir=out/a"], art)
    second = smoke_train_args(["hydra.run.dir=out/a", "resume=auto"], art)
    assert [a for a in first if a.startswith("hydra.run.dir=")] == [
        a for a in second if a.startswith("hydra.run.dir=")
    ]
    assert first_value("router=a,b") == "router=a" and first_value("[x,y],[z]") == "[x,y]"


@pytest.mark.slow
@pytest.mark.heavy  # CI parses every tool command with the tool's own parser (test_other_commands_parse)
@pytest.mark.parametrize("command", [c for c, _ in runnable("tool")], ids=[i for _, i in runnable("tool")])
def test_tool_commands_run(command, artifacts, tmp_path):
    """Each report/analyze/quiz/intervene/data command that can run here, on the smoke artifacts."""
    from testbed.analysis.report import main as report_main
    from testbed.data.build import main as data_main
    from testbed.hf.cli import analyze_main, quiz_main
    from testbed.hf.intervene import main as intervene_main

    mains = {
        "testbed-report": report_main,
        "testbed-analyze": analyze_main,
        "testbed-quiz": quiz_main,
        "testbed-intervene": intervene_main,
        "testbed-data": data_main,
    }
    art = Artifacts(artifacts.mix, artifacts.run, artifacts.quiz, artifacts.own_data, tmp_path)
    args = smoke_tool_args(command, art)
    cwd = artifacts.own_data if command.program == "testbed-data" else tmp_path
    result = inprocess.run_entry(mains[command.program], args, command.program, cwd=cwd, pass_argv=True)
    assert result.code == 0, f"{command.source}: {command.program} {' '.join(args)}\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, _ in runnable("grid")], ids=[i for _, i in runnable("grid")])
def test_grids_dry_run(command, tmp_path):
    """Each grid command (testbed-experiment, make experiment, experiments/run_gpu.sh) with --dry-run:
    every point of its grid composed and validated and its training commands printed; none trains."""
    from testbed.experiment import main as experiment_main

    args = smoke_experiment_args(command, Artifacts(tmp_path, tmp_path, tmp_path, tmp_path, tmp_path))
    result = inprocess.run_entry(experiment_main, args, "testbed-experiment", cwd=tmp_path, pass_argv=True)
    assert result.code == 0, f"{command.source}: testbed-experiment {' '.join(args)}\n{result.stderr[-3000:]}"
    assert "configurations compose and validate" in result.stdout and "testbed-train -m" in result.stdout
