"""The LLaMA builder: presets, parameter counts, backend selection and the CPU shims."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_step import cpu_compat, te
from megatron_step.config import MODEL_PRESETS, ParallelConfig, PrecisionConfig, model_preset
from megatron_step.layout import ParallelSizes, check_layout, pipeline_split
from megatron_step.memory import count_parameters
from megatron_step.model import (
    SeededTransformerLayer,
    build_model,
    layer_spec,
    pipeline_layout,
)

from builders import FP32, random_tokens


class _ForceMeta(TorchFunctionMode):
    """Send every tensor factory to the meta device, even with an explicit `device=`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_preset_parameter_count_matches_closed_form(world1: None, name: str) -> None:
    """Megatron's GPTModel, built on the meta device (nothing allocated), has exactly the
    closed-form parameter count the planner uses; llama-368m is the known 367.97M."""
    model = model_preset(name)
    with _ForceMeta():
        gpt = build_model(model, model.num_layers, ParallelConfig(), FP32, pre_process=True,
                          post_process=True, initialize=False)
    assert {p.device.type for p in gpt.parameters()} == {"meta"}
    assert sum(p.numel() for p in gpt.parameters()) == count_parameters(model)
    if name == "llama-368m":
        assert count_parameters(model) == 367_969_280


def test_tiny_model_runs_forward_and_backward(world1: None) -> None:
    """Real megatron-core layers (attention with GQA, SwiGLU, RoPE, RMSNorm) train, on CPU once
    the compatibility layer is on: finite loss and a gradient on every parameter."""
    tiny = model_preset("tiny")
    gpt = build_model(tiny, 4, ParallelConfig(), FP32, pre_process=True, post_process=True)
    device = next(gpt.parameters()).device  # the GPU on a GPU node
    tokens = random_tokens(tiny).to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    loss = gpt(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpt.parameters())


def test_fp8_needs_transformer_engine() -> None:
    """megatron-core silently ignores FP8 without TE: we refuse it there, naming the field and
    the way out; where TE is present the same request builds the TE spec."""
    if te.HAVE_TE:
        assert layer_spec(PrecisionConfig(fp8="hybrid")) is not None
        return
    with pytest.raises(ValueError, match=r"precision\.fp8='hybrid' needs Transformer Engine"):
        layer_spec(PrecisionConfig(fp8="hybrid"))


def test_layer_spec_follows_transformer_engine_availability() -> None:
    """TE's fused layers where TE imports (GPU), Megatron's local spec with torch RMSNorm
    everywhere else; our seeded layer wraps either."""
    spec = layer_spec(PrecisionConfig())
    linear_qkv = repr(spec.submodules.self_attention.submodules.linear_qkv)
    assert ("TELayerNormColumnParallelLinear" in linear_qkv) == te.HAVE_TE
    assert spec.module is SeededTransformerLayer


@pytest.mark.gpu
def test_model_lives_on_the_gpu_when_cuda_is_present(world1: None) -> None:
    """With CUDA nothing is patched and the model's parameters are on the GPU."""
    assert not cpu_compat.is_enabled()
    gpt = build_model(model_preset("tiny"), 4, ParallelConfig(), FP32, pre_process=True,
                      post_process=True)
    assert all(p.is_cuda for p in gpt.parameters())


def test_compat_layer_is_not_a_side_effect_of_import() -> None:
    """Importing the package (and megatron-core) patches nothing; only enable() does."""
    code = ("import torch, megatron_step, megatron_step.model, megatron_step.parallel\n"
            "from megatron_step import cpu_compat\n"
            "assert not cpu_compat.is_enabled()\n"
            "assert torch.cuda.current_device.__module__.startswith('torch')\n"
            "print(cpu_compat.enable(), cpu_compat.enable(), torch.zeros(1, device='cuda'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    expected = "False False" if torch.cuda.is_available() else "True True tensor([0.])"
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(("layers", "pp", "split"), [(4, 2, [2, 2]), (13, 2, [7, 6]),
                                                     (6, 4, [2, 2, 1, 1]), (5, 1, [5])])
def test_pipeline_split_is_as_even_as_possible(layers: int, pp: int, split: list[int]) -> None:
    """Any depth works at any PP <= depth; Megatron gets it as an explicit layout."""
    assert pipeline_split(layers, pp) == split
    layout = pipeline_layout(layers, pp)
    if pp == 1:
        assert layout is None
    else:
        assert layout[0][0] == "embedding" and layout[-1][-1] == "loss"
        assert [row.count("decoder") for row in layout] == split


@pytest.mark.parametrize(("world", "tp", "pp", "message"), [
    (6, 4, 1, "world size 6 is not divisible by tensor_model_parallel_size (4) x "
              "pipeline_model_parallel_size (1) = 4"),
    (8, 8, 1, "tensor_model_parallel_size: 8 does not divide model.num_attention_heads (4)"),
    (4, 4, 1, "tensor_model_parallel_size: 4 does not divide model.num_query_groups (2)"),
    (5, 1, 5, "pipeline_model_parallel_size: 5 pipeline stages > 4 layers"),
])
def test_impossible_layouts_name_the_setting(world: int, tp: int, pp: int, message: str) -> None:
    """Layout errors say which setting is wrong and print the numbers involved."""
    with pytest.raises(ValueError) as info:
        check_layout(model_preset("tiny"), 4, ParallelSizes(world, tp, pp))
    assert message in str(info.value)


def test_ffn_and_vocab_divisibility_are_checked() -> None:
    """TP must divide the FFN and vocabulary sizes too (Megatron shards both)."""
    odd = model_preset("tiny", ffn_hidden_size=129)
    with pytest.raises(ValueError, match=r"does not divide model.ffn_hidden_size \(129\)"):
        check_layout(odd, 4, ParallelSizes(2, 2, 1))
    with pytest.raises(ValueError, match=r"does not divide model.vocab_size \(255\)"):
        check_layout(model_preset("tiny", vocab_size=255), 4, ParallelSizes(2, 2, 1))
