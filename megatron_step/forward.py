"""Forward and backward passes through Megatron's schedules: train step, evaluation, logits.

All pipeline scheduling comes from `get_forward_backward_func()` (no pipeline: plain loop;
PP > 1: 1F1B); this module only supplies the per-micro-batch forward step and the loss, and
reduces the results so every rank ends with the same numbers (the loss lives on the last pipeline
stage; data-parallel ranks see different batches).

A micro-batch is a dict of `tokens`, `labels`, `loss_mask` ([b, s]) and `position_ids` ([b, s]).
Loss = mean over unmasked tokens of the micro-batch, averaged over micro-batches and DP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_step import collectives

Batch = dict[str, torch.Tensor]


def _masked_mean_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    losses = output_tensor.float()
    mask = loss_mask.float()
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales loss in place


def _forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module
                  ) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # pinned: async
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_masked_mean_loss, batch["loss_mask"])


def _reduce_to_all(value: float | None) -> float:
    """Take the last pipeline stage's value to every rank, averaged over data parallelism."""
    tensor = torch.tensor([value if value is not None else 0.0], dtype=torch.float64)
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    tensor = collectives.broadcast(tensor, src=last,
                                   group=parallel_state.get_pipeline_model_parallel_group())
    tensor = collectives.all_reduce(tensor, "mean", group=parallel_state.get_data_parallel_group())
    return float(tensor.item())


def _run_schedule(chunks: Sequence[torch.nn.Module], microbatches: Sequence[Batch],
                  forward_only: bool) -> float:
    tokens = microbatches[0]["tokens"]
    results = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )
    local = None
    if parallel_state.is_pipeline_last_stage():
        local = sum(float(r["loss"]) for r in results) / len(results)
    return _reduce_to_all(local)


def train_step(chunks: Sequence[torch.nn.Module], optimizer: Any,
               microbatches: Sequence[Batch]) -> dict[str, float]:
    """One optimizer step over `microbatches` (gradient accumulation + DP all-reduce).

    Args:
        chunks: this rank's DDP-wrapped model chunks.
        optimizer: the Megatron optimizer over their trainable parameters.
        microbatches: this DP rank's micro-batches of the global batch.

    Returns:
        `loss` (mean over micro-batches and DP ranks), `grad_norm`, and `skipped` (1.0 when
        the step was not applied: a non-finite loss, or the optimizer rejected the gradients).
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _run_schedule(chunks, microbatches, forward_only=False)
    if not math.isfinite(loss):  # every rank holds the same loss: all skip the step together
        return {"loss": loss, "grad_norm": float("nan"), "skipped": 1.0}
    ok, grad_norm, _ = optimizer.step()
    return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "skipped": 0.0 if ok else 1.0}


@torch.no_grad()
def evaluate(chunks: Sequence[torch.nn.Module], microbatches: Sequence[Batch]) -> float:
    """Mean loss over `microbatches` (and DP ranks), without gradients."""
    for chunk in chunks:
        chunk.eval()
    try:
        return _run_schedule(chunks, microbatches, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()


@torch.no_grad()
def compute_logits(chunks: Sequence[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab] of one batch, on every rank (for tests and tools)."""
    captured: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module) -> tuple:
        batch = next(data_iterator)
        device = next(model.parameters()).device
        output = model(batch["tokens"].to(device), batch["position_ids"].to(device), None)

        def keep(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            captured.append(gather_from_tensor_model_parallel_region(output_tensor).float())
            return captured[-1]

        return output, keep

    for chunk in chunks:
        chunk.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([{"tokens": tokens, "position_ids": positions}]),
        model=list(chunks),
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    for chunk in chunks:
        chunk.train()
    shape = (tokens.shape[0], tokens.shape[1], -1)
    logits = captured[0].reshape(shape).cpu() if captured else None
    return collectives.broadcast_object(
        logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group())
