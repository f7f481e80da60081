"""tools/plan_stages.py: help, table, JSON, Markdown, plan files, budget mode, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_step.config import config_from_dict

from tools import TOOLS, load_tool

TOOL = load_tool("plan_stages")
PAPER_368M = ["--model", "llama-368m", "--memory-model", "paper", "--lora-rank", "0"]


def test_help_prints_module_docstring_and_exits_zero(capsys: pytest.CaptureFixture) -> None:
    """`--help` exits 0 and shows the module docstring (the tool's documentation)."""
    assert TOOL.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Plan STEP stages" in out and "--memory-budget" in out and "--write-plan" in out


def test_runs_as_a_script_from_the_repo_root() -> None:
    """`python tools/plan_stages.py ...` works from a checkout (how the README calls it)."""
    result = subprocess.run([sys.executable, "tools/plan_stages.py", *PAPER_368M, "--stages", "3"],
                            cwd=TOOLS.parent, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "reduction 62.0%" in result.stdout


def test_table_shows_each_stage_and_the_reduction(capsys: pytest.CaptureFixture) -> None:
    """The table lists per-stage layers and the paper's 45.8% for llama-368m K=2 at rank 0."""
    assert TOOL.main([*PAPER_368M, "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 stages [13, 11]" in out and "reduction 45.8%" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("stage"))
    for column in ("+layers", "trainable", "frozen", "adapter", "weights", "peak", "reduction"):
        assert column in header


def test_json_has_the_documented_keys(capsys: pytest.CaptureFixture) -> None:
    """--json prints one object: stages with counts and peak_bytes, vanilla and peak, reduction."""
    assert TOOL.main(["--model", "llama-368m", "--stages", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"stages", "vanilla_peak_bytes", "peak_bytes", "reduction"} <= set(data)
    for stage in data["stages"]:
        assert {"num_new_layers", "num_layers", "trainable_params", "frozen_params",
                "adapter_params", "peak_bytes"} <= set(stage)
    assert [s["num_layers"] for s in data["stages"]][-1] == 24
    assert data["peak_bytes"] == max(s["peak_bytes"] for s in data["stages"])
    assert data["reduction"] == pytest.approx(1 - data["peak_bytes"] / data["vanilla_peak_bytes"],
                                              abs=1e-12)


def test_markdown_summary_has_a_row_per_model_and_memory_model(
        capsys: pytest.CaptureFixture) -> None:
    """--markdown with 2 models x 2 memory models x K=2,3 prints a header and 4 rows."""
    assert TOOL.main(["--model", "tiny", "llama-368m", "--memory-model", "paper", "full",
                      "--stages", "2", "3", "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| Model | Memory model | Vanilla | STEP K=2 | STEP K=3 |"
    assert len(lines) == 2 + 4
    assert lines[4].startswith("| llama-368m | paper |")


def test_write_plan_produces_a_stage_list_the_run_config_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--write-plan writes YAML whose `stages:` a run config accepts as `stages: FILE`."""
    path = tmp_path / "plan.yaml"
    assert TOOL.main(["--model", "llama-368m", "--stages", "3", "--train-steps", "900,600,300",
                      "--write-plan", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("# STEP stage plan written by: python tools/plan_stages.py")
    config = config_from_dict({"out_dir": "x", "model": {"preset": "llama-368m"},
                               "stages": str(path)})
    assert [s.num_layers for s in config.stages] == [10, 18, 24]
    assert [s.train_steps for s in config.stages] == [900, 600, 300]
    assert config.stages[1].lora.rank == 8
    assert "stages" in yaml.safe_load(text) and not list(tmp_path.glob("*.tmp-*"))


def test_write_plan_refuses_to_overwrite_without_flag(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """An existing plan file is kept (exit 2 naming --write-plan) unless --overwrite is given."""
    path = tmp_path / "plan.yaml"
    path.write_text("keep me\n")
    args = ["--model", "llama-368m", "--stages", "2", "--write-plan", str(path)]
    assert TOOL.main(args) == 2
    assert "--write-plan:" in capsys.readouterr().err and path.read_text() == "keep me\n"
    assert TOOL.main([*args, "--overwrite"]) == 0
    assert yaml.safe_load(path.read_text())["stages"][-1]["num_layers"] == 24


def test_budget_mode_picks_the_fewest_stages_that_fit(capsys: pytest.CaptureFixture) -> None:
    """A budget of exactly the K=2 optimum (in bytes) selects K=2: K=1 needs more, K=2 fits."""
    assert TOOL.main(["--model", "llama-368m", "--stages", "2", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    budget = str(two["peak_bytes"])
    assert TOOL.main(["--model", "llama-368m", "--memory-budget", budget, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["vanilla_peak_bytes"] > data["budget_bytes"]
    assert (data["num_stages"], data["splits"]) == (2, two["splits"])


def test_budget_mode_reports_the_miss_and_exits_one(capsys: pytest.CaptureFixture) -> None:
    """A budget no plan meets: exit 1, the best plan is shown and stderr says by how much."""
    assert TOOL.main(["--model", "llama-368m", "--memory-budget", "1GiB"]) == 1
    captured = capsys.readouterr()
    assert "reduction" in captured.out
    assert "fits the 1.00 GiB budget" in captured.err and "over" in captured.err


def test_paper_model_warns_about_ignored_settings(capsys: pytest.CaptureFixture) -> None:
    """Settings the paper formula cannot use are named in a warning, not silently dropped."""
    assert TOOL.main([*PAPER_368M, "--stages", "2", "--tp", "2"]) == 0
    assert "--memory-model paper ignores --tensor-model-parallel-size" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "llama-9b", "--stages", "2"], "--model: unknown preset 'llama-9b'"),
    (["--model", "llama-368m", "--stages", "25"], "--stages: must be in [1, 24]"),
    (["--model", "llama-368m", "--stages", "0"], "--stages: must be in [1, 24]"),
    (["--model", "llama-368m", "--stages", "2", "--hidden-size", "0"],
     "--hidden-size: must be > 0, got 0"),
    (["--model", "llama-368m", "--stages", "2", "--num-layers", "-4"],
     "--num-layers: must be > 0, got -4"),
    (["--model", "llama-368m", "--stages", "2", "--tp", "0"],
     "--tensor-model-parallel-size: "),
    (["--model", "llama-368m", "--stages", "2", "--tp", "3"],
     "--tensor-model-parallel-size: 3 does not divide model.num_attention_heads (16)"),
    (["--model", "llama-368m", "--stages", "2", "--micro-batch-size", "0"],
     "--micro-batch-size: must be >= 1, got 0"),
    (["--model", "llama-368m", "--stages", "2", "--lora-rank", "-1"],
     "--lora-rank: must be >= 0, got -1"),
    (["--model", "llama-368m", "--stages", "2", "--min-new-layers", "0"],
     "--min-new-layers: must be >= 1, got 0"),
    (["--model", "llama-368m", "--memory-budget", "40GB?"],
     "--memory-budget: cannot parse '40GB?' (examples: 40GiB, 80GB, 512MiB)"),
    (["--model", "llama-368m", "--memory-budget", "0GiB"], "--memory-budget: must be > 0"),
    (["--stages", "2", "--hidden-size", "1024"], "--num-layers: required field is missing"),
    (["--model", "llama-368m"], "one of the arguments --stages --memory-budget is required"),
    (["--model", "llama-368m", "--stages", "2", "3", "--json"], "--json: needs one --model"),
])
def test_bad_input_gives_one_line_error_naming_the_argument(
        args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    """Bad arguments exit 2 with a single stderr line naming the flag, and print nothing else."""
    assert TOOL.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan_stages.py: error: ")
    assert expected in lines[0]


def _readme_planner_tables() -> list[tuple[list[str], str]]:
    """(arguments, table) for every `python tools/plan_stages.py ... --markdown` block in the
    README followed by its Markdown table."""
    import re
    import shlex

    text = (TOOLS.parent / "README.md").read_text()
    pattern = re.compile(r"```bash\npython tools/plan_stages\.py ([^\n]*--markdown[^\n]*)\n```"
                         r"\n\n((?:\|[^\n]*\n)+)")
    return [(shlex.split(args), table.strip()) for args, table in pattern.findall(text)]


def test_readme_planner_tables_are_what_the_planner_prints(capsys: pytest.CaptureFixture) -> None:
    """Each planner table in the README is the current output of the command shown above it,
    so a change of the memory model or of a preset cannot leave stale numbers behind."""
    tables = _readme_planner_tables()
    assert len(tables) >= 2
    for args, table in tables:
        assert TOOL.main(args) == 0
        assert capsys.readouterr().out.strip() == table, " ".join(args)
