"""bench/: the memory benchmark agrees with the planner, the quick modes produce finite results.

The benchmark scripts run in-process through their `main([...])` (inside a one-process gloo world
from `run_world`, which also bounds their time); their numbers are read back from the JSON files
they write. Timings are never asserted: only memory bytes (deterministic), finiteness, equal
training tokens across methods, and the file contract.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megatron_step.config import config_from_dict, model_preset
from megatron_step.train import stage_steps

from dist import run_world

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))  # the scripts import their shared module as `common`


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {name: _load(name) for name in ("memory", "throughput", "quality", "preprocess")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(script: str, argv: list[str]) -> int:
    """A benchmark's main() inside a run_world rank (module level: pickled by reference)."""
    return SCRIPTS[script].main(argv)


def _outputs(out_dir: Path, name: str) -> dict:
    """The JSON result, after checking that the Markdown and PNG files exist too."""
    assert (out_dir / f"{name}.md").read_text().startswith("####")
    assert (out_dir / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    return json.loads((out_dir / f"{name}.json").read_text())


def test_help_and_bad_arguments_exit_with_one_line_errors(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """--help shows each script's docstring (exit 0); impossible plans, a missing WikiText and
    existing outputs without --overwrite exit 2 with one line naming the argument, before any
    model is built (a typo must not cost a long run)."""
    for name, module in SCRIPTS.items():
        assert module.main(["--help"]) == 0, name
        assert module.__doc__.splitlines()[0] in capsys.readouterr().out
    out = ["--out-dir", str(tmp_path)]
    assert SCRIPTS["memory"].main(["--model", "tiny", "--stages", "5", *out]) == 2
    assert "--model/--stages: num_stages: must be in [1, 4]" in capsys.readouterr().err
    assert SCRIPTS["quality"].main(["--quick", "--wikitext", str(tmp_path / "none"), *out,
                                    "--work-dir", str(tmp_path / "work")]) == 2
    assert f"--wikitext: {tmp_path / 'none' / 'train.txt'}" in capsys.readouterr().err
    (tmp_path / "throughput.md").write_text("earlier result\n")
    assert SCRIPTS["throughput"].main(["--quick", *out]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the echoed arguments
    assert error.startswith("throughput.py: error: --out-dir:") and "--overwrite" in error
    assert (tmp_path / "throughput.md").read_text() == "earlier result\n"


def test_memory_tiny_measured_model_state_matches_planner_within_3_percent(tmp_path: Path
                                                                            ) -> None:
    """For every stage of the tiny model's K = 1, 2, 3 plans, the model-state bytes measured
    after a real bf16 training step (weights, DDP grad buffers, fp32 masters, Adam states)
    equal the planner's full-model prediction within 3%, and every STEP plan needs less than
    vanilla. Guards the planner's byte accounting (and the issue's acceptance criterion)
    against drifting from what Megatron actually allocates."""
    argv = ["--model", "tiny", "--stages", "1", "2", "3", "--no-isolate", "--out-dir",
            str(tmp_path)]
    assert run_world(_main, 1, "memory", argv, timeout=240) == [0]
    result = _outputs(tmp_path, "memory_tiny")
    assert [plan["num_stages"] for plan in result["plans"]] == [1, 2, 3]
    for plan in result["plans"]:
        assert sum(plan["splits"]) == 4 and len(plan["stages"]) == plan["num_stages"]
        for stage in plan["stages"]:
            measured = float(stage["measured"]["model_state_bytes"])
            predicted = float(stage["predicted_full"]["model_state_bytes"])
            torch.testing.assert_close(measured, predicted, rtol=0.03, atol=0,
                                       msg=lambda m, s=stage: f"stage {s['num_old']}+"
                                                              f"{s['num_new']}: {m}")
            assert stage["measured"]["peak_bytes"] is None  # not isolated: no per-stage peak
        if plan["num_stages"] > 1:
            assert plan["reduction"]["measured_model_state"] > 0.2, plan["reduction"]


def test_memory_isolated_measurement_reports_its_own_peak(tmp_path: Path) -> None:
    """Isolated mode measures in a fresh, address-space-limited process: the peak RSS increase
    it reports is at least the model state held (those tensors are resident), so the per-stage
    peak is a real measurement of that stage alone."""
    argv = ["--model", "tiny", "--stages", "1", "--out-dir", str(tmp_path), "--memory-limit",
            "16GiB"]
    assert SCRIPTS["memory"].main(argv) == 0
    vanilla = _outputs(tmp_path, "memory_tiny")["vanilla"]["measured"]
    assert vanilla["peak_increase_bytes"] >= vanilla["model_state_bytes"] > 0
    assert vanilla["peak_bytes"] > vanilla["baseline_bytes"] > 0


def test_throughput_quick_writes_finite_speedups(tmp_path: Path) -> None:
    """--quick times alternating vanilla/stage pairs and writes finite, positive tokens/s and
    speed-ups for every stage of the plan (values themselves are machine-dependent)."""
    assert run_world(_main, 1, "throughput", ["--quick", "--out-dir", str(tmp_path)],
                     timeout=240) == [0]
    result = _outputs(tmp_path, "throughput")
    assert len(result["stages"]) == 2
    for row in result["stages"]:
        assert row["pairs"] == 2
        for key in ("vanilla_tokens_per_s", "stage_tokens_per_s", "speedup"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["expected_speedup"] > 1.0, row  # fewer or frozen layers: fewer FLOPs


def test_preprocess_quick_times_both_tokenizers(tmp_path: Path, wikitext: Path) -> None:
    """--quick trains both tokenizers on 300 KB of WikiText-2, runs tools/preprocess_data.py
    for each as its own process and writes finite, positive wall and CPU times and the token
    counts of the datasets it made (values themselves are machine-dependent)."""
    assert SCRIPTS["preprocess"].main([
        "--quick", "--workers", "1", "--wikitext", str(wikitext / "train.txt"), "--out-dir",
        str(tmp_path), "--work-dir", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "preprocess.json").read_text())
    assert (tmp_path / "preprocess.md").read_text().startswith("#### Preprocessing")
    assert [(r["tool"], r["tokenizer"]) for r in result["runs"]] == [
        ("megatron_step", "sentencepiece"), ("megatron_step", "byte-level BPE")]
    for run in result["runs"]:
        assert run["tokens"] > result["input_mb"] * 1e5, run  # ~ < 10 bytes per token
        for key in ("wall_s", "cpu_s", "build_s"):
            assert math.isfinite(run[key]) and run[key] > 0, (key, run)


def test_step_flops_counts_frozen_layers_without_weight_gradients() -> None:
    """The expected speed-up model: a trained layer costs 6 FLOPs per weight and token, a frozen
    one 4 plus 6 per adapter weight; attention 12 s h per layer; the output layer 6 V h."""
    tiny = model_preset("tiny")
    stage = SCRIPTS["throughput"].Stage(3, 1)
    lora = SCRIPTS["throughput"].LoraConfig(rank=8)
    linear = 64 * 128 + 64 * 64 + 64 * 256 + 128 * 64  # qkv (GQA), proj, fc1 (SwiGLU), fc2
    adapter = 8 * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))
    per_token = 1 * 6 * linear + 3 * (4 * linear + 6 * adapter) + 4 * 12 * 64 * 64 + 6 * 256 * 64
    assert SCRIPTS["throughput"].step_flops(tiny, stage, lora, tokens=10) == 10 * per_token


def test_every_quality_method_trains_the_same_number_of_steps() -> None:
    """The trainer-run methods' stage lists (vanilla, STEP K=2/3 with 75%-growth schedules,
    ReLoRA warm start + restarts) validate as run configs and run exactly `steps` optimizer
    steps in total: equal training tokens is what makes the quality table comparable."""
    quality = SCRIPTS["quality"]
    model = quality.common.SMALL_LLAMA
    data = {"prefix": "unused", "tokenizer": "byte"}
    for steps in (6, 7, 300, 401):
        args = type("Args", (), {"micro_batch_size": 8, "global_batch_size": 16, "seed": 1,
                                 "steps": steps})
        for method in ("vanilla", "step2", "step3", "relora"):
            stages = quality.method_stages(method, model, steps, 2e-3, {2: (4, 4), 3: (3, 3, 2)})
            config = config_from_dict(quality.run_config(Path("/tmp/x"), model, data, stages,
                                                         args))
            assert sum(stage_steps(config)) == steps, (method, steps, stage_steps(config))
            assert config.stages[-1].num_layers == model.num_layers


def test_quality_quick_runs_all_five_methods_on_equal_tokens(tmp_path: Path,
                                                             wikitext: Path) -> None:
    """--quick trains vanilla, STEP K=2, STEP K=3, ReLoRA and GaLore on WikiText-2 (a slice)
    for the same number of tokens, evaluates each on WikiText-2 valid and writes finite losses,
    perplexities, model-state bytes and one loss curve per method."""
    argv = ["--quick", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"),
            "--wikitext", str(wikitext)]
    assert run_world(_main, 1, "quality", argv, timeout=300) == [0]
    result = _outputs(tmp_path, "quality")
    methods = [r["method"] for r in result["methods"]]
    assert methods == ["vanilla", "step2", "step3", "relora", "galore"]
    tokens = result["steps"] * result["global_batch_size"] * result["model"]["seq_length"]
    for row in result["methods"]:
        assert row["tokens"] == tokens, row["method"]
        assert len(row["curve"]) == result["steps"] and row["curve"][-1][0] == tokens
        for key in ("valid_loss", "valid_ppl", "model_state_peak_bytes"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key)
    by_method = {r["method"]: r for r in result["methods"]}
    # frozen old layers: STEP's last stage holds less model state than vanilla
    assert (by_method["step3"]["model_state_last_bytes"]
            < by_method["vanilla"]["model_state_peak_bytes"])


def test_galore_loop_without_projection_matches_the_trainer(tmp_path: Path,
                                                           wikitext: Path) -> None:
    """With rank 0 (no projection) the GaLore baseline's plain PyTorch loop is AdamW over the
    same Megatron GPTModel, init, batches, loss, clipping and schedule as the trainer's vanilla
    run, so both must give the same losses: the GaLore row then differs from vanilla only by
    GaLore itself. Guards against a harness difference (data order, loss scaling, LR) posing as
    a method difference."""
    argv = ["--quick", "--methods", "vanilla", "galore", "--galore-rank", "0", "--out-dir",
            str(tmp_path), "--work-dir", str(tmp_path / "work"), "--wikitext", str(wikitext)]
    assert run_world(_main, 1, "quality", argv, timeout=240) == [0]
    vanilla, loop = _outputs(tmp_path, "quality")["methods"]
    assert loop["label"].startswith("AdamW loop")
    torch.testing.assert_close(torch.tensor(loop["curve"]), torch.tensor(vanilla["curve"]),
                               atol=5e-4, rtol=0)
    assert loop["valid_loss"] == pytest.approx(vanilla["valid_loss"], abs=5e-4)


def test_update_readme_replaces_only_its_block(tmp_path: Path) -> None:
    """--update-readme swaps the text between a benchmark's markers in every README that has
    them and keeps the rest; no README with the markers is an error naming --update-readme."""
    common = SCRIPTS["memory"].common
    both, other = tmp_path / "README.md", tmp_path / "other.md"
    both.write_text("intro\n<!-- results:a -->\nold\n<!-- /results:a -->\nkeep\n")
    other.write_text("no blocks here\n")
    common.update_readme("a", "new table\n", (both, other))
    assert both.read_text() == "intro\n<!-- results:a -->\nnew table\n<!-- /results:a -->\nkeep\n"
    assert other.read_text() == "no blocks here\n"
    with pytest.raises(common.BenchError, match="--update-readme: no README has a <!-- results:b"):
        common.update_readme("b", "x", (both, other))
