"""FP8 on a real GPU with Transformer Engine: start-up checks and growth's FP8 scaling history.

Marked `gpu` and `te`: reported as not run on CPU machines. tests/gpu_check.sh runs them on the
first GPU the project gets.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_step import te
from megatron_step.config import (
    ConfigError,
    GrowthConfig,
    ParallelConfig,
    PrecisionConfig,
    model_preset,
)
from megatron_step.growth import default_provenance, layer_map
from megatron_step.growth_online import grow_model
from megatron_step.model import build_model

from builders import microbatches, random_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.te]

FP8 = PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="delayed")


def test_this_gpus_recipes_are_checked_at_start_up() -> None:
    """On this GPU the delayed recipe passes the start-up check; MXFP8 passes only on sm10x
    and is otherwise refused naming precision.fp8_recipe (not at the first FP8 forward)."""
    te.check_fp8(FP8)
    mxfp8 = PrecisionConfig(params_dtype="bf16", fp8="e4m3", fp8_recipe="mxfp8")
    if torch.cuda.get_device_capability()[0] == 10:
        te.check_fp8(mxfp8)
    else:
        with pytest.raises(ConfigError, match=r"^precision\.fp8_recipe: 'mxfp8'"):
            te.check_fp8(mxfp8)


def _history(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward scales, forward amax history) of a TE module's delayed-scaling state, decoded
    from its `_extra_state` (a pickled dict in TE 2.x, module/base.py get_extra_state)."""
    state = pickle.loads(module.get_extra_state().detach().cpu().numpy().tobytes())
    return state["scale_fwd"], state["amax_history_fwd"]


def test_grown_layers_keep_their_fp8_scaling_history(world1: None) -> None:
    """After one FP8 training step the TE linears hold a delayed-scaling history; growth gives
    every moved layer its own history and every mean layer its lower source's, instead of the
    scale-1 start of a fresh module (zeroed small weights in the first micro-batch)."""
    tiny = model_preset("tiny")
    model_parallel_cuda_manual_seed(0)
    gpt = build_model(tiny, 4, ParallelConfig(), FP8, pre_process=True, post_process=True)
    batch = microbatches(random_tokens(tiny).cuda())[0]
    loss = gpt(batch["tokens"], batch["position_ids"].cuda(), None, labels=batch["labels"])
    loss.float().mean().backward()
    old = {i: _history(layer.self_attention.linear_qkv)
           for i, layer in enumerate(gpt.decoder.layers)}
    assert all(float(amax.abs().max()) > 0 for _, amax in old.values())
    chunks, _ = grow_model([gpt], default_provenance(4), tiny, 6, GrowthConfig(),
                           ParallelConfig(), FP8, stage=2)
    sources = layer_map(4, 2, GrowthConfig())
    for index, layer in enumerate(chunks[0].decoder.layers):
        scale, amax = _history(layer.self_attention.linear_qkv)
        want_scale, want_amax = old[sources[index].old[0]]
        assert torch.equal(scale, want_scale) and torch.equal(amax, want_amax), index
