"""Data parallelism on CPU (gloo, 2 processes): distinct batches per rank, and a 2-rank run equal to one
process with 2 accumulated micro-batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testbed.config import parse_config
from testbed.data.datamodule import DomainMixDataModule
from tests.conftest import compose, synth_overrides

TRAIN = Path(sys.executable).with_name("testbed-train")
BATCHES = 4


def _rank_batches(rank: int, world_size: int, init_file: str, data_configs: dict, out_dir: str) -> None:
    """One rank: the first BATCHES training batches (input ids, domain ids) of each data config."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for name, data_config in data_configs.items():
            datamodule = DomainMixDataModule(data_config, seed=0)
            datamodule.setup("fit")
            loader = iter(datamodule.train_dataloader())
            batches = [next(loader) for _ in range(BATCHES)]
            torch.save(
                [(b["input_ids"], b["domain_ids"][:, 0]) for b in batches],
                Path(out_dir) / f"{name}_rank{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def test_ranks_draw_distinct_slices_of_one_stream(synth_mix, tmp_path):
    compositions = ["mixed", "homogeneous"]
    data = {
        c: parse_config(compose(synth_overrides(synth_mix, f"data.batch_composition={c}"))).data
        for c in compositions
    }
    mp.start_processes(
        _rank_batches, args=(2, str(tmp_path / "init"), data, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for composition in compositions:
        ranks = [torch.load(tmp_path / f"{composition}_rank{r}.pt") for r in range(2)]
        single = DomainMixDataModule(data[composition], seed=0)
        single.setup("fit")
        loader = iter(single.train_dataloader())
        stream = [next(loader)["input_ids"] for _ in range(2 * BATCHES)]
        for i in range(BATCHES):
            (ids0, dom0), (ids1, dom1) = ranks[0][i], ranks[1][i]
            assert not torch.equal(ids0, ids1)  # the ranks train on different sequences
            # rank r's i-th micro-batch is micro-batch 2i + r of the one-process stream
            assert torch.equal(ids0, stream[2 * i]) and torch.equal(ids1, stream[2 * i + 1])
            if composition == "homogeneous":  # one domain per micro-batch, a different one on each rank
                assert len(set(dom0.tolist())) == 1 and len(set(dom1.tolist())) == 1
                assert dom0[0] != dom1[0]
            else:
                assert len(set(dom0.tolist())) > 1


def _train(run_dir: Path, root: Path, *extra: str, output: list | None = None) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        *synth_overrides(root, "trainer.max_steps=6", "trainer.val_check_interval=6"),
        "trainer.num_threads=1",
        "metrics.plots=false",
        "data.batch_composition=homogeneous",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run([str(TRAIN), *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if output is not None:
        output.append(done.stdout + done.stderr)
    assert "sync_dist=True" not in done.stderr  # no per-key advice flood: metrics are equal on every rank
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return summary, state


DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", [pytest.param("micro_batch", marks=pytest.mark.heavy), "global"])
def test_two_ranks_match_one_process_with_two_accumulated_micro_batches(synth_mix, tmp_path, scope):
    """Same data, same gradient: 2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches.

    micro_batch scope: bit-identical. global scope: the running counts differ by design at the first
    micro-batch of a step (accumulation: micro-batch 1 sees only itself; DDP: every rank sees both ranks'
    counts, all-reduced), so the load-balance gradient differs slightly and the runs agree to ~1e-4."""
    two, two_state = _train(tmp_path / "two", synth_mix, f"balance.scope={scope}", *DDP)
    one, one_state = _train(
        tmp_path / "one", synth_mix, f"balance.scope={scope}", "trainer.accumulate_grad_batches=2"
    )
    assert two["steps"] == one["steps"] == 6
    assert two["tokens_seen"] == one["tokens_seen"] == 6 * 2 * 8 * 32  # both ranks counted
    losses = [k for k in one if k.startswith("val/loss")]
    assert len(losses) == 4  # three domains and the mean
    tolerance = 0.0 if scope == "micro_batch" else 1e-3
    for key in losses:
        assert abs(two[key] - one[key]) <= tolerance, key
    worst = max((two_state[k].float() - one_state[k].float()).abs().max().item() for k in one_state)
    assert worst <= (1e-6 if scope == "micro_batch" else 1e-3)


FSDP2 = ["trainer.strategy=fsdp2", "trainer.devices=2", "trainer.accelerator=cpu"]


@pytest.mark.slow
@pytest.mark.heavy
def test_fsdp2_on_two_processes_trains_like_ddp_and_resumes(synth_mix, tmp_path):
    """trainer.strategy=fsdp2 on 2 CPU processes (gloo), with the expert bias at global scope, the
    orthogonality loss and the noise stiffness pass: every parameter is sharded (one log line), and 3 steps,
    a checkpoint and a resume for 3 more end where 6 steps of one process with 2 accumulated micro-batches
    end (which DDP equals: test above; the expert bias changes only between steps, so global scope is exact
    here), up to float rounding (reduce-scatter instead of all-reduce); last.ckpt is a full checkpoint with
    the same keys and records the process layout."""
    setting = ["balance=expert_bias", "balance.scope=global", "aux_loss=[z_loss,orthogonality]"]
    setting += ["optim.warmup_steps=6"]  # the schedule of steps 1-3 does not depend on max_steps
    setting += ["metrics.stiffness_perturbation=noise"]  # reads the (sharded) embedding outside a forward
    one, one_state = _train(tmp_path / "one", synth_mix, *setting, "trainer.accumulate_grad_batches=2")
    logs: list[str] = []
    first = tmp_path / "first3"
    _train(
        first, synth_mix, *setting, *FSDP2, "trainer.max_steps=3", "trainer.val_check_interval=3", output=logs
    )
    lines = [line for line in logs[0].splitlines() if "fsdp2:" in line]
    assert len(lines) == 1 and "sharded over 2 processes (2 blocks + root)" in lines[0], lines
    checkpoint = first / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["testbed"]
    assert saved["data_parallel_size"] == 2 and saved["accumulate_grad_batches"] == 1
    resumed, state = _train(tmp_path / "resumed", synth_mix, *setting, *FSDP2, f"resume={checkpoint}")
    assert resumed["steps"] == one["steps"] == 6 and resumed["tokens_seen"] == one["tokens_seen"]
    for key in [k for k in one if k.startswith("val/loss")]:
        assert abs(resumed[key] - one[key]) < 1e-6, key
    assert state.keys() == one_state.keys()
    assert all(state[k].shape == one_state[k].shape for k in one_state)  # gathered, not shards
    assert max((state[k].float() - one_state[k].float()).abs().max().item() for k in one_state) < 1e-5


def test_resume_on_another_process_layout_is_refused(synth_mix):
    """Each rank's data position counts its own micro-batches: a checkpoint resumes only on the number of
    processes and the accumulation that wrote it (checkpoints without the record are not checked)."""
    from testbed.errors import CheckpointError
    from testbed.train.module import MoELanguageModel

    run = parse_config(compose(synth_overrides(synth_mix, "trainer.accumulate_grad_batches=2")))
    module = MoELanguageModel(run, list(run.data.domains))  # no Trainer: one process
    module.check_same_layout({"data_parallel_size": 1, "accumulate_grad_batches": 2})
    module.check_same_layout({})
    with pytest.raises(CheckpointError) as info:
        module.check_same_layout({"data_parallel_size": 2, "accumulate_grad_batches": 1})
    message = str(info.value)
    assert "data_parallel_size 1 (the checkpoint's: 2)" in message
    assert "accumulate_grad_batches 2 (the checkpoint's: 1)" in message and "trainer.devices" in message


def test_gateless_routers_get_find_unused_parameters_under_ddp():
    def strategy(*overrides: str) -> str:
        return parse_config(compose(list(overrides))).trainer.strategy

    assert (
        strategy("router=hash", "balance=none", "trainer.strategy=ddp") == "ddp_find_unused_parameters_true"
    )
    assert (
        strategy("router=oracle", "router.within_block=uniform", "balance=none", "trainer.devices=2")
        == "ddp_find_unused_parameters_true"
    )
    assert strategy("router=hash", "balance=none") == "auto"  # one device: no DDP
    assert strategy("trainer.strategy=ddp") == "ddp"  # a learned gate: plain DDP


def _rank_counts(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank: two micro-batches of global-scope counts through GlobalScopeState."""
    from testbed.scope import GlobalScopeState

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        state = GlobalScopeState()
        state.start_step()
        local = [torch.tensor([1.0, 0, 2, 0]) * (rank + 1), torch.tensor([0.0, 3, 0, 1]) * (rank + 1)]
        totals = []
        for counts in local:
            state.next_micro_batch()
            totals.append(state.accumulate(("lbl", 0), counts))
        torch.save(totals, Path(out_dir) / f"counts_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_scope_counts_are_summed_over_ranks_and_running_over_micro_batches(tmp_path):
    """Balancing scope: every rank sees the all-reduced counts, running over the step's micro-batches.
    Rank r's counts are (r + 1) x the base counts, so the sum over 2 ranks is 3 x."""
    mp.start_processes(
        _rank_counts, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    first, second = torch.tensor([3.0, 0, 6, 0]), torch.tensor([3.0, 9, 6, 3])
    for rank in range(2):
        totals = torch.load(tmp_path / f"counts_rank{rank}.pt")
        assert torch.equal(totals[0], first) and torch.equal(totals[1], second)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


@pytest.mark.slow
def test_a_killed_rank_stops_its_partner_and_the_pair_resumes(synth_mix, tmp_path):
    """SIGKILL to rank 1 of a 2-process DDP run (after its first checkpoint): rank 0 does not hang on the
    next collective; it stops with an error (no 'finished' summary), and the same command with resume=auto
    finishes all steps from the last checkpoint."""
    run_dir = tmp_path / "run"
    args = [
        *synth_overrides(synth_mix, "trainer.max_steps=60", "trainer.val_check_interval=5"),
        "trainer.num_threads=1",
        "metrics.plots=false",
        "data.batch_composition=homogeneous",
        *DDP,
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rank0 = subprocess.Popen([str(TRAIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while not checkpoint.exists() and time.time() < deadline and rank0.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), rank0.communicate()[0].decode()[-3000:]
    rank1 = [c for c in _children(rank0.pid) if "LOCAL_RANK=1" in Path(f"/proc/{c}/environ").read_text()]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    output = rank0.communicate(timeout=180)[0].decode()
    assert rank0.returncode == 2, output[-3000:]
    assert "another process of this 2-process run stopped" in output and "resume=auto" in output
    assert "Traceback" not in output
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["peer_lost"] is True
    saved = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < saved < 60

    resumed, _ = _train(
        run_dir, synth_mix, *DDP, "trainer.max_steps=60", "trainer.val_check_interval=5", "resume=auto"
    )
    assert resumed["status"] == "finished" and resumed["steps"] == 60


def test_lightnings_process_observer_leaves_rank_zero_time_to_report_a_lost_peer():
    """A multi-process run makes Lightning's launcher start an observer that looks at the other ranks every
    PEER_REPORT_S (30 s), not every 5 s: rank 0's own collective error (PeerLost, exit 2, an 'interrupted'
    summary) comes first, the observer's SIGKILL stays the backstop."""
    from lightning.fabric.strategies.launchers import subprocess_script

    from testbed.train.checkpoint import PEER_REPORT_S, _PatientObserver, let_peers_report_first

    original = subprocess_script._ChildProcessObserver
    try:
        let_peers_report_first()
        observer = subprocess_script._ChildProcessObserver(main_pid=os.getpid(), child_processes=[])
        assert isinstance(observer, _PatientObserver) and isinstance(observer, original)
        assert observer._sleep_period == PEER_REPORT_S == 30
    finally:
        subprocess_script._ChildProcessObserver = original
