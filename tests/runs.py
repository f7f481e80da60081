"""Launching real `megatron_step` processes from tests: commands, timeouts, clean kills.

Every process starts in its own session, and a timeout (or a test's deliberate kill) signals the
whole process *tree*: torchrun starts its workers in sessions of their own, so signalling the
launcher's process group alone would leave the workers running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(config: Path | str, sets: list[str], nproc: int = 1,
                  extra_args: list[str] | None = None) -> list[str]:
    """`python -m megatron_step.train CONFIG --set ...`, under torchrun when nproc > 1."""
    args = [str(config), *(a for item in sets for a in ("--set", item)), *(extra_args or [])]
    if nproc == 1:
        return [sys.executable, "-m", "megatron_step.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "megatron_step.train", *args]


def start(command: list[str]) -> subprocess.Popen:
    """Start a command in its own process group with merged, unbuffered text output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to a process and all its descendants (children first gathered, then hit)."""
    try:
        parent = psutil.Process(proc.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(sig)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for a process; on timeout kill its whole tree and fail the test."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(proc.args[:6])}... did not finish within {timeout} s:\n"
                    f"{output[-3000:]}")
    return proc.returncode, output


def run_ok(command: list[str], timeout: float = 300) -> str:
    """Run a command to completion and require exit code 0; returns its output."""
    code, output = finish(start(command), timeout)
    assert code == 0, output[-4000:]
    return output
