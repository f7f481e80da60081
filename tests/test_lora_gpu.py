"""LoRA on the Transformer Engine layer spec and under FP8 (GPU node with TE only).

On CPU machines these tests are reported as not run (markers `gpu` and `te`). They run in the
pytest process on one GPU (the `world1` fixture), because multi-process worlds are CPU-only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_step import te
from megatron_step.config import LoraConfig, ParallelConfig, PrecisionConfig, model_preset
from megatron_step.forward import compute_logits
from megatron_step.lora import adapted_modules, freeze_and_adapt, merge_adapters
from megatron_step.model import build_model

from builders import random_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.te]

LORA = LoraConfig(rank=4, alpha=8.0)
SEED = 11
# fp32 comparisons on the GPU: TE runs fp32 GEMMs in TF32 on Ampere and newer (a 10-bit mantissa:
# every input is rounded at 2^-11 relative), so the same values through two GEMM orders agree to
# about 1e-3 relative, not 1e-6 as on CPU. 5e-3 holds for the tiny model's logits (|x| < 10) and
# for LoRA deltas computed next to base outputs of magnitude ~1.
TF32 = {"atol": 5e-3, "rtol": 5e-3}


def _te_model(precision: PrecisionConfig) -> torch.nn.Module:
    """Tiny LLaMA on the TE spec, layers 0-1 frozen + adapted, non-zero B; same weights on
    every call (CPU-initialised from reseeded generators)."""
    tiny = model_preset("tiny")
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    gpt = build_model(tiny, 4, ParallelConfig(), precision, pre_process=True, post_process=True)
    freeze_and_adapt([gpt], {0, 1}, LORA, seed=SEED)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in adapted_modules([gpt]):
            b = torch.randn(module.lora_b.weight.shape, generator=generator) * 0.05
            module.lora_b.weight.copy_(b)
    return gpt


def test_te_linears_adapt_with_the_fused_norm(world1: None) -> None:
    """On the TE spec every target is a TE parallel linear, and the branch of the norm-fused
    linears (qkv, fc1) sees the RMS-normalised input: delta == scale * B A rmsnorm(x).

    Guards a branch fed with TE LayerNormLinear's raw input (Megatron builds it with
    return_layernorm_output=False), which would be off by the norm, and the unpacking of TE's
    (out, ln_out) result that `te.returning_norm_output` asks for.
    """
    gpt = _te_model(PrecisionConfig(params_dtype="fp32"))
    kinds = {m.lora_state.target: te.te_linear_kind(m) for m in adapted_modules([gpt])}
    assert kinds == {"linear_qkv": "column", "linear_proj": "row", "linear_fc1": "column",
                     "linear_fc2": "row"}
    generator = torch.Generator().manual_seed(2)
    for module in adapted_modules([gpt]):
        in_features = module.weight.shape[1]
        x = 3.0 * torch.randn(16, 2, in_features, generator=generator).cuda()
        with torch.no_grad():
            if hasattr(module, "layer_norm_weight"):
                module.layer_norm_weight.copy_(0.5 + torch.rand(in_features, generator=generator))
            adapted = module(x)[0]
            b = module.lora_b.weight.clone()
            module.lora_b.weight.zero_()
            base = module(x)[0]
            module.lora_b.weight.copy_(b)
            branch_input = x
            if module.lora_state.target in ("linear_qkv", "linear_fc1"):
                branch_input = F.rms_norm(x, (in_features,), module.layer_norm_weight,
                                          module.eps)
            expected = LORA.scale * F.linear(F.linear(branch_input, module.lora_a.weight), b)
        torch.testing.assert_close(adapted - base, expected, **TF32,
                                   msg=lambda m, n=module.lora_state.name: f"{n}: {m}")


def test_te_merge_matches_unmerged(world1: None) -> None:
    """merged forward == unmerged forward on the TE spec (fp32 params)."""
    gpt = _te_model(PrecisionConfig(params_dtype="fp32"))
    tokens = random_tokens(model_preset("tiny"))
    logits = compute_logits([gpt], tokens)
    merge_adapters([gpt])
    assert not adapted_modules([gpt])
    torch.testing.assert_close(compute_logits([gpt], tokens), logits, **TF32)


def _loss_and_grads(gpt: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = random_tokens(model_preset("tiny")).cuda()
    positions = torch.arange(tokens.shape[1], device="cuda").unsqueeze(0).expand_as(tokens)
    loss = gpt(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1)).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in gpt.named_parameters() if "lora_" in n}


def test_fp8_layers_train_adapters_in_bf16(world1: None) -> None:
    """With precision.fp8 the layers compute in FP8 (same weights: the loss differs from the
    bf16 run by FP8 rounding only), while adapters stay bf16 parameters with non-zero bf16
    gradients and frozen weights get none."""
    fp8 = _te_model(PrecisionConfig(params_dtype="bf16", fp8="hybrid"))
    fp8_loss, grads = _loss_and_grads(fp8)
    reference = _te_model(PrecisionConfig(params_dtype="bf16"))
    bf16_loss, _ = _loss_and_grads(reference)
    assert torch.isfinite(fp8_loss) and not torch.equal(fp8_loss, bf16_loss)
    assert abs(float(fp8_loss) - float(bf16_loss)) < 0.1, (float(fp8_loss), float(bf16_loss))
    assert grads and all(g is not None and g.dtype == torch.bfloat16 and g.abs().max() > 0
                         for g in grads.values())
    frozen = [n for n, p in fp8.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, frozen


def test_fp8_disabled_leaves_fp8_autocast() -> None:
    """te.fp8_disabled() switches FP8 off inside an FP8 autocast region (the LoRA branch)."""
    import transformer_engine.pytorch as te_pytorch
    try:  # TE >= 2.9 (importing transformer_engine.pytorch.fp8 warns there)
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from transformer_engine.common.recipe import DelayedScaling, Format

    recipe = DelayedScaling(fp8_format=Format.HYBRID)
    autocast = getattr(te_pytorch, "autocast", None)  # TE >= 2.9; fp8_autocast before
    context = (autocast(enabled=True, recipe=recipe) if autocast
               else te_pytorch.fp8_autocast(enabled=True, fp8_recipe=recipe))
    with context:
        assert FP8GlobalStateManager.is_fp8_enabled()
        with te.fp8_disabled():
            assert not FP8GlobalStateManager.is_fp8_enabled()
        assert FP8GlobalStateManager.is_fp8_enabled()


def test_merge_into_fp8_weights_is_refused() -> None:
    """A weight stored in FP8 (TE QuantizedTensor) cannot receive a merge: ValueError naming
    the module, since re-quantising would round the LoRA delta away."""
    import transformer_engine.pytorch as te_pytorch

    quantized_init = getattr(te_pytorch, "quantized_model_init", None) or te_pytorch.fp8_model_init
    with quantized_init(enabled=True):
        linear = te_pytorch.Linear(64, 64, params_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layer 0 linear_fc2: the base weight is stored in FP8"):
        te.check_mergeable(linear.weight, "layer 0 linear_fc2")
