"""The one module that imports Transformer Engine (TE): availability, layer spec, FP8 contexts.

TE ships with NGC PyTorch containers on GPU clusters and cannot be installed on CPU machines (it
needs CUDA). Everything else in megatron_step asks this module for the backend: the TE layer spec
when `HAVE_TE`, Megatron's local spec (torch RMSNorm, plain parallel linears) otherwise. FP8 needs
TE; asking for it without TE is an error that names the field and the way out, because megatron-core
would otherwise silently run in full precision (its FP8 context is a `nullcontext` without TE).

LoRA hooks (used by lora.py, which never imports TE itself): `te_linear_kind` says how a TE linear
is split over TP; `returning_norm_output` / `split_norm_output` hand the branch of a norm-fused
LayerNormLinear TE's own normalised input (Megatron builds it with return_layernorm_output=False);
`check_mergeable` refuses merges into FP8-stored weights. With FP8 on, frozen and new layers
compute in FP8 under Megatron's TE autocast while the LoRA branch runs in `fp8_disabled()`
(`transformer_engine.pytorch.autocast` from TE 2.9, `fp8_autocast` before: the old name is
deprecated there and warns).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megatron_step import fp8_support
from megatron_step.config import ConfigError, PrecisionConfig


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
    """Raise ConfigError for a setting that needs TE when TE is absent."""
    if not HAVE_TE:
        raise ConfigError(f"{field}={value!r} needs Transformer Engine "
                          f"({TE_UNAVAILABLE_REASON}); set {field}: null, or run in an NGC "
                          "PyTorch container on a GPU")


def check_fp8(precision: PrecisionConfig) -> None:
    """Refuse FP8 settings this process cannot run, before anything is built (start-up).

    Raises:
        ConfigError: FP8 without TE, or a recipe this GPU's compute capability lacks (MXFP8 on
            an H100, say), naming the field.
    """
    if HAVE_TE and precision.fp8_frozen_storage and precision.fp8_frozen_block_size:
        raise ConfigError("precision.fp8_frozen_block_size: the TE layer spec stores frozen "
                          "weights as TE Float8Tensors, one scale per tensor; block scales apply "
                          "to Megatron's local spec only (set it to 0)")
    if precision.fp8 is None:
        return
    require_te("precision.fp8", precision.fp8)
    try:
        fp8_support.check_hardware(precision.fp8_recipe, torch.cuda.get_device_capability())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def te_layer_spec():  # noqa: ANN201 (megatron ModuleSpec, imported lazily)
    """Megatron's TE layer spec for a dense LLaMA layer (fused RMSNorm into qkv/fc1)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


@contextlib.contextmanager
def fp8_disabled() -> Iterator[None]:
    """Run a region (the LoRA branch) outside FP8 autocast; a no-op without TE."""
    if not HAVE_TE:
        yield
        return
    import transformer_engine.pytorch as te_pytorch

    # TE >= 2.9: autocast; fp8_autocast is deprecated there (DeprecationWarning) but still works
    autocast = getattr(te_pytorch, "autocast", None) or te_pytorch.fp8_autocast
    with autocast(enabled=False):
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


def fuses_norm(module: torch.nn.Module) -> bool:
    """Whether `module` is a TE LayerNormLinear (linear_qkv, linear_fc1 of the TE spec), whose
    input is the *un-normalised* residual stream: its norm is fused into the GEMM."""
    if not HAVE_TE:
        return False
    from transformer_engine.pytorch import LayerNormLinear

    return isinstance(module, LayerNormLinear)


@contextlib.contextmanager
def returning_norm_output(module: torch.nn.Module) -> Iterator[None]:
    """Make a TE LayerNormLinear also return its normalised input for this forward.

    The LoRA branch of a norm-fused linear needs norm(x). TE computes it anyway and hands it out
    with `return_layernorm_output=True` (an attribute read at each forward in TE 2.1-2.11; from
    2.9 `return_layernorm_output_gathered` must be set alongside). Recomputing the norm in the
    branch instead would keep fp32 and bf16 copies of the residual for backward (about 12 s b h
    bytes per frozen layer); reusing TE's output costs nothing in bf16 (it is the very tensor TE
    saves) and 1 byte per element under FP8 (memory.py counts it). Megatron builds the module
    with the flag off, so it is restored afterwards.
    """
    saved = module.return_layernorm_output, getattr(module, "return_layernorm_output_gathered",
                                                    None)
    module.return_layernorm_output = True
    if saved[1] is not None:
        module.return_layernorm_output_gathered = False
    try:
        yield
    finally:
        module.return_layernorm_output = saved[0]
        if saved[1] is not None:
            module.return_layernorm_output_gathered = saved[1]


def split_norm_output(result: tuple) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(output, bias, normalised input) from Megatron's TELayerNormColumnParallelLinear forward
    run under `returning_norm_output`.

    Megatron wraps TE's return value: without a returned bias TE gives `(out, ln_out)` and
    Megatron returns `((out, ln_out), None)`; with one TE gives `(out, bias, ln_out)`, which
    Megatron passes through (megatron/core/extensions/transformer_engine.py, 0.16.1, L890-907).
    """
    if len(result) == 3:
        return result[0], result[1], result[2]
    (output, norm_output), bias = result
    return output, bias, norm_output


@torch.no_grad()
def requantize_frozen_weight(module: torch.nn.Module, weight: torch.Tensor,
                             amax: torch.Tensor) -> None:
    """Make a TE linear's frozen weight a TE Float8Tensor (E4M3) of `weight` (its master).

    TE consumes such a weight directly in FP8 GEMMs under FP8 autocast and de-quantizes it per
    forward otherwise (TE 2.x `_get_weight_tensors`). The quantizer is TE's delayed-scaling one
    with the scale set from `amax`, the whole tensor's over TP (`Float8Quantizer(scale, amax,
    fp8_dtype)` in `transformer_engine/pytorch/tensor/float8_tensor.py`, TE 2.1-2.11), i.e. one
    scale per tensor; row-wise and column-wise (Hopper: the transpose for the input gradient).
    """
    import transformer_engine_torch as tex
    from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer

    amax = amax.to(weight.device).float().clamp(min=1e-12)
    quantizer = Float8Quantizer(scale=448.0 / amax, amax=amax, fp8_dtype=tex.DType.kFloat8E4M3,
                                rowwise=True, columnwise=True)
    _replace_weight(module, quantizer(weight))


@torch.no_grad()
def restore_frozen_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Give a TE linear its frozen weight back as a plain tensor in the params dtype."""
    _replace_weight(module, weight)


def _replace_weight(module: torch.nn.Module, value: torch.Tensor) -> None:
    old = module.weight
    module.weight = torch.nn.Parameter(value, requires_grad=False)
    module.weight.__dict__.update({k: v for k, v in old.__dict__.items()
                                   if not k.startswith("_")})  # Megatron's TP attributes


def stored_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really occupies: a TE QuantizedTensor reports its nominal dtype (bf16) in
    `element_size()`, but holds FP8 data, its transpose on Hopper, and scales."""
    if not HAVE_TE:
        return tensor.numel() * tensor.element_size()
    from megatron.core.fp8_utils import is_float8tensor

    if not is_float8tensor(tensor):
        return tensor.numel() * tensor.element_size()
    parts = (getattr(tensor, name, None) for name in ("_data", "_transpose", "_scale_inv",
                                                      "_rowwise_data", "_columnwise_data"))
    return sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))


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
