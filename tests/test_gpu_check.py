"""tests/gpu_check.sh, the first-GPU check, as an artefact: it parses, is shellcheck-clean, and on
a machine without a GPU says so in its JSON and Markdown instead of crashing (exit code 1)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from runs import REPO


def test_gpu_check_script_parses_and_is_shellcheck_clean() -> None:
    script = REPO / "tests" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: run .ci/run or `apt-get install -y shellcheck`")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


def test_without_a_gpu_the_check_reports_why_and_fails(tmp_path: Path) -> None:
    """No CUDA device: exit 1, both result files written, the reason in them, nothing run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("not run: this machine has a GPU (the check itself runs there)")
    result = subprocess.run(["bash", "tests/gpu_check.sh", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {"pytest": "failed", "tiny_fp8": "not run", "memory": "not run",
                        "throughput": "not run", "boundary": "not run"}
    assert "no CUDA device is visible" in (tmp_path / "gpu_check.md").read_text()
