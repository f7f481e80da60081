"""ReLoRA inside a STEP stage: periodic merge and restart of the adapters (Lialin et al. 2023).

Every `relora.reset_interval` optimizer steps of a stage (steps T, 2T, ...; never step 0), before
that step's update, `relora_reset`:
1. folds every adapter into its frozen base (W += scale * B @ A, fp32 accumulate) and restarts it:
   A <- Kaiming init from a seed derived from (seed, layer, target, step), B <- 0. The model
   function is unchanged (B = 0), and A is the same at every TP/PP layout;
2. resets or prunes the adapters' Adam moments (exp_avg, exp_avg_sq) and nothing else:
   `reset` zeroes them, `magnitude_prune` zeroes the `prune_ratio` fraction of entries with the
   smallest |exp_avg|, `random_prune` a random `prune_ratio` fraction; both moments lose the
   same entries (see `prune_`). Per-parameter `step` counters stay (the distributed optimizer
   requires one shared step). Statistics are per state tensor held by the rank: a DP shard
   under the distributed optimizer, a TP shard for split adapters;
3. reloads the fp32 master copies of the adapters (Float16Optimizer: per parameter,
   DistributedOptimizer: this rank's shard) from their new values. Only the adapters: a blanket
   `reload_model_params()` would round every other trainable master weight to bf16. The merged
   base weights are frozen and have no master copy.
The learning rate then re-warms linearly over `rewarmup_steps` from the reset step ("jagged"
schedule): the trainer passes `last_reset_step(relora, step)` to `optim.learning_rate`, so the
first update with fresh moments uses lr / rewarmup_steps. Random masks come from seeded
generators, identical on TP ranks that hold replicas of the same adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

from megatron_step.config import ReloraConfig
from megatron_step.lora import fold_and_reset_adapters
from megatron_step.optim import leaf_optimizers
from megatron_step.seeds import derive_seed

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_reset_step(relora: ReloraConfig | None, step: int) -> bool:
    """Whether the trainer calls relora_reset before the update of `step` (0-based)."""
    return relora is not None and step > 0 and step % relora.reset_interval == 0


def last_reset_step(relora: ReloraConfig | None, step: int) -> int | None:
    """The most recent reset step <= `step` (None before the first): `last_reset` for
    optim.learning_rate, recomputable from the step alone (resume-safe)."""
    if relora is None or step < relora.reset_interval:
        return None
    return step - step % relora.reset_interval


def prune_(moments: Sequence[torch.Tensor], mode: str, ratio: float,
           generator: torch.Generator) -> None:
    """Zero the same entries of a parameter's Adam moments in place (ReLoRA optimizer reset).

    One mask serves both moments. ReLoRA prunes exp_avg and exp_avg_sq independently, which
    leaves entries with exp_avg != 0 but exp_avg_sq = 0; their next update is exp_avg / eps,
    about 1e8 times too large (measured: a restarted A jumped by 8e3).

    Args:
        moments: (exp_avg, exp_avg_sq) of one parameter (or of this rank's shard of it).
        mode: 'reset' (zero all), 'magnitude_prune' (zero where |exp_avg| is among the
            round(ratio * n) smallest, ties at the threshold included), 'random_prune' (zero
            each entry with probability ratio).
        ratio: fraction to prune; ignored by 'reset'.
        generator: CPU generator for 'random_prune'.
    """
    first = moments[0]
    if mode == "reset" or ratio >= 1.0:
        drop = torch.ones_like(first, dtype=torch.bool)
    elif mode == "magnitude_prune":
        count = round(ratio * first.numel())
        if count == 0:
            return
        magnitude = first.abs()
        drop = magnitude <= magnitude.flatten().float().kthvalue(count).values
    elif mode == "random_prune":
        drop = (torch.rand(first.shape, generator=generator) < ratio).to(first.device)
    else:
        raise ValueError(f"relora.optimizer_reset: unknown mode {mode!r}")
    for tensor in moments:
        tensor.masked_fill_(drop, 0)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where a Megatron optimizer keeps (this rank's shard of) one model parameter."""

    main: torch.Tensor
    """The tensor the inner torch optimizer updates: fp32 master (shard) or the param itself."""
    source: torch.Tensor
    """The matching values of the model parameter (flattened slice for a shard)."""
    state: dict
    offset: int
    """Start of the shard within the flattened parameter (0 when not sharded)."""


def _slots(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]
           ) -> dict[torch.nn.Parameter, _Slot]:
    """Optimizer slots of `params` that live on this rank (DistributedOptimizer: owned shards)."""
    wanted = {id(p): p for p in params}
    slots: dict[torch.nn.Parameter, _Slot] = {}
    for inner in leaf_optimizers(optimizer):
        states = inner.optimizer.state
        if isinstance(inner, DistributedOptimizer):
            for param in params:
                if param not in inner.model_param_group_index_map:
                    continue  # no shard of it on this data-parallel rank
                group, order = inner.model_param_group_index_map[param]
                main = inner.optimizer.param_groups[group]["params"][order]
                shard = inner._get_model_param_range_map(param)["param"]
                source = param.detach().view(-1)[shard.start:shard.end]
                slots[param] = _Slot(main, source, states.get(main, {}), shard.start)
            continue
        if isinstance(inner, Float16OptimizerWithFloat16Params):
            pairs = chain(zip(chain.from_iterable(inner.float16_groups),
                              chain.from_iterable(inner.fp32_from_float16_groups), strict=True),
                          ((p, p) for p in chain.from_iterable(inner.fp32_from_fp32_groups)))
        else:  # FP32Optimizer: the torch optimizer updates the model parameters themselves
            pairs = ((p, p) for group in inner.optimizer.param_groups for p in group["params"])
        for model_param, main in pairs:
            if id(model_param) in wanted:
                slots[model_param] = _Slot(main, model_param.detach(), states.get(main, {}), 0)
    return slots


@torch.no_grad()
def relora_reset(chunks: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer,
                 relora: ReloraConfig, *, seed: int, step: int) -> None:
    """Merge and restart every adapter, prune their Adam moments, refresh their master copies.

    Call it on every rank before the optimizer update of a reset step (`is_reset_step`).

    Args:
        chunks: this rank's model chunks (DDP-wrapped or not) holding the adapters.
        optimizer: the Megatron optimizer built over them (plain, Float16 or distributed).
        relora: optimizer_reset mode and prune_ratio.
        seed: the run's adapter seed; the new A depends on (seed, layer, target, step).
        step: the reset step (within the stage).

    Raises:
        ValueError: the model holds no (unmerged) adapters.
    """
    modules = fold_and_reset_adapters(chunks, seed=seed, step=step)
    adapters = [(module, which, getattr(module, f"lora_{which}").weight)
                for module in modules for which in ("a", "b")]
    slots = _slots(optimizer, [param for _, _, param in adapters])
    for module, which, param in adapters:
        slot = slots.get(param)
        if slot is None:
            continue
        if all(key in slot.state for key in MOMENTS):  # empty before the first step
            generator = torch.Generator().manual_seed(derive_seed(
                seed, step, module.lora_state.layer, module.lora_state.target, which,
                slot.offset))
            prune_([slot.state[key] for key in MOMENTS], relora.optimizer_reset,
                   relora.prune_ratio, generator)
        if slot.main.data_ptr() != slot.source.data_ptr():
            slot.main.copy_(slot.source)
