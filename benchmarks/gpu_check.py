"""`make gpu-check`: the first GPU figures in one prepared command, every stage time-boxed.

On a bare CUDA machine (Python with torch, lightning, tokenizers, matplotlib, scipy, einops, rich; no Hydra)
it installs the wheels carried in `.whl/` (benchmarks/fetch_gpu_wheels.sh) into /tmp/site, then runs:
  pytest     `pytest -m gpu`: sync-free MoE path, grouped == loop in bf16, every router
  moe_layer  benchmarks/moe_layer.py on the GPU grid: grouped vs loop, MoE vs dense, TFLOP/s
             and model=small's and model=base's own layers (fp32 under autocast) against their dense twins
  step_time  model=small top-4 training steps, eager vs compiled: step ms, tokens/s, MFU
  profile    a few compiled model=small steps under torch.profiler: top kernels, time per category
  train      a short real run (trainer=gpu model=small top-4, no checkpoint): Lightning + Hydra + data
Each stage is a subprocess with its own time limit (and the whole check a deadline, 8 minutes by
default), so one slow stage cannot eat the others; a failure is recorded and the next stage runs. Its
output streams into gpu_check.log as it comes, and gpu_check.json is rewritten after every stage, so a
check cut short still leaves what it measured. When the environment probe fails (no Hydra: the wheels
were not carried; no importable training code) the check stops at once with exit 2 before any stage.
Written to --out (default $OUT if set, else benchmarks/results/gpu/), at most 8 files:
  gpu_check.json (every stage: status, seconds, command, output tail; the environment), gpu_check.md
  (a short table), pytest.json, moe_layer.json, step_time.json, profile.json, summary.json (the run's),
  gpu_check.log.
`--dry-run` runs the same stages on CPU at tiny sizes (model=micro, a few steps, moe_layer --tiny).
    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--deadline 480]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(tempfile.gettempdir()) / "site"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peak by card (vendor datasheets, no sparsity) for MFU; other cards get no MFU."""

GPU_MODEL = ["model=small", "router.top_k=4"]


def stage_plan(dry_run: bool, out: Path, work: Path, peak: float | None) -> list[dict]:
    """The stages: name, command, time limit (seconds). Dry run: the same scripts at CPU sizes."""
    python = sys.executable
    # the shipped sample: a token store built in seconds (the large mix's takes a minute of device time),
    # and the data of the GPU figures measured so far
    cache = f"data=shipped data.cache_dir={work / 'cache'}"
    if dry_run:
        steps_common = "model=micro trainer=cpu data.seq_len=64 data.batch_size=4 " + cache
        step_variants = ["trainer.compile=false"]
        train = [
            "data=shipped",
            "trainer=cpu",
            "model=micro",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "data.seq_len=64",
            "data.batch_size=4",
            "data.val_tokens_per_domain=256",
            "metrics.stiffness_batches=1",
            "metrics.plots=false",
        ]
        moe_args = ["--tiny", "--models", "--repeats", "2"]
        steps, warmup = 2, 1
        profile = [steps_common, "--steps", "2", "--warmup", "1"]
        limits = {"pytest": 60, "moe_layer": 60, "step_time": 90, "profile": 60, "train": 120}
    else:
        steps_common = " ".join([*GPU_MODEL, "trainer=gpu", "data.seq_len=1024", "data.batch_size=32", cache])
        step_variants = ["trainer.compile=false", "trainer.compile=true"]
        train = [
            "data=shipped",
            "trainer=gpu",
            *GPU_MODEL,
            "trainer.max_steps=150",
            "trainer.val_check_interval=150",
            "trainer.log_every_n_steps=25",
            "data.seq_len=1024",
            "data.batch_size=16",
            "data.val_tokens_per_domain=16384",
        ]
        moe_args = ["--no-compile", "--models", "--repeats", "20", "--budget", "40"]
        steps, warmup = 20, 6
        profile = [steps_common + " trainer.compile=true", "--steps", "4", "--warmup", "8"]
        limits = {"pytest": 90, "moe_layer": 90, "step_time": 120, "profile": 75, "train": 90}
    step_cmd = [python, "benchmarks/step_time.py", "--common", steps_common, "--steps", str(steps)]
    step_cmd += ["--warmup", str(warmup), "--json", str(out / "step_time.json")]
    for variant in step_variants:
        step_cmd += ["--variant", variant]
    if peak:
        step_cmd += ["--peak-tflops", str(peak)]
    run_dir = work / "train"
    return [
        {
            "name": "pytest",
            "command": [
                python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                "tests/test_gpu.py", "tests/test_experts.py", f"--junitxml={work / 'pytest.xml'}",
            ],
            "limit": limits["pytest"],
        },
        {
            "name": "moe_layer",
            "command": [python, "benchmarks/moe_layer.py", *moe_args, "--json", str(out / "moe_layer.json")],
            "limit": limits["moe_layer"],
        },
        {"name": "step_time", "command": step_cmd, "limit": limits["step_time"]},
        {
            "name": "profile",
            "command": [
                python, "benchmarks/profile_step.py", "--common", profile[0], *profile[1:],
                "--json", str(out / "profile.json"),
            ],
            "limit": limits["profile"],
        },
        {
            "name": "train",
            "command": [
                python, "-m", "testbed.train.cli", *train, f"data.cache_dir={work / 'cache'}",
                "trainer.progress_bar=false", "trainer.enable_checkpointing=false",
                f"hydra.run.dir={run_dir}",
            ],
            "limit": limits["train"],
            "run_dir": run_dir,
        },
    ]  # fmt: skip


def install_wheels(env: dict, log) -> dict:
    """Install .whl/*.whl into /tmp/site when Hydra is missing; returns what was done."""
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    probe = [sys.executable, "-c", "import hydra, omegaconf"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return {"wheels": [Path(w).name for w in wheels], "installed": False, "reason": "hydra importable"}
    if not wheels:
        return {"wheels": [], "installed": False, "reason": "hydra missing and no .whl/*.whl carried"}
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    log(result.stdout + result.stderr)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH", "")]))
    return {"wheels": [Path(w).name for w in wheels], "installed": result.returncode == 0, "site": str(SITE)}


def environment(env: dict) -> dict:
    """Versions, the device, and whether the training CLI imports with wandb and datasets blocked."""
    probe = """
import json, sys
sys.modules["wandb"] = None  # an import of wandb (or datasets) would now fail
sys.modules["datasets"] = None
import torch, lightning, hydra, omegaconf
import testbed.train.cli, testbed.data.datamodule
cuda = torch.cuda.is_available()
print(json.dumps({
    "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
    "lightning": lightning.__version__, "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "imports_without_wandb_and_datasets": True,
}))
"""
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_stage(stage: dict, limit: float, env: dict, log) -> dict:
    """Run one stage in its own process group, its output streamed into the log line by line; kill the
    whole group at the limit."""
    log(f"\n===== {stage['name']} (limit {limit:.0f} s): {' '.join(stage['command'])}")
    start = time.perf_counter()
    process = subprocess.Popen(
        stage["command"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: compile workers die with it
    )
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:
            lines.append(line)
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        process.wait(timeout=limit)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = "timeout"
    reader.join(timeout=10)
    seconds = round(time.perf_counter() - start, 1)
    log(f"===== {stage['name']}: {status} in {seconds} s (exit {process.returncode})")
    return {
        "name": stage["name"],
        "status": status,
        "seconds": seconds,
        "limit_s": round(limit),
        "returncode": process.returncode,
        "command": stage["command"],
        "output_tail": "".join(lines)[-3000:],
    }


def pytest_counts(junit: Path) -> dict:
    """passed / failed / skipped counts and the failing tests, from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    result = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"] += 1
            result["failures"].append(name)
        elif case.find("skipped") is not None:
            result["skipped"] += 1
        else:
            result["passed"] += 1
    return result


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def peer_cell(row: dict, peer: str) -> str:
    """A peer's ms, or why it was not measured."""
    if row.get(f"{peer}_ms") is not None:
        return str(row[f"{peer}_ms"])
    return f"not measured ({row.get(f'{peer}_status', 'no status')[:60]})"


def markdown(report: dict) -> str:
    """A short table of the figures (the JSON files hold everything)."""
    env = report["environment"]
    lines = [
        f"# gpu-check {'(dry run, CPU) ' if report['dry_run'] else ''}on {env.get('device', '?')}",
        "",
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, capability {env.get('capability')}; "
        f"{report['seconds']:.0f} s in all",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
        *(f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in report["stages"]),
    ]
    tests = report.get("pytest") or {}
    if tests:
        lines += ["", f"pytest -m gpu: {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['skipped']} skipped {tests['failures'] or ''}"]  # fmt: skip
    layer = report.get("moe_layer") or {}
    if layer.get("rows"):
        lines += [
            "",
            f"MoE layer forward + backward ({layer['dtype']}, compile {layer.get('compile')}):",
            "",
            "| d | E | K | tokens | loop ms | grouped ms | dense ms | grouped TFLOP/s | grouped/loop "
            "| MoE/dense |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in layer["rows"]:
            lines.append(
                f"| {r['d']} | {r['experts']} | {r['top_k']} | {r['tokens']} | {r['loop_ms']} | "
                f"{r['grouped_ms']} | {r['dense_ms']} | {r['grouped_tflops']} | {r['grouped_over_loop']} | "
                f"{r['moe_over_dense']} |"
            )
    if layer.get("models"):
        lines += [
            "",
            "Each model's own MoE layer against its dense twin (forward + backward, input as in training):",
            "",
            "| model | d | E | K | tokens | input | MoE ms | dense ms | dense/MoE | extra ms per K "
            "| HF grouped_mm ms | torchtitan ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in layer["models"]:
            lines.append(
                f"| {r['model']} | {r['d']} | {r['experts']} | {r['top_k']} | {r['tokens']} | {r['input']} | "
                f"{r['moe_ms']} | {r['dense_ms']} | {r['moe_over_dense']} | {r['extra_ms_per_k']} | "
                f"{peer_cell(r, 'hf')} | {peer_cell(r, 'torchtitan')} |"
            )
    steps = report.get("step_time") or {}
    if steps.get("rows"):
        lines += ["", f"Training step ({steps['common']}):", "", "| variant | step ms | tokens/s | MFU |"]
        lines.append("|---|---|---|---|")
        for r in steps["rows"]:
            lines.append(f"| {r['variant']} | {r['step_ms']} | {r['tokens_per_s']:,.0f} | {r['mfu']} |")
    profile = report.get("profile") or {}
    if profile.get("top"):
        categories = ", ".join(f"{k} {v}" for k, v in profile["ms_per_step_by_category"].items())
        lines += [
            "",
            f"Profile ({profile['timing']}, compile {profile['compile']}): step {profile['step_ms']} ms, "
            f"{profile['tokens_per_s']:,.0f} tokens/s; ms per step by category: {categories}",
            "",
            "| kernel | category | ms/step | calls/step | share |",
            "|---|---|---|---|---|",
            *(
                f"| {t['name'][:80]} | {t['category']} | {t['ms_per_step']} | {t['calls_per_step']} "
                f"| {t['share']} |"
                for t in profile["top"][:10]
            ),
        ]
    summary = report.get("summary") or {}
    if summary:
        tokens, wall = summary.get("tokens_seen", 0), summary.get("wall_time_s") or 0
        rate = f", {tokens / wall:,.0f} tokens/s over the whole run" if wall else ""
        lines += [
            "",
            f"Training run: {summary.get('steps')} steps, {tokens:,} tokens, {wall} s{rate}, "
            f"val/loss {summary.get('val/loss')}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    parser.add_argument("--out", type=Path, help="default: $OUT if set, else benchmarks/results/gpu/")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log_file = open(out / "gpu_check.log", "w")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    env = dict(os.environ)
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even where a GPU exists
        env.setdefault("OMP_NUM_THREADS", "1")
    wheels = install_wheels(env, log)
    env_info = environment(env)
    log(json.dumps({"wheels": wheels, "environment": env_info}, indent=2))
    device = env_info.get("device", "")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    report = {
        "dry_run": args.dry_run,
        "seconds": 0.0,
        "deadline_s": args.deadline,
        "peak_bf16_tflops": peak,
        "wheels": wheels,
        "environment": env_info,
        "stages": [],
        "complete": False,
    }

    def write(final: bool = False) -> None:
        """gpu_check.json (and .md) as they stand: rewritten after every stage."""
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["pytest"] = pytest_counts(work / "pytest.xml")
        for name in ("moe_layer", "step_time", "profile", "summary"):
            report[name] = read_json(out / f"{name}.json")
        report["complete"] = final
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (out / "gpu_check.md").write_text(markdown(report))

    if "error" in env_info:  # a check without its environment would waste every stage's device time
        write()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)
        print(
            "gpu-check: the environment probe failed, no stage run (see gpu_check.json 'environment'). "
            "Carry the wheels Hydra needs (make gpu-wheels, then carry .whl) or install the project.",
            file=sys.stderr,
        )
        return 2
    deadline = start + args.deadline
    for stage in stage_plan(args.dry_run, out, work, peak):
        left = deadline - time.perf_counter() - 5
        if left < 10:
            report["stages"].append(
                {"name": stage["name"], "status": "skipped", "seconds": 0, "reason": "deadline"}
            )
        else:
            report["stages"].append(run_stage(stage, min(stage["limit"], left), env, log))
            if "run_dir" in stage and (stage["run_dir"] / "summary.json").exists():
                shutil.copy(stage["run_dir"] / "summary.json", out / "summary.json")
        write()
    (out / "pytest.json").write_text(json.dumps(report["pytest"], indent=2))
    write(final=True)
    log(markdown(report))
    log_file.close()
    shutil.rmtree(work, ignore_errors=True)
    failed = [s["name"] for s in report["stages"] if s["status"] != "ok"]
    if failed:
        print(f"gpu-check: not ok: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
