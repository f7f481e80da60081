"""Frozen base weights stored in FP8 on the device, full precision kept on the host.

In late STEP stages the frozen layers are the largest item of per-GPU memory (2 bytes per
parameter in bf16). `precision.fp8_frozen_storage` stores each frozen linear weight of the local
spec as `torch.float8_e4m3fn` (1 byte) with fp32 scales, and computes with it by de-quantizing one
layer at a time (`Fp8FrozenLinear`): forward y = x dequant(q)^T, backward dx = dy dequant(q); only
q and its scales are saved for backward (they live on anyway), never a bf16 weight. Adapters, new
layers, norms and embeddings stay in the params dtype.

Formats (E4M3: 3 mantissa bits, so an element is rounded to within 2^-4 relative, largest 448):
- per output channel (`fp8_frozen_block_size: 0`, the default): one scale per row of W, from the
  amax of the *whole* row; a row-parallel shard [out, in / TP] all-reduces its row maxima over TP,
  so every layout quantizes a weight identically (a TP=2 run matches TP=1);
- per block (`fp8_frozen_block_size: N`): one scale per N consecutive input elements of a row,
  finer where a row mixes large and small values; N must divide the per-shard input dimension.
Scales are amax / 448, so every element maps into E4M3's range without clipping.

No precision drift across stages: FP8 exists only in device memory. Each stored module keeps its
weight in the params dtype on the host (`fp8_master`, pinned CPU memory on GPU machines; 2 bytes
per frozen parameter of host RAM in bf16); checkpoints save that master (stage-end and mid-stage
checkpoints hold params-dtype weights, exactly as without FP8 storage); a LoRA merge or ReLoRA
restart adds its delta to the master in fp32 and re-quantizes from it (`add_to_master`), and a
stage boundary restores the masters to the device before growing (`restore`), so the next stage
quantizes afresh from full-precision weights. Rounding never compounds.

The TE spec (GPU) stores TE's own Float8Tensor through `te.quantize_frozen_weight` with the same
host master; its scale granularity is the FP8 recipe's (per tensor for delayed/tensorwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from megatron_step import collectives, te

FP8_FORMAT = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_FORMAT).max)  # 448
_TINY = 1e-12  # floor for an all-zero row's amax


# ---------------------------------------------------------------------------------------------
# Pure quantization


def block_amax(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """|W| maxima in fp32: per row [out] (block_size 0) or per row block [out, in / block]."""
    magnitude = weight.detach().float().abs()
    if block_size == 0:
        return magnitude.amax(dim=1)
    out, inputs = magnitude.shape
    return magnitude.reshape(out, inputs // block_size, block_size).amax(dim=2)


def quantize(weight: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn like `weight`, fp32 scales like `amax`) with dequant(q) ~ weight.

    Args:
        weight: [out, in] in any float dtype.
        amax: `block_amax` of the weight (or of the full row it is a shard of).
    """
    scale = amax.clamp(min=_TINY) / FP8_MAX
    expanded = _expand(scale, weight.shape)
    q = (weight.detach().float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_FORMAT)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight q encodes, in `dtype` (computed in fp32, then cast once)."""
    return (q.float() * _expand(scale, q.shape)).to(dtype)


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Scales [out] or [out, blocks] broadcast to [out, in]."""
    if scale.dim() == 1:
        return scale[:, None]
    out, inputs = shape
    return scale.repeat_interleave(inputs // scale.shape[1], dim=1)


def scale_elements(out_features: int, in_features: int, block_size: int) -> int:
    """Scales one stored [out, in] weight shard holds."""
    return out_features * (in_features // block_size if block_size else 1)


def _gemm_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight a GEMM multiplies by: q in `dtype` (exact: E4M3 fits bf16), times the block
    scales broadcast in `dtype`; per-channel scales are applied to the GEMM output instead."""
    weight = q.to(dtype)  # the only full-size transient: 2 bytes per element in bf16
    if scale.dim() == 2:
        out, inputs = q.shape
        weight = (weight.view(out, scale.shape[1], -1) * scale.to(dtype)[:, :, None]).view(
            out, inputs)
    return weight


class Fp8FrozenLinear(torch.autograd.Function):
    """y = x dequant(q)^T with a frozen FP8 weight; backward re-de-quantizes for dx.

    Saves q and its scales only (both persistent), so no high-precision weight outlives the
    layer's forward or backward. Per-channel scales multiply the output (forward) and the
    incoming gradient (backward) rather than a de-quantized weight, so the transient is q in
    the compute dtype alone. The TP all-reduce of dx mirrors Megatron's `LinearWithFrozenWeight`
    (megatron/core/tensor_parallel/layers.py, 0.16.1, L325-357).
    """

    @staticmethod
    def forward(ctx: Any, input_: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                allreduce_dgrad: bool, tp_group: Any) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        ctx.allreduce_dgrad, ctx.tp_group = allreduce_dgrad, tp_group
        output = torch.matmul(input_, _gemm_weight(q, scale, input_.dtype).t())
        return output * scale.to(output.dtype) if scale.dim() == 1 else output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        q, scale = ctx.saved_tensors
        if scale.dim() == 1:
            grad_output = grad_output * scale.to(grad_output.dtype)
        grad_input = grad_output.matmul(_gemm_weight(q, scale, grad_output.dtype))
        if ctx.allreduce_dgrad:
            grad_input = collectives.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None


# ---------------------------------------------------------------------------------------------
# The stored linear (local spec)


class Fp8StoredLinear(torch.nn.Module):
    """Mixin placed before a Megatron parallel linear's class: FP8 weight, host master.

    Never instantiated directly: `store` swaps a module's class for `_stored_class(type(module))`
    and adds the host tensor `fp8_master`; on the local spec it also turns `weight` into a
    float8 parameter with the buffer `fp8_scale` (a TE linear holds a TE Float8Tensor instead and
    never calls `_forward_impl`). Checkpoints save and load the master on both. Parameter names
    and checkpoint keys stay.
    """

    fp8_master: torch.Tensor
    fp8_block_size: int
    fp8_base_class: type

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002 (Megatron)
                      bias: torch.Tensor | None = None, gradient_accumulation_fusion: bool = False,
                      allreduce_dgrad: bool = False, sequence_parallel: bool = False,
                      tp_group: Any = None, **unused: Any) -> torch.Tensor:
        """Megatron's `linear_with_frozen_weight` (same communication), with an FP8 weight."""
        if weight.dtype != FP8_FORMAT:  # e.g. module.bfloat16() cast the codes, not the values
            raise RuntimeError(f"{type(self).__name__}: the FP8-stored weight was cast to "
                               f"{weight.dtype}; FP8-stored modules must not be cast (restore "
                               "them with fp8_storage.restore first)")
        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                         group=tp_group)
        output = Fp8FrozenLinear.apply(input, weight, self.fp8_scale, allreduce_dgrad, tp_group)
        return output if bias is None else output + bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """The base entries, with the weight's data taken from the full-precision master."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key = f"{prefix}weight"
        state[key] = dataclasses.replace(state[key], data=self.fp8_master,
                                         dtype=self.fp8_master.dtype)
        return state

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A loaded weight becomes the new master and is quantized again (resume, reload).

        The base class first copies it into the FP8 parameter as a plain cast; `set_master`
        then replaces that with the scaled quantization.
        """
        super()._load_from_state_dict(state_dict, prefix, *args)
        if f"{prefix}weight" in state_dict:
            set_master(self, state_dict[f"{prefix}weight"])


@cache
def _stored_class(base: type) -> type:
    return type(f"Fp8{base.__name__}", (Fp8StoredLinear, base), {"fp8_base_class": base})


def is_stored(module: torch.nn.Module) -> bool:
    """Whether `module` holds its weight in FP8 through this module (or TE)."""
    return hasattr(module, "fp8_master")


def _tp_group_of(module: torch.nn.Module) -> Any:
    for attribute in ("_tp_group", "tp_group"):
        group = getattr(module, attribute, None)
        if group is not None:
            return group
    return get_tensor_model_parallel_group_if_none(None)


def _row_parallel(module: torch.nn.Module) -> bool:
    from megatron.core.tensor_parallel import RowParallelLinear

    return isinstance(module, RowParallelLinear) or te.te_linear_kind(module) == "row"


@torch.no_grad()
def set_master(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Make `weight` (params dtype, this rank's shard) the module's master and re-quantize."""
    pin = torch.cuda.is_available()
    master = getattr(module, "fp8_master", None)
    if master is None or master.shape != weight.shape:
        master = torch.empty(weight.shape, dtype=module.config.params_dtype, pin_memory=pin)
        module.fp8_master = master
    master.copy_(weight.detach())
    _quantize_into(module)


def _quantize_into(module: torch.nn.Module) -> None:
    """module.weight <- FP8 of the master (TE: TE's Float8Tensor), in place."""
    device = module.weight.device
    weight = module.fp8_master.to(device, non_blocking=True)
    if te.te_linear_kind(module) is not None:  # one scale per tensor, the same on every TP rank
        amax = weight.detach().abs().amax().float().reshape(1)
        te.requantize_frozen_weight(module, weight, collectives.all_reduce(
            amax, "max", group=_tp_group_of(module)))
        return
    amax = block_amax(weight, module.fp8_block_size)
    if module.fp8_block_size == 0 and _row_parallel(module):  # a row is split over TP ranks
        amax = collectives.all_reduce(amax, "max", group=_tp_group_of(module))
    q, scale = quantize(weight, amax)
    module.weight.data = q
    module.fp8_scale = scale  # a registered (non-persistent) buffer: follows .cuda()


@torch.no_grad()
def store(module: torch.nn.Module, block_size: int) -> None:
    """Store a frozen Megatron parallel linear's weight in FP8, its master on the host.

    Raises:
        ValueError: the weight is trainable, or `block_size` does not divide its input dimension.
    """
    if module.weight.requires_grad:
        raise ValueError("fp8_frozen_storage: only frozen weights can be stored in FP8")
    in_local = module.weight.shape[1]
    if block_size and in_local % block_size:
        raise ValueError(f"precision.fp8_frozen_block_size: {block_size} does not divide the "
                         f"per-shard input dimension {in_local} of {type(module).__name__}")
    master = module.weight.detach()
    module.__class__ = _stored_class(type(module))  # checkpoints save and load the master
    module.fp8_block_size = block_size
    if te.te_linear_kind(module) is None:  # TE modules get TE's Float8Tensor instead
        old = module.weight
        module.weight = torch.nn.Parameter(torch.empty(old.shape, dtype=FP8_FORMAT,
                                                       device=old.device), requires_grad=False)
        module.weight.__dict__.update(old.__dict__)  # Megatron's TP attributes
        module.register_buffer("fp8_scale", torch.empty(0, device=old.device), persistent=False)
    set_master(module, master)


@torch.no_grad()
def restore(chunks: Iterable[torch.nn.Module]) -> None:
    """Put every stored weight back in the params dtype on the device (from its master).

    Called at a stage boundary, after the adapters are merged and before growth reads the old
    model's weights. Afterwards the modules are the plain Megatron linears they were.

    Raises:
        ValueError: a stored module still carries LoRA adapters (merge them first).
    """
    modules = stored_modules(chunks)
    adapted = [type(m).__name__ for m in modules if hasattr(m, "lora_state")]
    if adapted:
        raise ValueError(f"fp8_storage.restore: {len(adapted)} stored linears still carry LoRA "
                         "adapters; call lora.merge_adapters(chunks) first")
    for module in modules:
        weight = module.fp8_master.to(module.weight.device)
        if te.te_linear_kind(module) is not None:
            te.restore_frozen_weight(module, weight)
        else:
            old = module.weight
            module.weight = torch.nn.Parameter(weight, requires_grad=False)
            module.weight.__dict__.update(old.__dict__)
            del module.fp8_scale
        module.__class__ = module.fp8_base_class
        del module.fp8_master, module.fp8_block_size


@torch.no_grad()
def add_to_master(module: torch.nn.Module, delta: torch.Tensor) -> None:
    """W_master <- W_master + delta in fp32 (one rounding to the params dtype), re-quantize.

    Raises:
        ValueError: the sum is not finite (the master is left unchanged).
    """
    merged = module.fp8_master.float() + delta.to(module.fp8_master.device).float()
    if not torch.isfinite(merged).all():
        raise ValueError("merging a LoRA delta into an FP8-stored weight gives non-finite "
                         "weights")
    set_master(module, merged.to(module.fp8_master.dtype))


def stored_modules(chunks: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """Every FP8-stored linear of the chunks, in module order."""
    return [m for chunk in chunks for m in chunk.modules() if is_stored(m)]


def stored_bytes(chunks: Sequence[torch.nn.Module]) -> int:
    """Device bytes of the scales (the FP8 weights are parameters, counted with them)."""
    return sum(m.fp8_scale.numel() * m.fp8_scale.element_size()
               for m in stored_modules(chunks) if hasattr(m, "fp8_scale"))
