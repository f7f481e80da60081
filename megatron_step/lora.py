"""LoRA adapters on Megatron's tensor-parallel linears: freeze, adapt, merge, checkpoint.

In every STEP stage after the first, the old layers are frozen and trained only through low-rank
adapters (../shared/docs/STEP.md). An adapted linear computes

    y = W x + scale * B (A dropout(x)),    scale = alpha / rank,    A [r, in], B [out, r]

A is Kaiming-uniform over the FULL fan-in (bound 1/sqrt(in), HF PEFT's init) and B is zero, so a
freshly adapted model computes exactly the base function. A depends only on (seed, global layer,
target, step), never on the TP/PP layout.

Shapes: s sequence, b micro-batch, r adapter rank, t TP size; activations are [s, b, features]
(Megatron's sequence-first order), weights [out, in] as torch.nn.functional.linear takes them.

Tensor-parallel layout, chosen so that merging needs no communication:
- column-parallel base (linear_qkv, linear_fc1; W [out/t, in] split on out): A [r, in] is
  replicated, B [out/t, r] is split on out like W. h = A x goes through
  `copy_to_tensor_model_parallel_region`, whose backward all-reduces dL/dh over TP, so A's
  gradient is complete and identical on every TP rank. Merge: W_local += scale * B_local @ A.
- row-parallel base (linear_proj, linear_fc2; W [out, in/t] split on in): A [r, in/t] is split
  on in like W, B [out, r] is replicated. The partial products A_local x_local are all-reduced
  ([s, b, r], r/out of the base's own reduce) before B, so B's gradient is complete on every
  rank with no extra gradient sync. Merge: W_local += scale * B @ A_local.
Replicated adapter weights carry no `tensor_model_parallel` attribute: Megatron counts them once
in the gradient norm and stores them as replicas in checkpoints.

Invariants:
- Adapting swaps the linear's class for a subclass in place (`LoraLinear` first in the MRO):
  base parameter names, the `(output, bias)` contract and the checkpoint keys stay; checkpoints
  gain `<linear>.lora_a.weight` / `<linear>.lora_b.weight`, whose full tensors are in the TP=1
  layout (fc1's B in Megatron's [gate; up] SwiGLU order through `apply_swiglu_sharded_factory`).
  Adapters on some layers only need the per-layer format (checkpoint.SHARDED_METADATA).
- Freezing happens before Megatron DDP and the optimizer are built (optim.wrap_and_optimize):
  frozen weights then get no gradient buffer, no fp32 master copy and no Adam state.
- A merge adds scale * B @ A to W in fp32 and casts back to W's dtype; it refuses FP8-stored
  weights and non-finite results. `merge_adapters(remove=True)` leaves plain Megatron linears.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import (
    param_is_not_tensor_parallel_duplicate,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_step import collectives, fp8_storage, te
from megatron_step.config import LoraConfig
from megatron_step.seeds import derive_seed

LORA_A = "lora_a.weight"
LORA_B = "lora_b.weight"
_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")


def init_lora_a(rank: int, in_features: int, seed: int) -> torch.Tensor:
    """Full A [rank, in_features] in fp32: Kaiming-uniform (a=sqrt(5)), i.e. U(+-1/sqrt(in))."""
    bound = 1.0 / math.sqrt(in_features)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(rank, in_features, generator=generator) * 2.0 - 1.0) * bound


# ---------------------------------------------------------------------------------------------
# The adapted linear


@dataclass(slots=True)
class LoraState:
    """Per-module adapter settings (instance attribute `lora_state` of an adapted linear)."""

    kind: Literal["column", "row"]
    """How the base weight is split over TP (module docstring)."""
    layer: int
    """Global index of the transformer layer holding the module."""
    target: str
    rank: int
    scale: float
    dropout: float
    swiglu: bool
    """B's rows follow Megatron's [gate; up] layout (linear_fc1 of a gated MLP)."""
    merged: bool = False
    """The delta is folded into W (merge with remove=False): the branch is skipped."""

    @property
    def name(self) -> str:
        return f"layer {self.layer} {self.target}"


class LoraWeight(torch.nn.Module):
    """One adapter matrix as `weight` (the branch math lives in `LoraLinear.forward`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


def _tp_group(module: torch.nn.Module) -> dist.ProcessGroup:
    """The module's TP group (Megatron local linears: tp_group, TE wrappers: _tp_group)."""
    for attribute in ("_tp_group", "tp_group"):
        group = getattr(module, attribute, None)
        if isinstance(group, dist.ProcessGroup):
            return group
    return parallel_state.get_tensor_model_parallel_group()


class LoraLinear(torch.nn.Module):
    """Mixin placed before a parallel linear's class: base output + the low-rank branch.

    Never instantiated directly: `freeze_and_adapt` swaps an existing module's class for
    `_adapted_class(type(module))` and adds `lora_a`, `lora_b` and `lora_state`.
    """

    lora_a: LoraWeight
    lora_b: LoraWeight
    lora_state: LoraState
    lora_base_class: type

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.lora_state.merged:
            return super().forward(input_, *args, **kwargs)
        if te.fuses_norm(self):  # the branch sees norm(x), as the base GEMM does
            with te.returning_norm_output(self):
                output, bias, branch_input = te.split_norm_output(
                    super().forward(input_, *args, **kwargs))
        else:
            (output, bias), branch_input = super().forward(input_, *args, **kwargs), input_
        with te.fp8_disabled():  # adapters compute in the params dtype, never in FP8
            delta = self._lora_branch(branch_input)
        return output + delta.to(output.dtype), bias

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B (A dropout(x)) for this rank's share of the output ([s, b, *])."""
        state = self.lora_state
        group = _tp_group(self)
        if state.kind == "column":
            if state.dropout and self.training:  # x is replicated over TP: same mask everywhere
                x = F.dropout(x, state.dropout)
            h = copy_to_tensor_model_parallel_region(F.linear(x, self.lora_a.weight), group=group)
        else:
            if state.dropout and self.training:  # x is split over TP: independent masks
                with get_cuda_rng_tracker().fork():
                    x = F.dropout(x, state.dropout)
            h = reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_a.weight),
                                                         group=group)
        return F.linear(h, self.lora_b.weight) * state.scale  # [s, b, out_local]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict[str, Any]:
        """Base entries plus A and B sharded like the module docstring's TP layout."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {LORA_B: 0} if self.lora_state.kind == "column" else {LORA_A: 1}
        adapters = make_sharded_tensors_for_checkpoint(
            {LORA_A: self.lora_a.weight, LORA_B: self.lora_b.weight}, prefix, axis,
            sharded_offsets, tp_group=_tp_group(self), dp_cp_group=metadata["dp_cp_group"])
        if self.lora_state.swiglu:  # [gate; up] per rank -> Megatron's TP-independent layout
            key = f"{prefix}{LORA_B}"
            adapters[key] = apply_swiglu_sharded_factory(
                adapters[key], sharded_offsets, metadata.get("singleton_local_shards", False))
        state.update(adapters)
        return state


@cache
def _adapted_class(base: type) -> type:
    """`Lora<Base>`: LoraLinear's forward and sharded_state_dict over `base`."""
    return type(f"Lora{base.__name__}", (LoraLinear, base), {"lora_base_class": base})


def linear_kind(module: torch.nn.Module) -> str | None:
    """'column' / 'row' for Megatron's parallel linears (local or TE), None otherwise."""
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return te.te_linear_kind(module)


def _check_supported(module: torch.nn.Module, kind: str, name: str) -> None:
    """Refuse base configurations the branch does not implement (none occur in our models)."""
    if getattr(module, "sequence_parallel", False):
        raise NotImplementedError(f"LoRA on {name}: sequence parallelism is not supported")
    if kind == "column" and getattr(module, "gather_output", False):
        raise NotImplementedError(f"LoRA on {name}: gather_output=True is not supported")
    if kind == "row" and not getattr(module, "input_is_parallel", True):
        raise NotImplementedError(f"LoRA on {name}: input_is_parallel=False is not supported")


def _initial_a(module: LoraLinear, seed: int, step: int) -> torch.Tensor:
    """This rank's A for (seed, step): the full TP-independent init, sliced like W's input."""
    state = module.lora_state
    group = _tp_group(module)
    in_local = module.weight.shape[1]
    tp = dist.get_world_size(group)
    full = init_lora_a(state.rank, in_local * tp if state.kind == "row" else in_local,
                       derive_seed(seed, state.layer, state.target, step))
    if state.kind == "row":
        full = full.chunk(tp, dim=1)[dist.get_rank(group)]
    return full


@torch.no_grad()
def _reset_adapter(module: LoraLinear, seed: int, step: int) -> None:
    """A <- init(seed, step), B <- 0: the branch contributes exactly zero."""
    module.lora_a.weight.copy_(_initial_a(module, seed, step))
    module.lora_b.weight.zero_()


def _attach(module: torch.nn.Module, kind: str, state: LoraState, seed: int) -> None:
    _check_supported(module, kind, state.name)
    out_local, in_local = module.weight.shape
    dtype = module.config.params_dtype  # the nominal dtype, also for FP8-stored weights
    module.__class__ = _adapted_class(type(module))
    module.lora_state = state
    module.lora_a = LoraWeight(torch.empty(state.rank, in_local, dtype=dtype,
                                           device=module.weight.device))
    module.lora_b = LoraWeight(torch.zeros(out_local, state.rank, dtype=dtype,
                                           device=module.weight.device))
    sharded = module.lora_b.weight if kind == "column" else module.lora_a.weight
    set_tensor_model_parallel_attributes(sharded, True, 0 if kind == "column" else 1, 1)
    _reset_adapter(module, seed, step=0)


def _detach(module: LoraLinear) -> None:
    """Back to the plain base class: adapter parameters and state removed."""
    base = module.lora_base_class
    del module.lora_a, module.lora_b, module.lora_state
    module.__class__ = base


def adapted_modules(chunks: Iterable[torch.nn.Module]) -> list[LoraLinear]:
    """Every adapted linear in the chunks (unwrapped or DDP-wrapped), in module order."""
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoraLinear)]


def has_adapters(chunks: Iterable[torch.nn.Module]) -> bool:
    """Whether any module of this rank's chunks carries an adapter (merged or not)."""
    return bool(adapted_modules(chunks))


# ---------------------------------------------------------------------------------------------
# Freezing and adapting a model


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Parameter counts; `trainable` includes the adapters, `adapter` is that subset."""

    trainable: int
    frozen: int
    adapter: int


@dataclass(frozen=True, slots=True)
class AdapterReport:
    """What freeze_and_adapt did, for the trainer's summary."""

    local: ParamCounts
    """Parameters held by this rank (TP replicas included)."""
    model: ParamCounts
    """The whole model, each parameter once (TP replicas and DP copies counted once)."""
    adapted_modules: int
    """Adapted linears on this rank."""


def _counts(chunks: Sequence[torch.nn.Module], unique: bool) -> ParamCounts:
    trainable = frozen = adapter = 0
    adapter_ids = {id(p) for m in adapted_modules(chunks)
                   for p in (m.lora_a.weight, m.lora_b.weight)}
    for chunk in chunks:
        for param in chunk.parameters():
            if unique and (not param_is_not_tensor_parallel_duplicate(param)
                           or getattr(param, "shared", False)):  # tied output-layer copy
                continue
            if param.requires_grad:
                trainable += param.numel()
                adapter += param.numel() if id(param) in adapter_ids else 0
            else:
                frozen += param.numel()
    return ParamCounts(trainable=trainable, frozen=frozen, adapter=adapter)


def _model_counts(chunks: Sequence[torch.nn.Module]) -> ParamCounts:
    """Unique counts summed over the model-parallel (TP x PP) group."""
    unique = _counts(chunks, unique=True)
    values = [unique.trainable, unique.frozen, unique.adapter]
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        values = collectives.all_reduce_values(
            values, group=parallel_state.get_model_parallel_group(), dtype=torch.int64)
    return ParamCounts(*(int(v) for v in values))


def _input_requires_grad(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the decoder: make frozen embeddings' output require grad.

    Megatron's full recompute uses reentrant checkpointing, whose backward only runs when an
    *input* requires grad; parameters are not inputs. With frozen embeddings the decoder input
    does not, so the recomputed layers' adapters would silently get no gradient
    (Megatron-Bridge's fix).
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if torch.is_grad_enabled() and hidden is not None and not hidden.requires_grad:
        hidden.requires_grad_(True)


def freeze_and_adapt(chunks: Sequence[torch.nn.Module], frozen_layers: Iterable[int],
                     lora: LoraConfig, *, seed: int, freeze_embeddings: bool = False,
                     fp8_block_size: int | None = None) -> AdapterReport:
    """Freeze the given layers, put LoRA adapters on their target linears, train the rest.

    Call it before `optim.wrap_and_optimize`: Megatron's DDP and optimizer only leave out
    parameters that are already frozen when they are built.

    Args:
        chunks: this rank's unwrapped GPTModel chunks.
        frozen_layers: GLOBAL indices of the layers to freeze (from growth provenance).
        lora: rank, alpha, dropout and target linears.
        seed: adapter init seed; A depends on (seed, layer, target) only.
        freeze_embeddings: also freeze the embedding, final norm and output layer.
        fp8_block_size: store the frozen layers' linear weights in FP8 with this scale block
            (0: per output channel; fp8_storage); None keeps them in the params dtype.

    Returns:
        Local and whole-model parameter counts. Collective over the model-parallel group.

    Raises:
        ValueError: a frozen index outside the model, a target absent from a frozen layer, or
            a chunk that still holds adapters (merge them first).
    """
    frozen = set(frozen_layers)
    depth = chunks[0].config.num_layers
    outside = sorted(i for i in frozen if not 0 <= i < depth)
    if outside:
        raise ValueError(f"frozen_layers: {outside} outside the model's {depth} layers")
    if has_adapters(chunks):
        raise ValueError("freeze_and_adapt: the model already holds adapters; call "
                         "merge_adapters(chunks) before adapting it again")
    for chunk in chunks:
        chunk.requires_grad_(not freeze_embeddings)  # layers are set below
        for layer in chunk.decoder.layers:
            index = layer.layer_number - 1
            layer.requires_grad_(index not in frozen)
            if index in frozen:
                if fp8_block_size is not None:  # before the adapters: Lora<Fp8<Linear>>
                    for module in layer.modules():
                        if linear_kind(module) is not None:
                            fp8_storage.store(module, fp8_block_size)
                _adapt_layer(layer, index, lora, seed)
        recompute = chunk.config.recompute_granularity == "full"
        if (freeze_embeddings and recompute and chunk.pre_process
                and not hasattr(chunk.decoder, "lora_input_grad_hook")):
            chunk.decoder.lora_input_grad_hook = chunk.decoder.register_forward_pre_hook(
                _input_requires_grad, with_kwargs=True)
    return AdapterReport(local=_counts(chunks, unique=False), model=_model_counts(chunks),
                         adapted_modules=len(adapted_modules(chunks)))


def _adapt_layer(layer: torch.nn.Module, index: int, lora: LoraConfig, seed: int) -> None:
    found = {name.rpartition(".")[2]: (name, module) for name, module in layer.named_modules()}
    for target in lora.targets:
        if target not in found:
            raise ValueError(f"lora.targets: {target!r} matches no module in layer {index}")
        name, module = found[target]
        kind = linear_kind(module)
        if kind is None:
            raise ValueError(f"lora.targets: {target!r} in layer {index} is a "
                             f"{type(module).__name__}, not a Megatron parallel linear")
        gated = getattr(layer.config, "gated_linear_unit", False)
        state = LoraState(kind=kind, layer=index, target=target, rank=lora.rank,
                          scale=lora.scale, dropout=lora.dropout,
                          swiglu=gated and name.endswith("mlp.linear_fc1"))
        _attach(module, kind, state, seed)
        module.lora_a.weight.requires_grad_(True)
        module.lora_b.weight.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# Merging


@torch.no_grad()
def lora_delta(module: LoraLinear) -> torch.Tensor:
    """scale * B @ A for this rank's shard of W, in fp32 (shapes match W_local, no comms)."""
    return module.lora_state.scale * (module.lora_b.weight.float() @ module.lora_a.weight.float())


@torch.no_grad()
def _add_to_base(module: LoraLinear, delta: torch.Tensor) -> None:
    """W <- W + delta, accumulated in fp32 and cast back to W's dtype.

    An FP8-stored base takes the delta into its full-precision host master, which is then
    quantized again (fp8_storage.add_to_master): the delta is never rounded to FP8 and lost.
    """
    name = module.lora_state.name
    if fp8_storage.is_stored(module):
        fp8_storage.add_to_master(module, delta)
        return
    te.check_mergeable(module.weight, name)
    merged = module.weight.float() + delta
    if not torch.isfinite(merged).all():
        raise ValueError(f"merging the LoRA adapter of {name} gives non-finite weights")
    module.weight.copy_(merged.to(module.weight.dtype))


def merge_adapters(chunks: Iterable[torch.nn.Module], *, remove: bool = True) -> None:
    """Fold every adapter into its base weight (W += scale * B @ A, fp32 accumulate).

    Args:
        chunks: this rank's model chunks; purely local, works at any TP/PP.
        remove: detach the adapters afterwards (plain Megatron linears and checkpoint keys
            again; rebuild DDP and the optimizer before training on). False keeps them
            attached but inactive, for `unmerge_adapters`.

    Raises:
        ValueError: a base weight is stored in FP8 (the delta would round away), or a merge
            would produce non-finite weights (that base is left unchanged).
    """
    for module in adapted_modules(chunks):
        if not module.lora_state.merged:
            _add_to_base(module, lora_delta(module))
        if remove:
            _detach(module)
        else:
            module.lora_state.merged = True


def unmerge_adapters(chunks: Iterable[torch.nn.Module]) -> None:
    """Undo `merge_adapters(remove=False)`: W -= scale * B @ A, branch active again.

    Restores W up to rounding in W's dtype (one rounding at the merge, one at the unmerge; an
    fp32 weight comes back within a few ulp, bf16 can be off by one bf16 ulp).
    """
    for module in adapted_modules(chunks):
        if module.lora_state.merged:
            _add_to_base(module, -lora_delta(module))
            module.lora_state.merged = False


def fold_and_reset_adapters(chunks: Iterable[torch.nn.Module], *, seed: int, step: int
                            ) -> list[LoraLinear]:
    """ReLoRA restart: merge each adapter into its base, then A <- init(seed, step), B <- 0.

    The model function is unchanged (B = 0). Returns the adapted modules.

    Raises:
        ValueError: no adapters, or adapters merged with remove=False (unmerge them first).
    """
    modules = adapted_modules(chunks)
    if not modules:
        raise ValueError("the model holds no adapters to restart (call freeze_and_adapt first)")
    for module in modules:
        if module.lora_state.merged:
            raise ValueError(f"{module.lora_state.name}: adapter is merged; unmerge it first")
        _add_to_base(module, lora_delta(module))
        _reset_adapter(module, seed, step)
    return modules


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata and offline (full-tensor) merge


def adapter_meta(lora: LoraConfig, layers: Iterable[int]) -> dict[str, Any] | None:
    """The checkpoint metadata entry `adapters` for adapters on `layers` (None when empty)."""
    layers = sorted(set(layers))
    if not layers:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
            "layers": layers}


def merge_full_state_dict(tensors: dict[str, torch.Tensor], adapters_meta: dict[str, Any]
                          ) -> dict[str, torch.Tensor]:
    """Fold full (TP=1 layout) adapter tensors into their base weights; drop the lora keys.

    W += (alpha / rank) * B @ A in fp32, cast back to W's dtype. Works on per-layer keys and on
    layer-stacked tensors (leading layer axis). Pure: the input dict is not modified.

    Args:
        tensors: checkpoint key -> full tensor (checkpoint.load_full_tensors).
        adapters_meta: the checkpoint's `adapters` metadata ({rank, alpha, targets, layers}).

    Raises:
        ValueError: an A without its B or base weight (or the reverse), adapters on other
            layers than the metadata lists, or non-finite merged weights.
    """
    scale = adapters_meta["alpha"] / adapters_meta["rank"]
    merged = dict(tensors)
    stems = {k[: -len(LORA_A)] for k in tensors if k.endswith("." + LORA_A)}
    stems_b = {k[: -len(LORA_B)] for k in tensors if k.endswith("." + LORA_B)}
    if stems != stems_b:
        raise ValueError(f"adapter tensors without a partner: {sorted(stems ^ stems_b)}")
    for stem in sorted(stems):
        if stem + "weight" not in tensors:
            raise ValueError(f"{stem}{LORA_A}: the checkpoint has no base weight {stem}weight")
        base = tensors[stem + "weight"]
        delta = tensors[stem + LORA_B].float() @ tensors[stem + LORA_A].float()
        new = base.float() + scale * delta
        if not torch.isfinite(new).all():
            raise ValueError(f"{stem}weight: merging its adapter gives non-finite weights")
        merged[stem + "weight"] = new.to(base.dtype)
        del merged[stem + LORA_A], merged[stem + LORA_B]
    per_layer = {int(m.group(1)) for s in stems if (m := _PER_LAYER_KEY.match(s))}
    if per_layer and per_layer != set(adapters_meta["layers"]):
        raise ValueError(f"adapters metadata lists layers {sorted(adapters_meta['layers'])}, "
                         f"the tensors hold adapters on {sorted(per_layer)}")
    return merged
