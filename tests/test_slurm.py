"""The SLURM scripts in slurm/, run by a real one-node SLURM cluster on localhost.

The recipe is submitted as written (its #SBATCH header; the node has 8 fake GPUs) with only
`--nodes=1`, `--output` and environment knobs changed: the tiny CPU config, two trainer
processes per node under torchrun, the venv's python. One job is pre-empted with USR1 mid-run:
it must save, requeue itself and finish every stage. The chained mode must run stage, growth and
stage jobs in dependency order and reproduce that job's losses exactly (the trainer resumes
exactly and offline growth equals online growth). The multi-node arithmetic is checked by dry
runs for 8 nodes x 8 GPUs.

SLURM missing is a failure (install with .ci/run), never a skip.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from slurm_cluster import LocalSlurm, SlurmError, free_port, which

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
RECIPE = "slurm/step_3stage_7b.sh"
JOB_NAME = "step-7b-3stage"  # the recipe's --job-name
TRAIN_STEPS = {1: 9, 2: 6}  # stage 1 runs 75% of its 12 planned steps, the last stage all
# Two processes per node train with tensor parallelism (TP=2); resumption is exact, which the
# loss comparisons need.
TINY_ARGS = ("--set parallel.tensor_model_parallel_size=2 "
             "--set stages[0].train_steps=12 --set stages[1].train_steps=6 "
             "--set train.micro_batch_size=2 --set train.global_batch_size=4 "
             "--set train.eval_interval=3 --set train.eval_iters=2 --set train.log_interval=3 "
             "--set logging.tensorboard=false")
JOB_TIMEOUT = 300.0  # seconds; the machine is shared, a job normally takes 20-30 s
PROGRESS = re.compile(r"stage (\d)/2 step (\d+)/(\d+) \| loss [0-9.]+")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A one-node cluster for this module; always stopped, also after a failure."""
    try:
        cluster = LocalSlurm.start(tmp_path_factory.mktemp("slurm"))
    except SlurmError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


def _clean_env(**knobs: str) -> dict[str, str]:
    """The test's environment without SLURM job variables (pytest may itself run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **knobs}


def _tiny_knobs(out_dir: Path) -> dict[str, str]:
    return {"CONFIG": "examples/tiny_cpu.yaml", "GPUS_PER_NODE": "2", "OUT_DIR": str(out_dir),
            "EXTRA_ARGS": TINY_ARGS, "MASTER_PORT": str(free_port())}


def _submit_recipe(slurm: LocalSlurm, out_dir: Path) -> int:
    return slurm.sbatch("--nodes=1", f"--output={out_dir.parent}/%x-%j.out", RECIPE,
                        env=_clean_env(**_tiny_knobs(out_dir)), cwd=REPO)


def _log(out_dir: Path, name: str, job_id: int) -> str:
    return (out_dir.parent / f"{name}-{job_id}.out").read_text(errors="replace")


def _losses(out_dir: Path) -> dict[int, float]:
    """Training loss per global step from metrics.jsonl (one record per step, resume-safe)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or reorders steps: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _assert_same_losses(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected)
    torch.testing.assert_close(torch.tensor([actual[s] for s in sorted(actual)]),
                               torch.tensor([expected[s] for s in sorted(expected)]),
                               atol=1e-6, rtol=0)


def _wait_for_training(slurm: LocalSlurm, job_id: int, metrics: Path) -> None:
    """Until the job has logged its first training step."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.is_file() and metrics.read_text().strip()):
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before training"
        assert time.monotonic() < deadline, f"job {job_id} did not start training in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def preempted(slurm: LocalSlurm, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[int, Path, str, dict[str, str]]:
    """The recipe submitted once and sent USR1 as soon as it trains, the way SLURM warns a job
    before its time limit (--signal=B:USR1@180 goes to the batch shell: `scancel --batch`).
    Returns (job id, out_dir, job log, final job record)."""
    out_dir = tmp_path_factory.mktemp("preempted") / "run"
    job_id = _submit_recipe(slurm, out_dir)
    _wait_for_training(slurm, job_id, out_dir / "metrics.jsonl")
    slurm.run("scancel", "--batch", "--signal=USR1", str(job_id))
    record = slurm.wait([job_id], 2 * JOB_TIMEOUT)[job_id]
    return job_id, out_dir, _log(out_dir, JOB_NAME, job_id), record


def test_scripts_pass_bash_n_and_shellcheck() -> None:
    """Every slurm/*.sh parses (`bash -n`) and is shellcheck-clean, following `source`s; the
    config the recipe defaults to exists. Guards against syntax errors and quoting bugs that
    only show on a cluster."""
    assert {p.name for p in SCRIPTS} >= {"common.sh", "step_3stage_7b.sh", "grow_checkpoint.sh",
                                         "submit_chain.sh"}
    shellcheck = which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: run .ci/run or `apt-get install -y shellcheck`")
    for script in SCRIPTS:
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"bash -n {script.name}: {parsed.stderr}"
    checked = subprocess.run([shellcheck, "-x", *(str(p.relative_to(REPO)) for p in SCRIPTS)],
                             capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    default = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", (REPO / RECIPE).read_text())
    assert default is not None and (REPO / default.group(1)).is_file()


def test_dry_run_prints_every_node_command(slurm: LocalSlurm) -> None:
    """DRY_RUN=1 for 8 nodes x 8 GPUs prints world size 64, one torchrun per node with node
    ranks 0..7, the first host as master, the job-derived port and the recipe's config, and
    launches nothing; TP > 1 sets CUDA_DEVICE_MAX_CONNECTIONS=1, a container adds pyxis flags,
    an impossible layout is a one-line error. Guards the multi-node arithmetic that a one-node
    cluster cannot exercise."""
    hosts = [f"gpu{i:02d}" for i in range(1, 9)]
    env = _clean_env(DRY_RUN="1", NODES="8", GPUS_PER_NODE="8", SLURM_JOB_NODELIST="gpu[01-08]",
                     SLURM_JOB_ID="4242", SLURM_CONF=str(slurm.conf))
    out = subprocess.run(["bash", RECIPE], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "world size  64 = 8 node(s) x 8 process(es) per node; TP 1 x PP 1 x DP 64" in text
    assert f"master      gpu01:24242 (first host of: {' '.join(hosts)})" in text
    assert "CUDA_DEVICE_MAX_CONNECTIONS=unset" in text
    assert "dry run: nothing launched" in text
    nodes = re.findall(r"^  node (\d+) \((\S+)\): (.*)$", text, flags=re.M)
    assert [(int(rank), host) for rank, host, _ in nodes] == list(enumerate(hosts))
    for rank, _, command in nodes:
        assert shlex.split(command) == [
            sys.executable, "-m", "torch.distributed.run", f"--node-rank={rank}", "--nnodes=8",
            "--nproc-per-node=8", "--master-addr=gpu01", "--master-port=24242",
            "-m", "megatron_step.train", "examples/step_7b_3stage.yaml"]
    step = shlex.split(re.search(r"^  step        (.*)$", text, flags=re.M).group(1))
    assert step[:5] == ["srun", "--nodes=8", "--ntasks=8", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1"]

    tp2 = subprocess.run(["bash", RECIPE, "--dry-run"], capture_output=True, text=True,
                         cwd=REPO, timeout=60,
                         env={**env, "NODES": "2", "GPUS_PER_NODE": "2",
                              "CONFIG": "examples/tiny_cpu_tp2_pp2.yaml",
                              "CONTAINER_IMAGE": "nvcr.io#nvidia/pytorch:25.01-py3",
                              "CONTAINER_MOUNTS": "/lustre/data:/data"})
    assert tp2.returncode == 0, tp2.stderr
    assert "TP 2 x PP 2 x DP 1" in tp2.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in tp2.stdout
    step = shlex.split(re.search(r"^  step        (.*)$", tp2.stdout, flags=re.M).group(1))
    assert step[5:8] == ["--container-image=nvcr.io#nvidia/pytorch:25.01-py3",
                         f"--container-mounts={REPO}:{REPO},/lustre/data:/data",
                         f"--container-workdir={REPO}"]

    bad = subprocess.run(["bash", RECIPE], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**env, "NODES": "3", "GPUS_PER_NODE": "1",
                              "CONFIG": "examples/tiny_cpu_tp2_pp2.yaml"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: world size 3 (NODES=3 x GPUS_PER_NODE=1) is not divisible by TP x PP = 2 x 2 "
        "(examples/tiny_cpu_tp2_pp2.yaml)"]


def test_preempted_job_requeues_and_finishes_every_stage(
        slurm: LocalSlurm, preempted: tuple[int, Path, str, dict[str, str]]) -> None:
    """USR1 to the batch shell mid-run makes every trainer save a checkpoint and exit, the job
    requeue itself (same job id, one restart) and the requeued run continue from that
    checkpoint through every stage: the job completes, summary.json says complete, each stage's
    end checkpoint exists, the log has the launch banner and every stage's progress lines.
    Guards the whole launch path (spool copy finding the checkout, rendezvous, node rank) and
    the pre-emption path (torchrun must not die on USR1; marker-based requeue)."""
    job_id, out_dir, log, record = preempted
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert record["Restarts"] == "1"
    states = [r["JobState"] for r in slurm.completions() if r["JobId"] == str(job_id)]
    assert states == ["PENDING", "COMPLETED"], states  # requeued once, then finished
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["complete"] is True
    assert summary["global_steps"] == sum(TRAIN_STEPS.values())
    assert Path(summary["final_checkpoint"]) == out_dir / "checkpoints" / "stage2-end"
    for stage in TRAIN_STEPS:
        assert (out_dir / "checkpoints" / f"stage{stage}-end" / "megatron_step.json").is_file()
    assert not (out_dir / "PREEMPTED").exists()

    assert "world size  2 = 1 node(s) x 2 process(es) per node; TP 2 x PP 1 x DP 1" in log
    assert "pre-emption signal: asking the trainers to save a checkpoint and stop" in log
    stopped = re.search(r"stop signal: checkpoint at stage (\d) step (\d+)", log)
    assert stopped is not None, log[-3000:]
    stage, step = int(stopped.group(1)), int(stopped.group(2))
    global_step = step + sum(TRAIN_STEPS[s] for s in TRAIN_STEPS if s < stage)
    assert f"requeueing job {job_id}" in log
    assert log.count("STEP launch: job") == 2 and "(restart 1)" in log
    assert (f"/stage{stage}-step{global_step:07d} (train, stage {stage}, "
            f"global step {global_step})") in log
    progress = {(int(s), int(n), int(total)) for s, n, total in PROGRESS.findall(log)}
    for stage, total in TRAIN_STEPS.items():
        assert (stage, total, total) in progress, f"no final progress line of stage {stage}"


def test_chain_runs_stage_and_growth_jobs_in_order(
        slurm: LocalSlurm, preempted: tuple[int, Path, str, dict[str, str]],
        tmp_path: Path) -> None:
    """slurm/submit_chain.sh submits stage 1 -> growth -> stage 2 with real afterok
    dependencies and prints the chain; the jobs run in that order, the growth job writes
    stage2-grown, the stage 2 job continues from it, and every step's loss equals the
    pre-empted single job's. Guards the chained mode for sites with short time limits."""
    out_dir = tmp_path / "run"
    env = _clean_env(SLURM_CONF=str(slurm.conf), **_tiny_knobs(out_dir))
    submitted = subprocess.run(["bash", "slurm/submit_chain.sh", "--nodes=1",
                                f"--output={tmp_path}/%x-%j.out"],
                               capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    chain = re.search(r"^chain: (\d+) -> (\d+) -> (\d+)$", submitted.stdout, flags=re.M)
    assert chain is not None, submitted.stdout
    ids = [int(i) for i in chain.groups()]
    for before, after in itertools.pairwise(ids):
        assert f"afterok:{before}" in slurm.job(after)["Dependency"]
    records = slurm.wait(ids, 3 * JOB_TIMEOUT)
    assert [records[i]["JobState"] for i in ids] == ["COMPLETED"] * 3, records
    ends = {int(r["JobId"]): r for r in slurm.completions() if r["JobState"] == "COMPLETED"}
    for before, after in itertools.pairwise(ids):
        assert ends[after]["StartTime"] >= ends[before]["EndTime"]  # ISO times sort as text
    grown = json.loads((out_dir / "checkpoints" / "stage2-grown" / "megatron_step.json")
                       .read_text())
    assert grown["kind"] == "grown" and grown["num_layers"] == 6
    assert "--until-stage 1" in _log(out_dir, "tiny_cpu-stage1", ids[0])
    assert f"wrote {out_dir}/checkpoints/stage2-grown" in _log(out_dir, "tiny_cpu-grow2", ids[1])
    assert re.search(r"continuing from \S+/stage2-grown \(grown, stage 2",
                     _log(out_dir, "tiny_cpu-stage2", ids[2]))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["complete"] is True and summary["global_steps"] == sum(TRAIN_STEPS.values())
    _assert_same_losses(_losses(out_dir), _losses(preempted[1]))
