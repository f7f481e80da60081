"""FP8 settings are checked against TE's GEMM shape rules and the GPU before a job starts.

Without these checks the first FP8 forward fails minutes into a job with TE's assertion, which
names no config field. The rules (TE 2.x `assert_dim_for_fp8_exec`, MXFP8 block size 32, the
compute-capability checks) are in megatron_step/fp8_support.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_step import fp8_support, te
from megatron_step.config import ConfigError, PrecisionConfig, load_config, model_preset


def _config(tmp_path: Path, preset: str, tp: int, **precision: object) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "out"), "model": {"preset": preset},
        "parallel": {"tensor_model_parallel_size": tp},
        "precision": {"params_dtype": "bf16", **precision},
        "stages": [{"num_layers": 12, "train_steps": 10}, {"num_layers": 24, "train_steps": 10}]}))
    return path


def test_llama_368m_runs_fp8_only_at_tp1(tmp_path: Path) -> None:
    """The paper's 368M (FFN 2736) splits fc2's input into 1368 per TP=2 shard, which is not a
    multiple of 16: refused at config load, naming precision.fp8, the linear and the field."""
    load_config(_config(tmp_path, "llama-368m", 1, fp8="hybrid"))
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, "llama-368m", 2, fp8="hybrid"))
    message = str(info.value)
    assert message.startswith("precision.fp8: ")
    assert "linear_fc2 input dimension 1368 per TP shard (from model.ffn_hidden_size, TP 2)" \
        in message
    load_config(_config(tmp_path, "llama-368m", 2))  # no FP8: TP=2 is fine


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_llama_1_2b_has_a_hardware_friendly_ffn(tp: int) -> None:
    """llama-1.2b's FFN is 5461 rounded up to a multiple of 256 (5632): FP8 works at every TP
    that divides its heads; GaLore's odd 5461 would fail even at TP=1."""
    model = model_preset("llama-1.2b")
    assert model.ffn_hidden_size == 5632
    assert fp8_support.shape_problems(model, "delayed", tensor_model_parallel_size=tp) == []
    odd = model_preset("llama-1.2b", ffn_hidden_size=5461)
    problems = fp8_support.shape_problems(odd, "delayed", tensor_model_parallel_size=1)
    assert any("linear_fc2 input dimension 5461" in p for p in problems), problems


def test_mxfp8_needs_multiples_of_32_and_tokens_are_checked() -> None:
    """MXFP8 blocks are 32 wide in both dimensions; the token count per micro-batch must divide
    by 8 (32 for MXFP8) too."""
    problems = fp8_support.shape_problems(model_preset("llama-368m"), "mxfp8")
    assert problems == ["linear_fc2 input dimension 2736 per TP shard (from "
                        "model.ffn_hidden_size, TP 1) is not a multiple of 32"]
    assert fp8_support.shape_problems(model_preset("llama-1.2b"), "mxfp8") == []
    tiny = model_preset("tiny", seq_length=36)
    problems = fp8_support.shape_problems(tiny, "delayed", micro_batch_size=1)
    assert problems == ["36 tokens per micro-batch and TP shard (train.micro_batch_size x "
                        "model.seq_length) is not a multiple of 8"]
    tiny48 = model_preset("tiny", seq_length=48)
    assert fp8_support.shape_problems(tiny48, "delayed", micro_batch_size=1) == []
    assert fp8_support.shape_problems(tiny48, "mxfp8", micro_batch_size=1) == [
        "48 tokens per micro-batch and TP shard (train.micro_batch_size x model.seq_length) is "
        "not a multiple of 32"]


@pytest.mark.parametrize(("recipe", "capability", "message"), [
    ("mxfp8", (9, 0), "'mxfp8' cannot run on this GPU (sm90): MXFP8 needs a Blackwell GPU"),
    ("mxfp8", (12, 0), "'mxfp8' is not supported by Transformer Engine on sm120"),
    ("blockwise", (8, 9), "FP8 block scaling needs Hopper (sm90) or newer"),
    ("delayed", (8, 0), "FP8 needs compute capability 8.9 or newer"),
])
def test_recipes_the_gpu_cannot_run_are_refused(recipe: str, capability: tuple[int, int],
                                                message: str) -> None:
    """MXFP8 on an H100 and the like fail at start-up naming precision.fp8_recipe."""
    with pytest.raises(ValueError, match="^precision.fp8_recipe: ") as info:
        fp8_support.check_hardware(recipe, capability)
    assert message in str(info.value)


@pytest.mark.parametrize(("recipe", "capability"), [
    ("delayed", (9, 0)), ("tensorwise", (9, 0)), ("blockwise", (9, 0)), ("mxfp8", (10, 0)),
    ("delayed", (8, 9)), ("tensorwise", (10, 0))])
def test_recipes_the_gpu_supports_pass(recipe: str, capability: tuple[int, int]) -> None:
    fp8_support.check_hardware(recipe, capability)


def test_fp8_without_transformer_engine_fails_at_start_up() -> None:
    """Where TE is missing, FP8 is refused by the start-up check (not at the first step)."""
    if te.HAVE_TE:
        te.check_fp8(PrecisionConfig(fp8="hybrid"))
        return
    with pytest.raises(ConfigError, match=r"precision\.fp8='hybrid' needs Transformer Engine"):
        te.check_fp8(PrecisionConfig(fp8="hybrid"))
    te.check_fp8(PrecisionConfig())
