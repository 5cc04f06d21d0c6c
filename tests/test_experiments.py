"""testbed-experiment: experiment files, grid planning, expert-path selection, and every smoke variant."""

from __future__ import annotations

import json

import pytest
import yaml

from testbed import experiment as ex


def write(tmp_path, name, text):
    (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\n", "no `experiment:` block"),
        ("experiment:\n  sweeps: []\n", "at least one sweep"),
        ("experiment:\n  seeds: [a]\n  sweeps: [{name: s}]\n", "experiment.seeds"),
        ("experiment:\n  sweeps: [{name: s, grids: {}}]\n", "sweeps[0].grids: unknown key"),
        ("experiment:\n  sweeps: [{name: s, grid: {seed: 1}}]\n", "non-empty list of values"),
        ("experiment:\n  sweeps: [{name: post, from: pre}, {name: pre}]\n", "not an earlier sweep"),
        ("experiment:\n  sweeps: [{name: s}, {name: s}]\n", "unique"),
        (
            "experiment:\n  sweeps: [{name: a}, {name: b, select_experts: {domain: x, fraction: 0.1}}]\n",
            "with `from`",
        ),
        ("experiment:\n  sweeps: [{name: s}]\n  commands: [{run: x}]\n", "commands[0]"),
        ("experiment:\n  sweeps: [{name: s, overrides: [a=[b]]}]\n", "not valid YAML"),
    ],
)
def test_bad_experiment_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(ex.ExperimentError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        ex.load_experiment("bad", write(tmp_path, "bad", text))
    assert str(tmp_path / "bad.yaml") in str(err.value)


def test_unknown_experiment_lists_the_available_ones():
    with pytest.raises(ex.ExperimentError, match=r"available: \[.*'x1', 'x2'"):
        ex.load_experiment("x99")
    assert "_cpu" not in ex.available()


def test_hydra_values_and_override_merging():
    assert ex.hydra_value(None) == "null"
    assert ex.hydra_value(True) == "true"
    assert ex.hydra_value(["z_loss", "variance"]) == "[z_loss,variance]"
    assert ex.hydra_value({"layer0": [1, 2], "layer1": [3]}) == "{layer0:[1,2],layer1:[3]}"
    assert ex.hydra_value(1.0e-3) == "0.001"
    merged = ex.merge_overrides(
        ["+experiment=x", "seed=0", "data.domains=[a,b]"], ["seed=2", "+router.jitter=1"]
    )
    assert merged == ["+experiment=x", "seed=2", "data.domains=[a,b]", "+router.jitter=1"]


def test_grid_points_and_smoke_reduction():
    sweep = ex.Sweep("s", grid={"balance.scope": ["sequence", "global"], "aux_loss": [["z_loss"], []]})
    assert ex.grid_points(sweep) == [
        ["balance.scope=sequence", "aux_loss=[z_loss]"],
        ["balance.scope=sequence", "aux_loss=[]"],
        ["balance.scope=global", "aux_loss=[z_loss]"],
        ["balance.scope=global", "aux_loss=[]"],
    ]
    assert ex.grid_points(sweep, first_only=True) == [["balance.scope=sequence", "aux_loss=[z_loss]"]]
    assert ex.grid_points(ex.Sweep("empty")) == [[]]


def test_top_domain_experts_by_hand():
    counts = [  # [L=2, D=2, E=4]
        [[5, 9, 0, 9], [1, 1, 1, 1]],
        [[0, 0, 3, 1], [7, 0, 0, 0]],
    ]
    # fraction 0.5 of 4 experts = 2 per layer; ties (9, 9) broken by expert id, output sorted by id
    assert ex.top_domain_experts(counts, domain=0, fraction=0.5) == [[1, 3], [2, 3]]
    assert ex.top_domain_experts(counts, domain=1, fraction=0.25) == [[0], [0]]
    assert ex.top_domain_experts(counts, domain=0, fraction=0.01) == [[1], [2]]  # at least one


def test_expert_path_is_chosen_on_training_counts_by_default(tmp_path):
    import torch

    routing = tmp_path / "routing"
    routing.mkdir()
    meta = {"domains": ["code", "prose"], "layers": ["layer0"]}
    # the training steps' code tokens go to experts 2 and 3, the validation's to 0 and 1
    train = torch.tensor([[[0, 0, 5, 9], [1, 1, 1, 1]]])
    val = torch.tensor([[[9, 5, 0, 0], [1, 1, 1, 1]]])
    torch.save({**meta, "step": 10, "counts": val}, routing / "counts_step10.pt")
    with pytest.raises(ex.ExperimentError, match="train_counts_step.*source=val uses the validation table"):
        ex.expert_path_override(tmp_path, domain="code", fraction=0.5)
    assert ex.expert_path_override(tmp_path, "code", 0.5, source="val") == "finetune.experts={layer0:[0,1]}"
    torch.save({**meta, "step": 5, "counts": val}, routing / "train_counts_step5.pt")
    torch.save(
        {**meta, "step": 10, "counts": train}, routing / "train_counts_step10.pt"
    )  # the last one counts
    assert ex.expert_path_override(tmp_path, "code", 0.5) == "finetune.experts={layer0:[2,3]}"


@pytest.mark.slow  # composes every grid point with Hydra (20-40 s)
def test_every_shipped_experiment_grid_composes():
    """Every point of every grid (and post-training on every parent point) is a valid run config."""
    sizes = {name: ex.check_grid(ex.load_experiment(name), [], data="none") for name in ex.available()}
    assert (
        sizes["x1"] == 1 + 2 + 3 * 3 + 2 + 2
    )  # dense, oracle + hash, {LBL, EB, SH} x 3 scopes, BA x 2, mixed
    assert sizes["x2"] == 4 and sizes["x3"] == 7 and sizes["x8"] == 3
    assert sizes["x4"] == 4 + 2 + 4 + 2 and sizes["x5"] == 4 and sizes["x6"] == 5
    broken = ex.Experiment(
        "x3", ex.EXPERIMENT_DIR / "x3.yaml", [0], [ex.Sweep("s", {"router.top_k": [0]})], [], {}, {}
    )
    with pytest.raises(ex.ExperimentError, match="router.top_k"):
        ex.check_grid(broken, [])


def summaries(out):
    return {p.parent: json.loads(p.read_text()) for p in out.rglob("summary.json")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",  # every experiment only in `make test-all` (x6 alone takes 60-100 s): their grids compose in the
    # suite (test_every_shipped_experiment_grid_composes), the grid path trains, skips, refuses and reports
    # in the x2 grids below, post-training's init_from in test_train.py::test_init_from_checkpoint, and
    # their training paths in other tests (router types, the Guo losses, trainer=cpu, LBL values)
    [pytest.param(n, marks=pytest.mark.heavy) for n in ("x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8")],
)
def test_smoke_variant_runs_and_reports(tmp_path, name):
    """`make experiment NAME=<id> SMOKE=1`: every sweep trains, post-training starts from its parent's
    checkpoint, and the report lists each sweep. X1 runs on a tiny offline languages mix built from
    fixture manual pages (its languages-mix points), or on the shipped mix where groff is missing."""
    from tests.languages_fixture import GROFF_MISSING, build_tiny_languages_mix

    overrides = []
    if name == "x1" and not GROFF_MISSING:
        root, tokenizer = build_tiny_languages_mix(tmp_path / "mix")
        overrides = ["data=languages", f"data.root={root}", f"data.tokenizer={tokenizer}", "data.seq_len=32"]
    out = tmp_path / name
    assert ex.main([name, "--smoke", "--jobs", "2", "--out", str(out), *overrides]) == 0
    runs = summaries(out)
    experiment = ex.load_experiment(name)
    assert {path.relative_to(out).parts[0] for path in runs} == {s.name for s in experiment.sweeps}
    report = (out / "report.md").read_text()
    assert "failed or unfinished" not in report
    for run_dir, summary in runs.items():
        if run_dir.relative_to(out).parts[0] in {s.name for s in experiment.sweeps if s.parent}:
            assert "init/val/loss" in summary  # post-training validated its starting checkpoint first
    if name == "x6":  # the path run trains the routers and 2 of 16 experts per layer only
        trainable = {p.relative_to(out).parts[0]: s["trainable_params"] for p, s in runs.items()}
        assert trainable["path"] < 0.2 * trainable["full"]
    if overrides:
        domains = {tuple(d["domain"] for d in s["data"]) for s in runs.values()}
        assert domains == {("de", "fr", "es", "it", "nl", "pl", "ru", "ja")}
    assert (out / "frontier_purity.png").exists()


@pytest.mark.slow  # composes every grid point with Hydra (20-40 s)
def test_missing_mix_fails_the_grid_up_front(tmp_path, monkeypatch):
    """A data folder that does not exist stops the whole experiment before any run, naming the folder."""
    experiment = ex.load_experiment("x1")
    with pytest.raises(ex.ExperimentError, match=r"data.root: folder .*nowhere does not exist"):
        ex.check_grid(experiment, [f"data.root={tmp_path / 'nowhere'}"])
    assert ex.main(["x1", "--out", str(tmp_path / "out"), f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert not (tmp_path / "out").exists()
    # the full grid checks every point's data; the smoke variant only the points it trains
    checked = []
    monkeypatch.setattr(ex.grid, "check_data_paths", lambda data: checked.append(data.name))
    ex.check_grid(experiment, [], data="smoke")
    assert checked == ["shipped"] * 7  # the first point of each of X1's 7 sweeps
    checked.clear()
    ex.check_grid(experiment, [], data="all")
    assert checked == ["shipped"] * 16  # every point of X1's grid


def test_threads_per_packed_job():
    assert ex.threads_per_job(2, gpu=False, cores=2) == 1
    assert ex.threads_per_job(1, gpu=False, cores=16) == 16
    assert ex.threads_per_job(1, gpu=True, cores=16) == ex.GPU_THREADS_CAP == 4
    assert ex.threads_per_job(8, gpu=True, cores=16) == 2
    assert ex.threads_per_job(32, gpu=True, cores=16) == 1
    x2 = ex.load_experiment("x2")
    assert not ex.runs_on_gpu(x2, []) and ex.runs_on_gpu(x2, ["trainer=gpu"])


def test_launcher_choice(monkeypatch):
    """Jobs start from a preloaded forkserver for single-device CPU runs only; a GPU or multi-device run,
    or TESTBED_LAUNCHER=subprocess, gets a fresh interpreter; a bad TESTBED_LAUNCHER is refused."""
    x2 = ex.load_experiment("x2")
    monkeypatch.delenv("TESTBED_LAUNCHER", raising=False)
    assert ex.preloaded_launcher_fits(ex.first_run(x2, []))
    assert not ex.preloaded_launcher_fits(ex.first_run(x2, ["trainer=gpu"]))
    assert not ex.preloaded_launcher_fits(ex.first_run(x2, ["trainer.devices=2"]))
    monkeypatch.setenv("TESTBED_LAUNCHER", "subprocess")
    assert not ex.preloaded_launcher_fits(ex.first_run(x2, []))
    assert ex.project_script("testbed-quiz") == "testbed.hf.cli:quiz_main"
    assert ex.project_script("ls") is None
    monkeypatch.setenv("TESTBED_LAUNCHER", "fork")
    with pytest.raises(ex.ExperimentError, match="TESTBED_LAUNCHER='fork': allowed are auto, subprocess"):
        ex.preloaded_launcher_fits(ex.first_run(x2, []))


@pytest.mark.slow
@pytest.mark.heavy
def test_preloaded_and_fresh_launchers_train_the_same_run(tmp_path, synth_mix, monkeypatch):
    """One job through each launcher: the same summary (loss, steps), its output in sweep.log, the child
    seeing the launching process's environment and folder; a failing job returns its exit status."""
    from tests.conftest import synth_overrides

    cache = tmp_path / "cache"  # set after the forkserver may have started: the child must see it
    monkeypatch.setenv("TESTBED_CACHE", str(cache))
    results = {}
    for preload in (True, False):
        job = ex.Job("s", tmp_path / str(preload), synth_overrides(synth_mix, "trainer.max_steps=4"))
        assert ex.Launcher(preload).run(job, threads=1, log=lambda _: None) == 0
        (summary,) = summaries(job.sweep_dir).values()
        results[preload] = (summary["steps"], summary["val/loss"])
        assert "run folder:" in (job.sweep_dir / "sweep.log").read_text()
    assert results[True] == results[False] and results[True][0] == 4
    assert any((cache / "stores").iterdir())
    bad = ex.Job("s", tmp_path / "bad", synth_overrides(synth_mix, "optim.lr=-1"))
    assert ex.Launcher(True).run(bad, threads=1, log=lambda _: None) == 2
    assert "optim.lr" in (bad.sweep_dir / "sweep.log").read_text()


def test_settings_compare_without_swept_keys_quotes_or_threads():
    job = ex.Job("s", ex.EXPERIMENT_DIR, ["+experiment=x1", "balance.scope=sequence,global", "seed=0"])
    assert ex.grid._top_level_comma("sequence,global") and not ex.grid._top_level_comma("[z_loss,variance]")
    assert ex.grid._settings(
        ["a='x=1'", "aux_loss=[z_loss,variance]", "trainer.num_threads=2", "hydra.run.dir=/x", "b=c"], {"b"}
    ) == {"a": '"x=1"', "aux_loss": '["z_loss", "variance"]'}
    assert ex.grid._settings(["p=False", "lr=1e-3"], set()) == ex.grid._settings(
        ["p=false", "lr=0.001"], set()
    )
    assert job.mismatches() == []  # no runs in that folder


@pytest.mark.slow
def test_rerun_with_other_settings_into_the_same_out_is_refused(tmp_path, synth_mix):
    """A grid's --out holding runs of other settings (here 2 steps, now 3) is refused with exit 2, naming the
    run and the setting; the same command again skips its finished runs."""
    from tests.conftest import SMALL_MODEL, SYNTH_DOMAINS

    data = [
        f"data.root={synth_mix}",
        f"data.tokenizer={synth_mix / 'tokenizer.json'}",
        f"data.domains=[{','.join(SYNTH_DOMAINS)}]",
        "data.seq_len=32",
        *SMALL_MODEL,
    ]
    out = tmp_path / "x2"
    assert ex.main(["x2", "--smoke", "--out", str(out), *data]) == 0
    runs = summaries(out)
    report = (out / "report.md").read_text()  # the grid's report lists its sweep, every run finished
    assert "capacity" in report and "failed or unfinished" not in report
    assert ex.main(["x2", "--smoke", "--out", str(out), *data, "trainer.max_steps=3"]) == 2
    assert summaries(out) == runs  # nothing trained, nothing relabelled
    assert ex.main(["x2", "--smoke", "--out", str(out), *data]) == 0


@pytest.mark.slow
@pytest.mark.heavy
def test_packed_grid_runs_two_processes_sharing_one_token_store(tmp_path, synth_mix):
    """`--jobs 2` on a 2-point grid (X2's smoke variant, seeds 0 and 1): two training processes at once,
    both finish with summary.json, and they share one token store, built once."""
    from tests.conftest import SMALL_MODEL, SYNTH_DOMAINS

    cache = tmp_path / "cache"
    data = [
        f"data.root={synth_mix}",
        f"data.tokenizer={synth_mix / 'tokenizer.json'}",
        f"data.domains=[{','.join(SYNTH_DOMAINS)}]",
        "data.seq_len=32",
        f"data.cache_dir={cache}",
        *SMALL_MODEL,
    ]
    out = tmp_path / "x2"
    assert ex.main(["x2", "--smoke", "--seeds", "0,1", "--jobs", "2", "--out", str(out), *data]) == 0
    runs = summaries(out)
    assert sorted(path.relative_to(out).parts[:2] for path in runs) == [
        ("capacity", "s0"),
        ("capacity", "s1"),
    ]
    assert all(summary["steps"] == 2 for summary in runs.values())
    stores = [p for p in (cache / "stores").iterdir() if p.is_dir()]
    assert len(stores) == 1 and len(list(stores[0].glob("*.bin"))) == 3 * len(SYNTH_DOMAINS)
    logs = "".join((out / "capacity" / seed / "sweep.log").read_text() for seed in ("s0", "s1"))
    assert logs.count("building the token store") == 1  # one process built it, the other waited
    assert logs.count(f"reading the token store {stores[0]}") == 2


@pytest.mark.slow
def test_rerun_resumes_a_killed_run(tmp_path, synth_mix):
    """A grid whose training process was killed (SIGTERM after its first checkpoint) is rerun: the process is
    not skipped, its run continues with resume=auto and ends with the numbers of an uninterrupted grid."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import SMALL_MODEL, SYNTH_DOMAINS

    args = [
        "x2",
        "--smoke",
        "--seeds",
        "0",
        f"data.root={synth_mix}",
        f"data.tokenizer={synth_mix / 'tokenizer.json'}",
        f"data.domains=[{','.join(SYNTH_DOMAINS)}]",
        "data.seq_len=32",
        *SMALL_MODEL,
        "trainer.max_steps=40",
        "trainer.val_check_interval=5",
        "--threads",
        "1",
    ]
    out = tmp_path / "killed"
    run_dir = out / "capacity" / "s0" / "0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    grid = subprocess.Popen(
        [sys.executable, "-m", "testbed.experiment", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(int((run_dir / ".run.lock").read_text()), signal.SIGTERM)  # the training process holds the lock
    grid.communicate(timeout=300)
    assert grid.returncode == 1  # the killed process counts as failed
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    job = ex.Job("capacity", out / "capacity" / "s0", [])
    assert not job.finished()

    assert ex.main([*args, "--out", str(out)]) == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "finished" and resumed["steps"] == 40 and job.finished()
    assert "resuming from" in (out / "capacity" / "s0" / "sweep.log").read_text()
    assert ex.main([*args, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "capacity" / "s0" / "0" / "summary.json").read_text())
    keys = [k for k in full if k.startswith(("val/", "spec/"))]
    assert keys and {k: resumed[k] for k in keys} == {k: full[k] for k in keys}


def test_random_expert_path_control_draws_as_many_experts_per_layer():
    chosen = ex.random_experts(num_layers=3, num_experts=16, fraction=0.15, seed=4)
    assert [len(c) for c in chosen] == [2, 2, 2]  # round(0.15 * 16) = 2, as the domain's path
    assert all(c == sorted(set(c)) and all(0 <= e < 16 for e in c) for c in chosen)
    assert chosen == ex.random_experts(3, 16, 0.15, seed=4)  # seeded
    assert chosen != ex.random_experts(3, 16, 0.15, seed=5)


def test_hydra_launcher_overrides_pass_through_the_grid_check(tmp_path):
    """`testbed-experiment x7 hydra/launcher=basic hydra.job.chdir=false`: launcher settings compose in the
    grid check and reach every training process's command (so a grid runs through any Hydra launcher)."""
    experiment = ex.load_experiment("x7")
    extra = ["hydra/launcher=basic", "hydra.job.chdir=false"]
    assert ex.check_grid(experiment, extra, data="none") == 4
    jobs = [j for sweep in experiment.sweeps for j in ex.plan_sweep(experiment, sweep, tmp_path, [0], extra)]
    assert len(jobs) == 4 and all("hydra/launcher=basic" in job.args for job in jobs)


def test_sweeps_option_runs_only_the_named_sweeps(tmp_path, capsys):
    """`--sweeps sinkhorn,ba --seeds 0` plans only those sweeps (how a long grid is finished seed by seed);
    an unknown sweep name is refused with the grid's sweep names."""
    assert (
        ex.main(["x1", "--sweeps", "sinkhorn,ba", "--seeds", "0", "--dry-run", "--out", str(tmp_path)]) == 0
    )
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("testbed-train")]
    assert len(commands) == 5  # Sinkhorn at 3 scopes, BA at 2
    assert all(
        ("router=sinkhorn" in c or "router=balanced_assignment" in c) and "seed=0" in c for c in commands
    )
    assert ex.main(["x1", "--sweeps", "sinkhorn,nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no sweep 'nope'" in err and "'lbl_mixed'" in err


def test_sweeps_option_runs_only_the_commands_of_the_named_sweeps():
    """X5 with `--sweeps oracle`: the quiz is built once and only the oracle runs are evaluated."""
    experiment = ex.load_experiment("x5")
    oracle = [sweep for sweep in experiment.sweeps if sweep.name == "oracle"]
    commands = ex.commands_for(experiment.commands, oracle)
    assert [c.get("once", c.get("each_run_of")) for c in commands] == [
        experiment.commands[0]["once"],
        "oracle",
    ]
    assert ex.commands_for(experiment.commands, experiment.sweeps) == experiment.commands


def test_scale_ladder_rungs_share_their_sweeps():
    """The scale ladder's rungs: the same six sweeps (matched by name by testbed-report --rank), each at its
    own model size (every grid point composes: test_every_shipped_experiment_grid_composes)."""
    names = None
    for scale in ("micro", "tiny", "small"):
        experiment = ex.load_experiment(f"scale_{scale}")
        sweeps = {sweep.name: sweep.grid for sweep in experiment.sweeps}
        assert names is None or list(sweeps) == names
        names = list(sweeps)
        assert sweeps["dense_active"]["model"] == [f"{scale}_dense"]
        # every size at the rate of the experiments whose rankings it tests, not the default run's 1e-2
        assert yaml.safe_load(experiment.path.read_text())["optim"]["lr"] == 3.0e-3
        assert all(grid["model"] == [scale] for name, grid in sweeps.items() if name != "dense_active")
    assert names == ["lbl_micro_batch", "lbl_sequence", "eb", "sinkhorn", "hash", "dense_active"]
    # not global scope: with one process and no gradient accumulation it is the micro-batch scope bit for bit
    # (a first tiny run of both gave the same loss to the last digit), a duplicate configuration
    assert "trainer.accumulate_grad_batches" not in str(experiment.sweeps)
