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


def test_frozen_te_weights_are_stored_as_float8_tensors(world1: None) -> None:
    """With fp8_frozen_storage on the TE spec, frozen linear weights become TE Float8Tensors
    (consumed directly by FP8 GEMMs), their bf16 masters stay on the host, a training step runs
    with adapters getting gradients, merges go into the masters and `restore` gives plain bf16
    weights equal to them back."""
    from megatron.core.fp8_utils import is_float8tensor

    from megatron_step import fp8_storage
    from megatron_step.config import LoraConfig
    from megatron_step.lora import adapted_modules, freeze_and_adapt, lora_delta, merge_adapters

    tiny = model_preset("tiny")
    model_parallel_cuda_manual_seed(0)
    gpt = build_model(tiny, 4, ParallelConfig(), FP8, pre_process=True, post_process=True)
    freeze_and_adapt([gpt], {0, 1}, LoraConfig(rank=4, alpha=8.0), seed=1, fp8_block_size=0)
    stored = fp8_storage.stored_modules([gpt])
    assert len(stored) == 8
    for module in stored:
        assert is_float8tensor(module.weight) and not module.weight.requires_grad
        assert module.fp8_master.dtype == torch.bfloat16 and module.fp8_master.device.type == "cpu"
    batch = microbatches(random_tokens(tiny).cuda())[0]
    loss = gpt(batch["tokens"], batch["position_ids"].cuda(), None, labels=batch["labels"])
    loss.float().mean().backward()
    grads = [p.grad for n, p in gpt.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for module in adapted_modules([gpt]):
            module.lora_b.weight.normal_(0, 0.05)
    expected = {id(m): (m.fp8_master.float() + lora_delta(m).cpu()).bfloat16()
                for m in adapted_modules([gpt])}
    modules = {id(m): m for m in adapted_modules([gpt])}
    merge_adapters([gpt])
    fp8_storage.restore([gpt])
    for key, module in modules.items():
        assert not is_float8tensor(module.weight) and module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight.cpu(), expected[key])
