"""A real one-node SLURM cluster on localhost for tests: munged + slurmctld + slurmd (Debian 22.05).

`LocalSlurm.start(root)` writes a private configuration under `root` and starts the daemons;
`stop()` cancels what is left of the jobs and stops the daemons by the pids in their pid files
(never by name: other test runs on the same machine may have their own cluster). Nothing is
shared with another cluster: munged gets its own socket (`AuthInfo=socket=`), the daemons their
own free ports, state, spool and log files under `root`; clients find the cluster through
`SLURM_CONF` in `env`.

The node advertises 8 fake GPUs (gres files that are not devices: slurmd logs an error for each
and counts them anyway), so recipe headers with `--gpus-per-node=8` are accepted as written.
`cred_expire=5` lets a requeued job start again after about 6 s instead of SLURM's default 120 s;
the job completion log (`jobcomp.txt`) records every job end and requeue with its times.

Facts behind it: ../shared/docs/SLURM_LOCAL.md (verified recipe).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "unmunge", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = "slurmctld slurmd slurm-client munge shellcheck"
FAKE_GPUS = 8
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmError(RuntimeError):
    """SLURM is missing, did not start, or a job did not reach a final state in time."""


def which(name: str) -> str | None:
    """Path of a SLURM/munge binary (daemons live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    """The daemons and clients that are not installed."""
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def parse_record(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of a one-line SLURM record (`scontrol show job -o`, jobcomp/filetxt)."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (daemons are not our children to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop_pids(pid_files: Sequence[Path], timeout: float = 10.0) -> None:
    """SIGTERM the daemons named by `pid_files`, SIGKILL those still there after `timeout`."""
    pids = []
    for pid_file in pid_files:
        try:
            pids.append(int(pid_file.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    pids = [pid for pid in pids if _alive(pid)]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in filter(_alive, pids):
        os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalSlurm:
    """A running one-node cluster; see the module docstring."""

    root: Path
    node: str

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.root / "jobcomp.txt"

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, root: Path, timeout: float = 60.0) -> LocalSlurm:
        """Configure and start the daemons under `root`; wait until the node is idle.

        Raises:
            SlurmError: binaries missing (names the packages to install) or a daemon failed
                (with the tail of its log).
        """
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"SLURM/munge binaries missing: {', '.join(missing)}. Run .ci/run "
                             f"or `apt-get install -y {PACKAGES}` (Debian) to install them")
        root.mkdir(parents=True, exist_ok=True)
        hardware = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True,
                                  check=True, timeout=30).stdout.splitlines()[0]
        cluster = cls(root=root, node=parse_record(hardware)["NodeName"])
        cluster._write_config(hardware)
        try:
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self, hardware: str) -> None:
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir(exist_ok=True)
        gpus = [root / f"gpu{i}" for i in range(FAKE_GPUS)]
        for path in gpus:
            path.touch()
        (root / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu File={root}/gpu[0-{FAKE_GPUS - 1}]\n")
        settings = {
            "ClusterName": "pytest", "SlurmctldHost": self.node,
            "SlurmUser": "root", "SlurmdUser": "root",
            "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
            "StateSaveLocation": root / "state", "SlurmdSpoolDir": root / "spool",
            "SlurmctldPidFile": root / "slurmctld.pid", "SlurmdPidFile": root / "slurmd.pid",
            "SlurmctldLogFile": root / "slurmctld.log", "SlurmdLogFile": root / "slurmd.log",
            "AuthType": "auth/munge", "CredType": "cred/munge",
            "AuthInfo": f"socket={root / 'munge.sock'},cred_expire=5",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "MpiDefault": "none", "ReturnToService": 2, "JobRequeue": 1,
            "SchedulerType": "sched/backfill", "SchedulerParameters": "sched_interval=1",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/filetxt", "JobCompLoc": self.jobcomp,
            "KillWait": 5, "GresTypes": "gpu",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        node = re.sub(r"\s*UpTime=\S+", "", hardware)
        lines += [f"{node} Gres=gpu:{FAKE_GPUS} State=UNKNOWN",
                  f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_daemons(self, timeout: float) -> None:
        root, sock = self.root, str(self.root / "munge.sock")
        subprocess.run([which("munged"), "--force", f"--socket={sock}",
                        f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                        f"--seed-file={root / 'munged.seed'}"], check=True, timeout=30)
        credential = subprocess.run([which("munge"), "-n", "-S", sock], capture_output=True,
                                    timeout=30)
        check = subprocess.run([which("unmunge"), "-S", sock], input=credential.stdout,
                               capture_output=True, timeout=30)
        if check.returncode != 0:
            raise SlurmError(f"munged does not work: {check.stderr.decode()}\n"
                             f"{_tail(root / 'munged.log')}")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([which(daemon), "-f", str(self.conf)], env=self.env, check=True,
                           timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmError(f"node {self.node} not idle after {timeout:.0f} s (state {state!r})\n"
                         f"slurmctld.log:\n{_tail(root / 'slurmctld.log')}\n"
                         f"slurmd.log:\n{_tail(root / 'slurmd.log')}")

    def stop(self) -> None:
        """Cancel remaining jobs, then stop slurmd, slurmctld and munged by their pid files."""
        if (self.root / "slurmctld.pid").is_file():
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run(
                    "squeue", "-h", check=False).stdout.strip():
                time.sleep(0.3)
        _stop_pids([self.root / f"{name}.pid" for name in DAEMONS])

    def run(self, *args: str, check: bool = True, timeout: float = 60.0,
            env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client (or any command) against this cluster; text output captured."""
        command = [which(args[0]) or args[0], *args[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})}, cwd=cwd)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}"
                             f"{result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> int:
        """Submit a batch job (`sbatch --parsable ARGS`); returns its job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The controller's record of a job (`scontrol show job -o`)."""
        return parse_record(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait(self, job_ids: Sequence[int], timeout: float) -> dict[int, dict[str, str]]:
        """Wait until every job is in a final state; returns their records.

        Raises:
            SlurmError: a job is not finished after `timeout` seconds (its record is shown).
        """
        deadline = time.monotonic() + timeout
        while True:
            records = {job_id: self.job(job_id) for job_id in job_ids}
            if all(r.get("JobState") in FINAL_STATES for r in records.values()):
                return records
            if time.monotonic() > deadline:
                raise SlurmError(f"jobs not finished after {timeout:.0f} s: {records}")
            time.sleep(0.5)

    def completions(self) -> list[dict[str, str]]:
        """Job completion log records, oldest first (a requeue adds a PENDING record)."""
        if not self.jobcomp.is_file():
            return []
        return [parse_record(line) for line in self.jobcomp.read_text().splitlines() if line]
