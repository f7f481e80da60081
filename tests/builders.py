"""Helpers that build real tiny models inside a test world (in-process or in `run_world` ranks).

Module-level functions only: `run_world` pickles them by reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_step.checkpoint import load_checkpoint, save_checkpoint
from megatron_step.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_step.model import build_model
from megatron_step.parallel import Layout, init_distributed

FP32 = PrecisionConfig(params_dtype="fp32")


def build_world_model(model: ModelConfig, num_layers: int, parallel: ParallelConfig,
                      seed: int = 1234) -> tuple[Layout, torch.nn.Module]:
    """Initialise Megatron's groups for `parallel` and build this rank's fp32 GPTModel."""
    layout = init_distributed(model, num_layers, parallel, seed=seed)
    gpt = build_model(model, num_layers, parallel, FP32, pre_process=layout.is_first_stage,
                      post_process=layout.is_last_stage, seed=seed)
    return layout, gpt


def random_tokens(model: ModelConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids [b, s], identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, model.seq_length), generator=generator)


def microbatches(tokens: torch.Tensor, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """`count` copies of a next-token-prediction micro-batch built from `tokens`."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1),
             "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
             "position_ids": positions}
    return [batch] * count


def save_reference(model: ModelConfig, num_layers: int, path: Path, seed: int = 1234) -> None:
    """Build a model at this world's layout (TP=PP=1 unless the caller set one) and save it."""
    _, gpt = build_world_model(model, num_layers, ParallelConfig(), seed=seed)
    save_checkpoint(path, [gpt], {"global_step": 0, "num_layers": num_layers})


def load_at_layout(model: ModelConfig, num_layers: int, parallel: ParallelConfig,
                   path: Path) -> tuple[Layout, torch.nn.Module]:
    """Build the model at `parallel` and load the checkpoint at `path` into it."""
    layout, gpt = build_world_model(model, num_layers, parallel)
    load_checkpoint(path, [gpt])
    return layout, gpt
