"""A real one-node SLURM (munge + slurmctld + slurmd from Debian's packages) for the cluster tests.

The configuration must sit at /etc/slurm/slurm.conf (the slurm executor's job step drops SLURM_CONF before its
inner srun). Everything else (pid files, state, spool, logs) lives under one state directory, so the daemons can
be found again, and stopped, by their pid files.

Starting is idempotent: a machine may be reused, so daemons that already run with this configuration are
adopted rather than started twice, and daemons left running with another configuration are restarted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MUNGED = "/usr/sbin/munged"
MUNGE_PID = Path("/run/munge/munged.pid")
DEFAULT_STATE = Path("/var/tmp/tamperlab-slurm")
PARTITION = "main"


def _run(*command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def _installed() -> bool:
    return all(shutil.which(tool, path="/usr/sbin:/usr/bin") for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def _alive(pid_file: Path, name: str) -> int | None:
    """The pid in `pid_file` if that process is alive and is `name`, else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm == name else None


def _stop(pid_file: Path, name: str, timeout: float = 20) -> None:
    pid = _alive(pid_file, name)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def can_run() -> str | None:
    """None when this machine can host the cluster, else why not (the tests skip with it)."""
    if os.geteuid() != 0:
        return "a real SLURM needs root (to install and start munge, slurmctld and slurmd)"
    if not _installed() and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu only)"
    return None


def install() -> None:
    """Install SLURM and munge from the distribution, only if they are missing."""
    if _installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ("apt-get", "install", "-y", "--no-install-recommends", *PACKAGES)
    if _run(*command, check=False, timeout=600, env=env).returncode != 0:
        _run("apt-get", "update", timeout=600, env=env)  # a fresh machine may have no package lists yet
        _run(*command, timeout=600, env=env)


def _memory_mb() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["MemTotal"].split()[0]) // 1024


class SlurmCluster:
    """One node (this host, all of its CPUs) in one partition, `main`; root submits, no accounting daemon."""

    def __init__(self, state: Path = DEFAULT_STATE):
        self.state = state
        self.host = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.started: list[str] = []

    @property
    def log_dir(self) -> Path:
        return self.state / "log"

    def _pid(self, daemon: str) -> Path:
        return self.state / "run" / f"{daemon}.pid"

    def config(self) -> str:
        b = self.state
        return "\n".join([
            "# Written by tests/slurm_cluster.py for tamperlab's SLURM tests.",
            "ClusterName=ci",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerType=sched/backfill",
            f"SlurmctldPidFile={self._pid('slurmctld')}",
            f"SlurmdPidFile={self._pid('slurmd')}",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/slurmd",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd.log",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # RealMemory below: counted, not checked against the machine
            # Without slurmdbd, squeue and scontrol see a job only this long after it ends (600 s would be
            # enough for Snakemake's status checks; the tests also read the jobs back after a long run).
            "MinJobAge=3600",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    @property
    def memory_mb(self) -> int:
        """What the node offers: at least 64 GB, whatever the machine has (slurmd is told to believe the
        config), so that jobs asking for a small model's memory (config resources:) schedule on a small CI
        runner too. Nothing enforces it (no cgroups): SLURM only counts it."""
        return max(_memory_mb(), 65536)

    def _start_munge(self) -> None:
        if _run("sh", "-c", "munge -n | unmunge", check=False).returncode == 0:
            return  # a munged already answers (ours from an earlier run, or the machine's)
        if not Path("/etc/munge/munge.key").exists():
            _run("mungekey", "--create")
            _run("chown", "munge:munge", "/etc/munge/munge.key")
        _run("install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge")
        _run("runuser", "-u", "munge", "--", MUNGED, "--force")
        self.started.append("munged")

    def start(self, timeout: float = 90) -> None:
        install()
        config = self.config()
        previous = SLURM_CONF.read_text() if SLURM_CONF.exists() else None
        if previous != config:  # daemons of another configuration (e.g. an earlier run's) must not be adopted
            _stop(self._pid("slurmd"), "slurmd")
            _stop(self._pid("slurmctld"), "slurmctld")
            SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
            SLURM_CONF.write_text(config)
        for sub in ("run", "state", "spool/slurmd", "log"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            if _alive(self._pid(daemon), daemon) is None:
                _run(f"/usr/sbin/{daemon}")
                self.started.append(daemon)
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            result = _run("sinfo", "-h", "-o", "%T", check=False, timeout=15)
            state = result.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            if state.startswith(("down", "drain")):  # left so by a crashed earlier run
                _run("scontrol", "update", f"NodeName={self.host}", "State=RESUME", check=False)
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.log_dir.glob("*.log")))
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f} s (sinfo: {state!r})\n{logs}")

    def stop(self) -> None:
        """Stop slurmd and slurmctld by their pid files, and munged if this object started it."""
        _stop(self._pid("slurmd"), "slurmd")
        _stop(self._pid("slurmctld"), "slurmctld")
        if "munged" in self.started:
            _stop(MUNGE_PID, "munged")
        self.started.clear()

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld still remembers (MinJobAge), by id: `scontrol show job`'s fields."""
        result = _run("scontrol", "-o", "show", "job", check=False)
        jobs = {}
        for line in result.stdout.splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs
