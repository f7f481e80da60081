"""Megatron DDP + optimizer over trainable parameters only, and the per-stage LR schedule.

STEP saves memory only if frozen weights get no gradient buffer, no fp32 master copy and no Adam
state. Megatron's DDP and optimizer skip parameters with `requires_grad=False`, but only if they
are frozen *before* wrapping (megatron_notes.md 3.1), so every stage builds a fresh DDP wrapper and
optimizer after freezing: `wrap_and_optimize`.

Learning rate, per stage (pure `learning_rate`): linear warmup to `stage.lr` over
`warmup_steps`, then cosine (or linear/constant) decay to `min_lr` at the stage's *planned*
length `train_steps`; the stage itself stops at `grow_at_fraction` of it. With ReLoRA, each reset
multiplies the schedule by a linear re-warmup ramp (the "jagged" schedule of Lialin et al. 2023).

`DistributedOptimizer` checkpointing with torch's Adam (no TE/apex FusedAdam: CPU machines, or a
GPU site without them) has three bugs in megatron-core 0.16.1; `prepare_for_load` and the
instance-level fixes applied by `build_optimizer` work around them (megatron_notes.md 1.3).
"""

from __future__ import annotations

import gc
import math
import types
from collections.abc import Sequence

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.module import MegatronModule

from megatron_step.config import OptimizerConfig, ParallelConfig, PrecisionConfig, StageConfig
from megatron_step.model import DTYPES


def learning_rate(stage: StageConfig, step: int, last_reset: int | None = None) -> float:
    """Learning rate at `step` (0-based, within the stage) of a stage's schedule.

    Args:
        stage: the stage's schedule settings.
        step: optimizer steps already taken in this stage.
        last_reset: step of the most recent ReLoRA reset (jagged re-warmup), if any.
    """
    if step < stage.warmup_steps:
        lr = stage.lr * (step + 1) / stage.warmup_steps
    else:
        span = max(1, stage.train_steps - stage.warmup_steps)
        progress = min(1.0, (step - stage.warmup_steps) / span)
        if stage.lr_decay_style == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif stage.lr_decay_style == "linear":
            factor = 1.0 - progress
        else:
            factor = 1.0
        lr = stage.min_lr + (stage.lr - stage.min_lr) * factor
    if stage.relora is not None and last_reset is not None and stage.relora.rewarmup_steps:
        ramp = (step - last_reset + 1) / stage.relora.rewarmup_steps
        lr *= min(1.0, max(ramp, 0.0))
    return lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the LR of every parameter group (Megatron optimizers expose `param_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def ddp_config(parallel: ParallelConfig, precision: PrecisionConfig
               ) -> DistributedDataParallelConfig:
    """Megatron DDP settings: fp32 gradient accumulation for bf16, as Megatron-LM does."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.params_dtype == "bf16" and precision.grad_reduce_in_fp32,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )


def wrap_and_optimize(chunks: Sequence[MegatronModule], parallel: ParallelConfig,
                      precision: PrecisionConfig, optimizer: OptimizerConfig, lr: float
                      ) -> tuple[list[DistributedDataParallel], torch.optim.Optimizer]:
    """Wrap already-frozen model chunks in Megatron DDP and build the optimizer over them.

    Frozen parameters (`requires_grad=False`) get no grad buffer, no main_grad, no fp32 master
    copy and no Adam state. Freezing after this call would have no effect on memory.
    """
    config = ddp_config(parallel, precision)
    wrapped = []
    for index, chunk in enumerate(chunks):
        chunk.config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=config,
                                               module=chunk,
                                               disable_bucketing=index > 0))
    return wrapped, build_optimizer(wrapped, parallel, precision, optimizer, lr)


# Attributes Megatron's DDP and optimizers put on model parameters; each one keeps a grad buffer
# view or an fp32 master copy alive for as long as the parameter lives.
_TRAINING_ATTRIBUTES = ("main_grad", "main_param", "main_param_sharded", "grad_added_to_main_grad")


def release(wrapped: Sequence[DistributedDataParallel], optimizer: torch.optim.Optimizer) -> None:
    """Free a finished stage's gradient buffers, hooks, fp32 master weights and Adam states now.

    At a stage boundary the old model lives on (it is the source of the grown one), and through
    it everything its training attached: `param.main_grad` views keep DDP's grad buffers alive,
    `param.main_param` the fp32 masters, and DDP's backward hooks and our optimizer patches form
    reference cycles that only a full garbage collection breaks. Left alone, all of that is still
    allocated while the grown model and its optimizer are built, and the boundary peak exceeds the
    planned peak. Afterwards `wrapped` and `optimizer` are unusable; the chunks they wrapped keep
    only their weights and can be wrapped again (a stage at the same depth) without stale hooks.
    """
    for ddp in wrapped:
        for param in ddp.module.parameters():
            param.grad = None
            for name in _TRAINING_ATTRIBUTES:
                if hasattr(param, name):
                    delattr(param, name)
        ddp.grad_accs.clear()  # the AccumulateGrad nodes that carry DDP's backward hooks
        for handle in ddp.remove_forward_pre_hook_handles.values():
            handle.remove()
        ddp.remove_forward_pre_hook_handles.clear()
        ddp.buffers, ddp.bucket_groups = [], []
        ddp.expert_parallel_buffers, ddp.expert_parallel_bucket_groups = [], []
        ddp.param_to_bucket_group = {}
    for inner in leaf_optimizers(optimizer):
        inner.optimizer.state.clear()  # Adam moments
        for group in inner.optimizer.param_groups:
            group["params"] = []
        for name, value in vars(inner).items():  # Megatron's fp32 master lists (`*_groups`)
            if name.endswith("_groups") and isinstance(value, list | dict):
                value.clear()
    gc.collect()  # DDP hooks and our optimizer patches are reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_optimizer(chunks: Sequence[DistributedDataParallel], parallel: ParallelConfig,
                    precision: PrecisionConfig, optimizer: OptimizerConfig, lr: float
                    ) -> torch.optim.Optimizer:
    """Megatron's Adam (AdamW: decoupled weight decay) over the DDP chunks' trainable params."""
    dtype = DTYPES[precision.params_dtype]
    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=0.0,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.adam_beta1,
        adam_beta2=optimizer.adam_beta2,
        adam_eps=optimizer.adam_eps,
        clip_grad=optimizer.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    megatron_optimizer = get_megatron_optimizer(megatron_config, list(chunks))
    for inner in leaf_optimizers(megatron_optimizer):
        if isinstance(inner, DistributedOptimizer) and _uses_torch_adam(inner):
            _fix_torch_adam_distopt(inner)
    return megatron_optimizer


def leaf_optimizers(optimizer: torch.optim.Optimizer) -> list:
    """The Megatron optimizers inside a (possibly chained) Megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _uses_torch_adam(optimizer: DistributedOptimizer) -> bool:
    return type(optimizer.optimizer).__module__.startswith("torch.optim")


def _fix_torch_adam_distopt(optimizer: DistributedOptimizer) -> None:
    """Instance-level fixes for DistributedOptimizer + torch Adam checkpoint loading (0.16.1).

    - Loading `fully_reshardable` state copies into every state key, `step` included, but the
      source has no `step` (KeyError): copy only the keys present, keep `step`.
    - `load_state_dict` gives every parameter the *same* `step` tensor, which torch Adam then
      increments once per parameter: clone it per parameter.
    """
    original_set = optimizer._set_main_param_and_optimizer_states
    original_load = optimizer.load_state_dict

    def set_states(self: DistributedOptimizer, model_param: torch.nn.Parameter,
                   tensors: dict[str, torch.Tensor]) -> None:
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            original_set(model_param, tensors)
            return
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        for key, destination in {"param": main_param, **self.optimizer.state[main_param]}.items():
            if key in tensors:
                destination.copy_(tensors[key])

    def load_state_dict(self: DistributedOptimizer, state_dict: dict) -> None:
        original_load(state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    optimizer._set_main_param_and_optimizer_states = types.MethodType(set_states, optimizer)
    optimizer.load_state_dict = types.MethodType(load_state_dict, optimizer)


def prepare_for_load(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh torch-Adam DistributedOptimizer the state tensors a load writes into.

    torch Adam creates state lazily, and `DistributedOptimizer.state_dict()` (needed to build the
    loading sharded state dict) asserts a single `step` across parameters. Zero state of the
    right shape is exactly what a never-stepped Adam would hold.
    """
    for inner in leaf_optimizers(optimizer):
        if not (isinstance(inner, DistributedOptimizer) and _uses_torch_adam(inner)):
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                state = inner.optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
