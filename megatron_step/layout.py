"""Parallel layout arithmetic: which splits are possible and how layers go to pipeline ranks.

Pure functions (no process groups), shared by the distributed init, the model builder, the stage
planner and the offline growth tool, so that all of them agree on where a layer lives.

Megatron needs `num_layers % pipeline_model_parallel_size == 0` unless told otherwise, but STEP
stages have arbitrary depths (13 layers at PP=2, say). `pipeline_split` therefore splits as evenly
as possible, the first `num_layers % pp` ranks taking one extra layer, and `model.py` passes the
split to Megatron as an explicit `pipeline_model_parallel_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py validates layouts through this module
    from megatron_step.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ParallelSizes:
    """World decomposition: world = TP * PP * DP."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size
                                   * self.pipeline_model_parallel_size)


def pipeline_split(num_layers: int, pipeline_model_parallel_size: int) -> list[int]:
    """Transformer layers held by each pipeline rank (earlier ranks take the remainder)."""
    base, extra = divmod(num_layers, pipeline_model_parallel_size)
    return [base + (1 if rank < extra else 0) for rank in range(pipeline_model_parallel_size)]


def pipeline_offsets(num_layers: int, pipeline_model_parallel_size: int) -> list[int]:
    """Global index of the first layer on each pipeline rank."""
    split = pipeline_split(num_layers, pipeline_model_parallel_size)
    return [sum(split[:rank]) for rank in range(len(split))]


def check_layout(model: ModelConfig, num_layers: int, sizes: ParallelSizes) -> None:
    """Raise ValueError naming the setting when the layout cannot hold the model.

    Args:
        model: the model dimensions (heads, query groups, FFN, vocab).
        num_layers: the depth being built (a stage's depth may be below model.num_layers).
        sizes: world size with the requested TP and PP.
    """
    tp = sizes.tensor_model_parallel_size
    pp = sizes.pipeline_model_parallel_size
    world = sizes.world_size
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel: tensor_model_parallel_size ({tp}) and "
                         f"pipeline_model_parallel_size ({pp}) must be >= 1")
    if world % (tp * pp):
        raise ValueError(f"parallel: world size {world} is not divisible by "
                         f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size "
                         f"({pp}) = {tp * pp}")
    checks = (("model.num_attention_heads", model.num_attention_heads),
              ("model.num_query_groups", model.query_groups),
              ("model.ffn_hidden_size", model.ffn_hidden_size),
              ("model.vocab_size", model.vocab_size))
    for name, value in checks:
        if value % tp:
            raise ValueError(f"parallel.tensor_model_parallel_size: {tp} does not divide "
                             f"{name} ({value})")
    if pp > num_layers:
        raise ValueError(f"parallel.pipeline_model_parallel_size: {pp} pipeline stages > "
                         f"{num_layers} layers; every pipeline stage needs at least one layer")
