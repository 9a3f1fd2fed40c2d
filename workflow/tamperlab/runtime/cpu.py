"""A job's CPU threads: the rule's `threads` (Snakemake puts them in OMP_NUM_THREADS), lowered to the cores that
are idle when the job starts.

Torch's OpenMP threads spin while they wait for one another: when another process holds one of their cores, a
2-thread step ran 3.5x slower than idle here, where one thread kept its idle speed (docs/benchmarks.md). So a job
that asks for several threads first looks at how many of the cores it may run on are idle and takes no more than
those. Under native numerics the thread count does not change a result (one epoch of the default organism's build
gave byte-identical weights on one thread and on two).

Under portable numerics it does: MKL's COMPATIBLE branch splits some small products (a 48-row batch through a
300-wide output layer) differently on one thread and on two, with or without its STRICT flag (measured here; MKL
documents a fixed thread count as a condition of reproducible results). So a portable job keeps the threads its
rule asks for, and where cores are busy its threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE: 2 threads
beside a busy core ran 504 ms a step against 847 spinning; benchmarks/thread_policy.py) instead of being fewer;
a command run by hand, with no OMP_NUM_THREADS, takes one thread, not however many cores the machine has.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _busy_and_total(cpus: set[int], stat: str) -> tuple[int, int]:
    """Busy and total jiffies of these CPUs, from /proc/stat's per-CPU lines (idle and iowait count as idle)."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + values[4]
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def _read_stat() -> str:
    with open("/proc/stat") as stat:
        return stat.read()


def idle_cores(interval: float = 0.25, read=_read_stat, cpus: set[int] | None = None) -> float | None:
    """How many of this process's CPUs (its affinity: a SLURM job's cpuset) were idle over `interval` seconds;
    None where /proc/stat or the affinity cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0) if cpus is None else cpus
        busy0, total0 = _busy_and_total(cpus, read())
        time.sleep(interval)
        busy1, total1 = _busy_and_total(cpus, read())
    except (OSError, AttributeError):  # no /proc/stat, no sched_getaffinity
        return None
    if total1 <= total0:
        return None
    return len(cpus) * (1 - (busy1 - busy0) / (total1 - total0))


def threads_for(requested: int, idle: float | None) -> int:
    """The threads to take: the requested ones, but no more than the idle cores (rounded; at least one)."""
    if idle is None:
        return requested
    return max(1, min(requested, int(idle + 0.5)))


def fit_threads(environ=os.environ, probe=idle_cores, portable: bool = False) -> int | None:
    """Before torch is imported: lower OMP_NUM_THREADS (and MKL's) to the idle cores, or, under portable numerics,
    keep them and let the threads sleep while they wait. Returns the threads taken, or None where the job asks for
    one thread or none (nothing to fit, no probe)."""
    if portable and not environ.get("OMP_NUM_THREADS"):  # a command run by hand: the bits depend on the threads,
        for name in THREAD_VARIABLES:                       # so one, not however many cores this machine has
            environ[name] = "1"
    try:
        requested = int(environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    if requested <= 1:
        return None
    idle = probe()
    threads = threads_for(requested, idle)
    if threads < requested and portable:
        log.info("%.1f cores idle: %d sleeping thread(s) (portable numerics keep the thread count)", idle, requested)
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return requested
    if threads < requested:
        log.info("%.1f cores idle: %d thread(s), not the %d asked for", idle, threads, requested)
        for name in THREAD_VARIABLES:
            environ[name] = str(threads)
    return threads
