"""The one module that imports Transformer Engine (TE): availability, layer spec, FP8 contexts.

TE ships with NGC PyTorch containers on GPU clusters and cannot be installed on CPU machines (it
needs CUDA). Everything else in megatron_step asks this module for the backend: the TE layer spec
when `HAVE_TE`, Megatron's local spec (torch RMSNorm, plain parallel linears) otherwise. FP8 needs
TE; asking for it without TE is an error that names the field and the way out, because megatron-core
would otherwise silently run in full precision (its FP8 context is a `nullcontext` without TE).
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
