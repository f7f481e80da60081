"""Example configs and the README's commands, tested as artefacts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from megatron_step.config import load_config
from megatron_step.metrics import read_metrics

from runs import REPO, run_ok, train_command

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SHORT = ["stages[0].train_steps=16", "stages[1].train_steps=12", "train.eval_interval=6",
         "train.log_interval=6", "logging.tensorboard=false"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path: Path) -> None:
    """Each shipped config loads through the full validator and reaches its target depth."""
    config = load_config(path)
    assert config.stages[-1].num_layers == config.model.num_layers
    assert len(EXAMPLES) >= 8


def test_7b_cluster_example_fits_an_80gb_h100_with_its_stated_margin() -> None:
    """examples/step_7b_3stage.yaml on 32 GPUs (DP=32, as slurm/step_3stage_7b.sh runs it):
    every stage's planned per-GPU peak, FP8 weight caches included, leaves the 16 GiB its header
    states (for what the planner does not count) on an 80 GB H100 (81,559 MiB as nvidia-smi
    reports it), while vanilla training of the same model would not fit; its stages are the
    planner's optimum."""
    import dataclasses

    from megatron_step.memory import run_settings, stage_cost
    from megatron_step.plan import plan_stages

    config = load_config(REPO / "examples" / "step_7b_3stage.yaml")
    h100 = 81_559 * 2**20
    old, peaks = 0, []
    for stage in config.stages:
        # on the cluster TE is present: flash attention (here run_settings sees no TE)
        settings = dataclasses.replace(run_settings(config, stage, data_parallel_size=32),
                                       attention_backend="flash")
        assert settings.fp8_recipe == "delayed"
        peaks.append(stage_cost(config.model, stage.num_layers - old, old, settings).peak_bytes)
        old = stage.num_layers
    assert max(peaks) <= h100 - 16 * 2**30, [p / 2**30 for p in peaks]
    vanilla = stage_cost(config.model, config.model.num_layers, 0, settings).peak_bytes
    assert vanilla > h100
    plan = plan_stages(config.model, 3, settings)
    assert [s.num_layers for s in plan.stages] == [s.num_layers for s in config.stages]


def test_tp2_pp2_example_matches_a_single_process_run(tmp_path: Path) -> None:
    """examples/tiny_cpu_tp2_pp2.yaml runs on 4 gloo processes (TP=2 x PP=2, distributed
    optimizer, growth across pipeline ranks) and its losses equal the same run on one process
    up to float reduction order."""
    config = REPO / "examples" / "tiny_cpu_tp2_pp2.yaml"
    run_ok(train_command(config, SHORT + [f"out_dir={tmp_path / 'tp2pp2'}"], nproc=4))
    run_ok(train_command(config, SHORT + [f"out_dir={tmp_path / 'single'}",
                                          "parallel.tensor_model_parallel_size=1",
                                          "parallel.pipeline_model_parallel_size=1"]))
    parallel = read_metrics(tmp_path / "tp2pp2" / "metrics.jsonl")
    single = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == list(range(1, 25))
    for a, b in zip(parallel, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
    assert parallel[-1]["loss"] < parallel[0]["loss"] - 1.0


def test_vanilla_example_is_one_stage_of_the_same_loop(tmp_path: Path) -> None:
    """The vanilla baseline runs through the same trainer: one stage, same summary fields."""
    run_ok(train_command(REPO / "examples" / "vanilla_tiny_cpu.yaml",
                         ["stages[0].train_steps=12", f"out_dir={tmp_path}",
                          "logging.tensorboard=false"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["num_layers"] for s in summary["stages"]] == [6]
    assert summary["stages"][0]["frozen_params"] == 0


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command and .ci/run do the same setup and run the same tests."""
    run_command, test_command = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    for step in test_command.split(" && "):
        assert step.replace("python3 -m venv .venv", "python3 -m venv .venv").split()[0] in ci
    for fragment in ("python3 -m venv .venv", "pip install -q torch==2.13.0",
                     'pip install -q -e ".[test]"', "python -m pytest"):
        assert fragment in ci, fragment
        assert fragment.replace("-q ", "") in test_command, fragment
    assert run_command.endswith("&& python -m megatron_step")


def test_readme_run_command_runs_the_embedded_demo(tmp_path: Path) -> None:
    """The README's first command (its run part, in this already-installed venv) performs a
    real two-stage STEP run and says where the results are."""
    run_command = _readme_commands()[0]
    demo = run_command.rsplit(" && ", 1)[1].split()
    assert demo == ["python", "-m", "megatron_step"]
    output = run_ok([sys.executable, *demo[1:], "--out-dir", str(tmp_path)], timeout=400)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["num_layers"] for s in summary["stages"]] == [4, 6]
    assert summary["complete"] and summary["final_valid_ppl"] < 20
    assert f"summary {tmp_path}/summary.json" in output
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "memory.png").is_file()
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # a test extra
