"""Staged training end to end: real runs of `python -m megatron_step.train` on the tiny model.

Runs are real processes (single process, or torchrun for TP=2), killed with real signals where a
test needs an interruption. A short two-stage config (4 -> 6 layers) keeps each run to seconds.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_step.checkpoint import load_checkpoint, load_full_tensors, read_meta
from megatron_step.config import ParallelConfig, load_config, model_preset
from megatron_step.forward import evaluate
from megatron_step.growth import layer_map
from megatron_step.memory import lora_params_per_layer, params_per_layer
from megatron_step.metrics import read_metrics
from megatron_step.model import build_model
from megatron_step.parallel import init_distributed

from builders import FP32
from dist import run_world
from runs import REPO, finish, kill_tree, run_ok, start, train_command

CONFIG = REPO / "examples" / "tiny_cpu.yaml"
# stage 1 plans 24 steps and grows at 75% (18 steps); stage 2 runs its 18 steps
SHORT = ["stages[0].train_steps=24", "stages[1].train_steps=18", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.eval_interval=6", "train.eval_iters=2",
         "train.log_interval=6", "checkpoint.save_interval=3", "checkpoint.keep_last=50",
         "logging.tensorboard=false"]
STAGE1_STEPS, STAGE2_STEPS = 18, 18


def _start(out_dir: Path, nproc: int = 1, extra: list[str] | None = None) -> subprocess.Popen:
    return start(train_command(CONFIG, SHORT + [f"out_dir={out_dir}"] + (extra or []), nproc))


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    return finish(proc, timeout)


def _run(out_dir: Path, nproc: int = 1, extra: list[str] | None = None) -> str:
    code, output = _finish(_start(out_dir, nproc, extra))
    assert code == 0, output[-4000:]
    return output


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 180) -> None:
    """Block until checkpoint `path` is complete (its metadata exists)."""
    deadline = time.monotonic() + timeout
    while not (path / "megatron_step.json").is_file():
        if proc.poll() is not None:
            pytest.fail(f"run ended (code {proc.returncode}) before {path.name} appeared:\n"
                        f"{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.01)


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")}


def _grad_norms(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(out_dir / "metrics.jsonl")}


def _ckpt(out_dir: Path, name: str) -> Path:
    return out_dir / "checkpoints" / name


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run of the short config."""
    out_dir = tmp_path_factory.mktemp("baseline")
    _run(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def baseline_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run at tensor-parallel size 2 (torchrun, 2 gloo processes)."""
    out_dir = tmp_path_factory.mktemp("baseline_tp2")
    _run(out_dir, nproc=2, extra=["parallel.tensor_model_parallel_size=2"])
    return out_dir


def test_two_stage_run_trains_and_reports(baseline: Path) -> None:
    """Both stages run their planned steps, the loss falls, and the summary has the exact
    stage-2 parameter split: 2 new layers + embeddings trainable, 4 old layers frozen, LoRA
    rank 8 on their 4 linears."""
    losses = _losses(baseline)
    assert sorted(losses) == list(range(1, STAGE1_STEPS + STAGE2_STEPS + 1))
    steps = sorted(losses)
    first, last = [losses[s] for s in steps[:3]], [losses[s] for s in steps[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.5, losses
    summary = json.loads((baseline / "summary.json").read_text())
    tiny = model_preset("tiny")
    layer, vocab = params_per_layer(tiny), 2 * tiny.vocab_size * tiny.hidden_size
    stage2 = summary["stages"][1]
    assert (stage2["num_layers"], stage2["num_new_layers"]) == (6, 2)
    assert stage2["trainable_params"] == 2 * layer + vocab + tiny.hidden_size
    assert stage2["frozen_params"] == 4 * layer
    assert stage2["adapter_params"] == 4 * lora_params_per_layer(tiny, 8)
    for stage in summary["stages"]:
        assert stage["measured"]["model_state_bytes"] == stage["predicted"]["model_state_bytes"]
    for name in ("loss.png", "memory.png", "run_config.yaml", "plan.json"):
        assert (baseline / name).stat().st_size > 0, name


def test_previous_stage_memory_is_freed_at_the_boundary(baseline: Path) -> None:
    """Just after a boundary (grown model, its DDP buffers and optimizer built, before its first
    step) the live tensors fit in the larger planned model state of the two stages: the old
    stage's grad buffers, Adam states and hooks are gone. Tolerance 2% for small tensors outside
    the model state (RoPE tables, batches). Measured: 1.81 MB vs 2.89 MB planned; 3.26 MB when the
    old DDP wrapper and optimizer are left to the garbage collector."""
    stages = json.loads((baseline / "summary.json").read_text())["stages"]
    for previous, stage in zip(stages, stages[1:], strict=False):
        planned = max(previous["predicted"]["model_state_bytes"],
                      stage["predicted"]["model_state_bytes"])
        assert stage["measured"]["live_bytes_at_start"] <= 1.02 * planned, (stage, planned)


def test_frozen_layers_change_only_through_the_adapter_merge(baseline: Path) -> None:
    """Stage 2 never touches the frozen base weights: a mid-stage checkpoint holds them
    bit-identical to the stage-1 result, and the final weights differ from them by the merged
    LoRA delta, whose rank is at most the adapter rank (8)."""
    start = load_full_tensors(_ckpt(baseline, "stage1-end"))
    middle = load_full_tensors(_ckpt(baseline, f"stage2-step{STAGE1_STEPS + 9:07d}"))
    end = load_full_tensors(_ckpt(baseline, "stage2-end"))
    provenance = read_meta(_ckpt(baseline, "stage2-end"))["layers"]
    old = {new: source.old[0] for new, source in enumerate(layer_map(4, 2))
           if not source.is_new}
    assert sorted(old) == [i for i, entry in enumerate(provenance) if entry["born_stage"] == 1]
    for new, source in old.items():
        for name in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                     "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
                     "self_attention.linear_qkv.layer_norm_weight"):
            before = start[f"decoder.layers.{source}.{name}"]
            assert torch.equal(middle[f"decoder.layers.{new}.{name}"], before), (new, name)
            delta = end[f"decoder.layers.{new}.{name}"] - before
            if name.endswith("layer_norm_weight"):
                assert torch.equal(delta, torch.zeros_like(delta)), (new, name)
            else:
                assert 0 < torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 8, (new, name)


def _final_valid_loss(path: Path, config_path: Path, out_dir: Path) -> float:
    from megatron_step import data
    from megatron_step.data.tokenizer import load_tokenizer

    config = load_config(config_path)
    tiny = config.model
    layout = init_distributed(tiny, 6, ParallelConfig())
    gpt = build_model(tiny, 6, ParallelConfig(), FP32, pre_process=True, post_process=True,
                      initialize=False)
    load_checkpoint(path, [gpt], strict=True)
    tokenizer = load_tokenizer(config.data.tokenizer)
    prefix = data.prepare_embedded_dataset(out_dir / "data", tokenizer, progress=False)
    _, valid = data.build_datasets(prefix, tokenizer, seq_length=tiny.seq_length,
                                   split=config.data.split, seed=config.train.seed,
                                   num_train_samples=1,
                                   num_valid_samples=config.train.eval_iters
                                   * config.train.global_batch_size,
                                   cache_dir=out_dir / "data" / "cache")
    batches = data.valid_microbatches(valid,
                                      config.train.eval_iters * config.train.global_batch_size,
                                      config.train.micro_batch_size, layout.dp_rank,
                                      layout.data_parallel_size)
    return evaluate([gpt], batches)


def test_final_checkpoint_is_a_plain_six_layer_model(baseline: Path) -> None:
    """The final checkpoint (adapters merged) loads strictly into a plain 6-layer LLaMA and
    reproduces the validation loss the trainer measured with adapters attached."""
    loss = run_world(_final_valid_loss, 1, _ckpt(baseline, "stage2-end"),
                     baseline / "run_config.yaml", baseline)[0]
    summary = json.loads((baseline / "summary.json").read_text())
    assert loss == pytest.approx(summary["final_valid_loss"], abs=1e-5)
    assert read_meta(_ckpt(baseline, "stage2-end"))["adapters"] is None


def test_tensor_parallel_run_matches_single_process(baseline: Path, baseline_tp2: Path) -> None:
    """TP=2 trains the same model on the same data: same parameter counts, losses equal to the
    single-process run up to float reduction order."""
    losses, losses_tp2 = _losses(baseline), _losses(baseline_tp2)
    assert sorted(losses_tp2) == sorted(losses)
    for step, loss in losses.items():
        assert losses_tp2[step] == pytest.approx(loss, abs=1e-4), step
    summary = json.loads((baseline / "summary.json").read_text())["stages"]
    summary_tp2 = json.loads((baseline_tp2 / "summary.json").read_text())["stages"]
    for key in ("trainable_params", "frozen_params", "adapter_params"):
        assert [s[key] for s in summary_tp2] == [s[key] for s in summary], key


def test_killed_run_resumes_with_identical_losses(baseline: Path, tmp_path: Path) -> None:
    """SIGKILL mid-stage 1, resume, SIGKILL right after the stage-1 end checkpoint, resume
    from that boundary: the resumed run reproduces the uninterrupted losses exactly."""
    proc = _start(tmp_path)
    _wait_for(proc, _ckpt(tmp_path, "stage1-step0000009"))
    kill_tree(proc)
    proc.wait()
    proc = _start(tmp_path)
    _wait_for(proc, _ckpt(tmp_path, "stage1-end"))
    kill_tree(proc)
    proc.wait()
    for later in (tmp_path / "checkpoints").glob("stage2-*"):  # crash right at the boundary
        shutil.rmtree(later)
    output = _run(tmp_path)
    assert "continuing from" in output and "stage1-end" in output
    assert _losses(tmp_path) == _losses(baseline)
    assert _grad_norms(tmp_path) == _grad_norms(baseline)


def test_sigusr1_saves_and_exits_for_requeue(baseline: Path, tmp_path: Path) -> None:
    """SLURM pre-emption: SIGUSR1 mid-stage writes a checkpoint and the PREEMPTED marker and
    exits with code 75; the requeued run finishes with the uninterrupted losses."""
    proc = _start(tmp_path)
    _wait_for(proc, _ckpt(tmp_path, f"stage2-step{STAGE1_STEPS + 3:07d}"))
    kill_tree(proc, signal.SIGUSR1)
    code, output = _finish(proc)
    assert code == 75, output[-3000:]
    assert (tmp_path / "PREEMPTED").is_file()
    _run(tmp_path)
    assert not (tmp_path / "PREEMPTED").exists()
    assert _losses(tmp_path) == _losses(baseline)


def test_killed_tensor_parallel_run_resumes(baseline_tp2: Path, tmp_path: Path) -> None:
    """The same at TP=2 under torchrun: kill every rank mid-stage 2, restart, and the losses
    and gradient norms match the uninterrupted TP=2 run (a rebuilt model must keep Megatron's
    tensor-parallel marks, or the norm, hence clipping, changes)."""
    extra = ["parallel.tensor_model_parallel_size=2"]
    proc = _start(tmp_path, nproc=2, extra=extra)
    _wait_for(proc, _ckpt(tmp_path, f"stage2-step{STAGE1_STEPS + 6:07d}"))
    kill_tree(proc)
    proc.wait()
    _run(tmp_path, nproc=2, extra=extra)
    for read in (_losses, _grad_norms):
        resumed, reference = read(tmp_path), read(baseline_tp2)
        assert sorted(resumed) == sorted(reference)
        for step, value in reference.items():
            assert resumed[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (read, step)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """An absurd weight decay blows the weights up: the run stops with code 3, names the
    stage and step, and the checkpoints written before stay complete."""
    code, output = _finish(_start(tmp_path, extra=["optimizer.weight_decay=1e35",
                                                   "checkpoint.save_interval=1"]))
    assert code == 3, output[-3000:]
    assert "non-finite loss" in output and "at stage 1 step 3 (global step 3)" in output
    assert "stage1-step0000002" in output
    assert read_meta(_ckpt(tmp_path, "stage1-step0000002"))["global_step"] == 2
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["stages[1].lora.rank=0"], "error: stages[1].lora.rank: must be > 0, got 0"),
    (["model.vocab_size=128"], "error: model.vocab_size: 128 is smaller than the vocabulary"),
    (["data.path=/nonexistent/corpus"], "error: data.path '/nonexistent/corpus'"),
])
def test_bad_settings_fail_with_the_field_name(tmp_path: Path, extra: list[str],
                                               message: str) -> None:
    """User errors end the run with exit code 2 and one line naming the field."""
    code, output = _finish(_start(tmp_path, extra=extra), timeout=120)
    assert code == 2, output[-3000:]
    assert message in output, output[-3000:]


def test_a_run_can_start_from_an_imported_hugging_face_model(tmp_path: Path) -> None:
    """`init_checkpoint`: a 4-layer Hugging Face LLaMA, imported, stands for stage 1; the run
    starts by growing it to 6 layers, and its 4 layers stay frozen (bit-identical base weights
    at a mid-stage checkpoint) while the new ones train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = model_preset("tiny")
    hf_config = LlamaConfig(vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size,
                            intermediate_size=tiny.ffn_hidden_size, num_hidden_layers=4,
                            num_attention_heads=tiny.num_attention_heads,
                            num_key_value_heads=tiny.num_query_groups,
                            max_position_embeddings=tiny.seq_length,
                            rms_norm_eps=tiny.norm_epsilon, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "default",
                                             "rope_theta": float(tiny.rotary_base)})
    torch.manual_seed(0)
    LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf")
    run_ok([sys.executable, str(REPO / "tools" / "import_hf.py"), str(tmp_path / "hf"),
            str(tmp_path / "imported")])
    out_dir = tmp_path / "run"
    output = _run(out_dir, extra=[f"init_checkpoint={tmp_path / 'imported'}"])
    assert "continuing from" in output and "imported" in output
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [2]
    assert sorted(_losses(out_dir)) == list(range(1, STAGE2_STEPS + 1))
    imported = load_full_tensors(tmp_path / "imported")
    middle = load_full_tensors(_ckpt(out_dir, "stage2-step0000009"))
    for new, source in enumerate(layer_map(4, 2)):
        if not source.is_new:
            key = "self_attention.linear_qkv.weight"
            assert torch.equal(middle[f"decoder.layers.{new}.{key}"],
                               imported[f"decoder.layers.{source.old[0]}.{key}"]), new
    code, output = _finish(_start(tmp_path / "other", extra=[
        f"init_checkpoint={tmp_path / 'imported'}", "model.ffn_hidden_size=256"]))
    assert code == 2 and "is a different model: model.ffn_hidden_size 256 vs 128" in output
