"""A job's threads: the rule's, lowered to the idle cores when it starts (tamperlab.runtime.cpu)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tamperlab.runtime.cpu import fit_threads, idle_cores, threads_for


def _stat(cpu0: list[int], cpu1: list[int]) -> str:
    def line(name, values):
        return f"{name} " + " ".join(str(v) for v in values) + " 0 0"

    total = [a + b for a, b in zip(cpu0, cpu1, strict=True)]
    return "\n".join([line("cpu", total), line("cpu0", cpu0), line("cpu1", cpu1), "intr 1 2 3", "ctxt 9"])


def test_busy_and_idle_jiffies_are_summed_over_the_processes_cpus_only():
    stat = _stat([10, 0, 5, 80, 5, 0, 0, 0], [50, 0, 50, 0, 0, 0, 0, 0])

    def idle(cpus):  # from an idle start: this stat's busy and total jiffies are the interval's
        reads = iter([_stat([0] * 8, [0] * 8), stat])
        return idle_cores(interval=0, read=lambda: next(reads), cpus=cpus)

    assert idle({0, 1}) == pytest.approx(2 * (1 - 115 / 200))  # idle + iowait are idle; the aggregate line skipped
    assert idle({1}) == 0.0  # a cpuset (SLURM) counts its own CPUs: 100 busy of 100


def test_one_busy_core_of_two_leaves_one_idle():
    reads = iter([_stat([0] * 8, [0] * 8), _stat([100, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 100, 0, 0, 0, 0])])
    assert idle_cores(interval=0, read=lambda: next(reads), cpus={0, 1}) == 1.0


def test_threads_are_the_requested_ones_up_to_the_idle_cores():
    assert threads_for(2, 1.9) == 2  # an idle machine, a little noise
    assert threads_for(2, 1.0) == 1  # another process holds a core
    assert threads_for(2, 0.1) == 1  # at least one
    assert threads_for(4, 2.6) == 3
    assert threads_for(2, None) == 2  # no probe: as asked


def test_fit_threads_lowers_the_thread_variables_and_leaves_one_thread_jobs_unprobed():
    environ = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert fit_threads(environ, probe=lambda: 1.1) == 1
    assert environ == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    environ = {"OMP_NUM_THREADS": "2"}
    assert fit_threads(environ, probe=lambda: 2.0) == 2 and environ == {"OMP_NUM_THREADS": "2"}

    def never():
        raise AssertionError("a one-thread job must not wait for the probe")

    assert fit_threads({"OMP_NUM_THREADS": "1"}, probe=never) is None
    assert fit_threads({}, probe=never) is None


def test_the_probe_reads_this_machine():
    idle = idle_cores(interval=0.05)
    assert idle is not None and 0 <= idle <= len(os.sched_getaffinity(0)) + 1e-9


def test_a_job_beside_a_spinning_process_takes_fewer_threads_than_asked(tmp_path):
    """End to end through the real /proc/stat: with every CPU of this process busy spinning, a `tamperlab` command
    asked for more threads than there are idle cores takes fewer (its torch sees the lowered count)."""
    ncpu = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(ncpu)]
    try:
        code = ("import os; from tamperlab.runtime.cpu import fit_threads; "
                "fit_threads(); import torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
        env = {**os.environ, "OMP_NUM_THREADS": str(ncpu + 1), "MKL_NUM_THREADS": str(ncpu + 1)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    finally:
        for spinner in spinners:
            spinner.kill()
    omp, torch_threads = (int(v) for v in out.stdout.split())
    assert omp < ncpu + 1 and torch_threads == omp
