"""torch's CPU threads for a run: `trainer.num_threads` when given, else chosen from the machine's load.

torch's default is one thread per core. Alone on a 2-core machine that is the fastest choice (a step takes
0.64x the time of one thread), but next to another busy process each step takes 2.5x as long as with one
thread (benchmarks/README.md, "CPU threads"): a 3-minute run became 74 minutes. So a CPU run on the default
(`trainer.num_threads=0`) counts the other processes that want a CPU as it starts and takes the cores they
leave free, at least one, and logs the choice in one line.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that set torch's thread count: when one is set, the user has chosen."""


def runnable_elsewhere(samples: int = 5, interval: float = 0.05) -> int | None:
    """How many other processes want a CPU right now: the median over a few samples of the kernel's count of
    runnable tasks (/proc/loadavg, 4th field) minus this process. None where that file does not exist."""
    counts = []
    for _ in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return None
        counts.append(max(int(running) - 1, 0))
        time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def load_average() -> float | None:
    """The 1-minute load average, None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def other_processes(busy_now: int | None, load: float | None) -> int | None:
    """Other processes using the CPU: the larger of those runnable now and the 1-minute load average less
    one (this process, whose imports have kept a core busy just before). None when neither is known."""
    known = [n for n in (busy_now, None if load is None else math.floor(load) - 1) if n is not None]
    return max(0, *known) if known else None


def choose_threads(cores: int, busy: int | None, processes: int = 1) -> int:
    """Threads per process: the cores the `busy` other processes leave free, shared by this run's
    `processes` (CPU DDP ranks), at least one. Unknown load (`busy` None): all cores."""
    free = cores if busy is None else cores - busy
    return max(1, free // max(processes, 1))


def cpu_processes(trainer) -> int:
    """Training processes of a CPU run on this machine (trainer.devices as a count or a list)."""
    devices = trainer.devices
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, int) and devices > 1:
        return devices
    return 1


def describe_load(load: float | None, cores: int) -> str:
    return f"load {load:.1f} on {cores} cores" if load is not None else f"{cores} cores"


HINT = "set trainer.num_threads to choose"


def set_cpu_threads(run, verbose: bool = True) -> int | None:
    """Set torch's CPU threads for `run` and log the choice once (`verbose`: this is the process that
    speaks); returns the threads set, or None where torch's default is kept (GPU runs)."""
    import torch

    t = run.trainer
    cores = os.cpu_count() or 1
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
        if verbose:
            log.info("threads: %d (trainer.num_threads)", t.num_threads)
        return t.num_threads
    if t.accelerator not in ("cpu", "auto") or (t.accelerator == "auto" and torch.cuda.is_available()):
        return None
    env = next((name for name in THREAD_ENV if os.environ.get(name, "").strip()), None)
    if env is not None:  # chosen in the environment (OMP_NUM_THREADS=1 ...): torch follows it already
        threads = torch.get_num_threads()
        if verbose:
            log.info("threads: %d (%s=%s; %s)", threads, env, os.environ[env].strip(), HINT)
        return threads
    load = load_average()
    busy = other_processes(runnable_elsewhere(), load)
    threads = choose_threads(cores, busy, cpu_processes(t))
    torch.set_num_threads(threads)
    if verbose:
        log.info("threads: %d (%s; %s)", threads, describe_load(load, cores), HINT)
    return threads
