"""The one module that imports Transformer Engine (TE): availability, layer spec, FP8 contexts.

TE ships with NGC PyTorch containers on GPU clusters and cannot be installed on CPU machines (it
needs CUDA). Everything else in megatron_step asks this module for the backend: the TE layer spec
when `HAVE_TE`, Megatron's local spec (torch RMSNorm, plain parallel linears) otherwise. FP8 needs
TE; asking for it without TE is an error that names the field and the way out, because megatron-core
would otherwise silently run in full precision (its FP8 context is a `nullcontext` without TE).

LoRA hooks (used by lora.py, which never imports TE itself): `te_linear_kind` says how a TE linear
is split over TP; `lora_branch_input` re-applies the norm that TE fuses into LayerNormLinear
(Megatron builds it with return_layernorm_output=False, so the adapter only sees the raw input);
`check_mergeable` refuses merges into FP8-stored weights. With FP8 on, frozen and new layers
compute in FP8 under Megatron's TE autocast while the LoRA branch runs in `fp8_disabled()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _probe() -> tuple[bool, str]:
    """Import TE only where it can work; return (available, reason when not)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (Transformer Engine needs a GPU)"
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when CUDA libraries are missing
        return False, f"import transformer_engine failed: {exc}"
    return True, ""


HAVE_TE, TE_UNAVAILABLE_REASON = _probe()


def require_te(field: str, value: object) -> None:
    """Raise ValueError for a setting that needs TE when TE is absent."""
    if not HAVE_TE:
        raise ValueError(f"{field}={value!r} needs Transformer Engine ({TE_UNAVAILABLE_REASON}); "
                         f"set {field}: null, or run in an NGC PyTorch container on a GPU")


def te_layer_spec():  # noqa: ANN201 (megatron ModuleSpec, imported lazily)
    """Megatron's TE layer spec for a dense LLaMA layer (fused RMSNorm into qkv/fc1)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


def fp8_recipe(precision):  # noqa: ANN001, ANN201 (PrecisionConfig -> TE recipe)
    """The TE FP8 recipe object for `precision.fp8_recipe` (GPU only)."""
    from transformer_engine.common import recipe

    fmt = recipe.Format.HYBRID if precision.fp8 == "hybrid" else recipe.Format.E4M3
    if precision.fp8_recipe == "delayed":
        return recipe.DelayedScaling(fp8_format=fmt)
    if precision.fp8_recipe == "tensorwise":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    if precision.fp8_recipe == "mxfp8":
        return recipe.MXFP8BlockScaling(fp8_format=fmt)
    return recipe.Float8BlockScaling(fp8_format=fmt)


@contextlib.contextmanager
def fp8_disabled() -> Iterator[None]:
    """Run a region (the LoRA branch) outside FP8 autocast; a no-op without TE."""
    if not HAVE_TE:
        yield
        return
    import transformer_engine.pytorch as te_pytorch

    with te_pytorch.fp8_autocast(enabled=False):
        yield


def te_linear_kind(module: torch.nn.Module) -> str | None:
    """'column' / 'row' for Megatron's TE parallel linears; None otherwise or without TE."""
    if not HAVE_TE:
        return None
    from megatron.core.extensions import transformer_engine as megatron_te

    if isinstance(module, megatron_te.TELayerNormColumnParallelLinear
                  | megatron_te.TEColumnParallelLinear):
        return "column"
    if isinstance(module, megatron_te.TERowParallelLinear):
        return "row"
    return None


def lora_branch_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input the LoRA branch of `module` must see: x, normalised for TE LayerNormLinear.

    TE fuses the layer's RMSNorm/LayerNorm into LayerNormLinear (linear_qkv, linear_fc1 of the
    TE spec) and never hands the normalised input out, so the branch recomputes it in fp32 with
    the module's own norm weight and epsilon.
    """
    if not HAVE_TE:
        return x
    from transformer_engine.pytorch import LayerNormLinear

    if not isinstance(module, LayerNormLinear):
        return x
    weight = module.layer_norm_weight.float()
    if module.zero_centered_gamma:
        weight = weight + 1.0
    xf = x.float()
    if module.normalization == "RMSNorm":
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + module.eps) * weight
    else:
        bias = module.layer_norm_bias.float()
        y = torch.nn.functional.layer_norm(xf, (xf.shape[-1],), weight, bias, module.eps)
    return y.to(x.dtype)


def check_mergeable(weight: torch.Tensor, name: str) -> None:
    """Raise ValueError when `weight` is stored in FP8 (a TE QuantizedTensor).

    Adding a LoRA delta to an FP8 weight and re-quantising rounds most of the delta away: it is
    far below the FP8 step of the weight. Merge into a bf16 copy instead.
    """
    from megatron.core.fp8_utils import is_float8tensor

    if is_float8tensor(weight):
        raise ValueError(f"{name}: the base weight is stored in FP8; merging the LoRA delta into "
                         "it would round the delta away. Keep weights that receive merges in "
                         "bf16 (precision.fp8_frozen_storage: false), or merge into a bf16 copy")
