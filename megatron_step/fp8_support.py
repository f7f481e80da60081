"""What FP8 compute needs from the model's shapes and from the GPU, checked before a job starts.

Transformer Engine (TE) enforces these rules only at the first FP8 forward, minutes into a job and
with an assertion that names no config field. The rules, read from TE 2.1-2.11 (see te_facts in
the closing notes of issue 13):

- Every FP8 GEMM input and weight, flattened to 2-D, must have a leading dimension divisible by 8
  and a last dimension divisible by 16 (`transformer_engine/pytorch/utils.py`
  `assert_dim_for_fp8_exec`, applied to the input and the weight of Linear and LayerNormLinear for
  every recipe). For our linears the weight is [out / TP, in] (column-parallel: qkv, fc1) or
  [out, in / TP] (row-parallel: proj, fc2), and the input has micro_batch * seq_length tokens
  (divided by TP under sequence parallelism).
- MXFP8 quantises blocks of 32 along both dimensions: both flattened dimensions must be
  multiples of 32 (`tensor/mxfp8_tensor.py` `is_quantizable`, `csrc/quantizer.cpp`).
- Compute capability (`quantization.py` / `fp8.py` `check_fp8_support`,
  `check_mxfp8_support`, `check_fp8_block_scaling_support`): FP8 needs sm 8.9+; block scaling
  sm 9.0+ (Hopper only up to TE 2.8); MXFP8 sm 10.x (Blackwell), not Hopper and not sm 12+.

Pure functions on config values that raise ValueError naming the field (config.py turns them
into ConfigError at load time; `model.layer_spec` checks the hardware once a GPU is visible).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.py validates FP8 settings through this module
    from megatron_step.config import ModelConfig

_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0),
                   "mxfp8": (10, 0)}
_MXFP8_BELOW = (12, 0)  # TE 2.6+: "MXFP8 ... is not supported on 12.0+ architectures yet"


def linear_shards(model: ModelConfig, tensor_model_parallel_size: int
                  ) -> dict[str, tuple[int, int]]:
    """(out, in) of each layer linear's weight on one TP rank, with the config field behind each
    dimension, keyed by Megatron's module name."""
    tp = tensor_model_parallel_size
    qkv = (model.num_attention_heads + 2 * model.query_groups) * model.head_dim
    attention = model.num_attention_heads * model.head_dim
    return {"linear_qkv": (qkv // tp, model.hidden_size),
            "linear_proj": (model.hidden_size, attention // tp),
            "linear_fc1": (2 * model.ffn_hidden_size // tp, model.hidden_size),
            "linear_fc2": (model.hidden_size, model.ffn_hidden_size // tp)}


_FIELDS = {("linear_qkv", 0): "model.num_attention_heads / num_query_groups / hidden_size",
           ("linear_qkv", 1): "model.hidden_size",
           ("linear_proj", 0): "model.hidden_size",
           ("linear_proj", 1): "model.hidden_size",
           ("linear_fc1", 0): "model.ffn_hidden_size",
           ("linear_fc1", 1): "model.hidden_size",
           ("linear_fc2", 0): "model.hidden_size",
           ("linear_fc2", 1): "model.ffn_hidden_size"}


def shape_problems(model: ModelConfig, recipe: str, *, tensor_model_parallel_size: int = 1,
                   micro_batch_size: int = 1, sequence_parallel: bool = False) -> list[str]:
    """Every dimension TE would refuse in FP8, as readable sentences (empty when all fit)."""
    tp = tensor_model_parallel_size
    lead, last = (32, 32) if recipe == "mxfp8" else (8, 16)
    problems = []
    for name, (out_local, in_local) in linear_shards(model, tp).items():
        for axis, size, need in ((0, out_local, lead), (1, in_local, last)):
            if size % need:
                role = "output" if axis == 0 else "input"
                problems.append(f"{name} {role} dimension {size} per TP shard (from "
                                f"{_FIELDS[name, axis]}, TP {tp}) is not a multiple of {need}")
    tokens = micro_batch_size * model.seq_length // (tp if sequence_parallel else 1)
    if tokens % lead:
        problems.append(f"{tokens} tokens per micro-batch and TP shard (train.micro_batch_size x "
                        f"model.seq_length) is not a multiple of {lead}")
    return problems


def check_shapes(model: ModelConfig, recipe: str, *, tensor_model_parallel_size: int = 1,
                 micro_batch_size: int = 1, sequence_parallel: bool = False) -> None:
    """Raise ValueError naming `precision.fp8` and every offending dimension.

    Raises:
        ValueError: a linear or the token count does not fit TE's FP8 GEMM rules.
    """
    problems = shape_problems(model, recipe, tensor_model_parallel_size=tensor_model_parallel_size,
                              micro_batch_size=micro_batch_size,
                              sequence_parallel=sequence_parallel)
    if problems:
        step = 32 if recipe == "mxfp8" else 16
        raise ValueError(
            f"precision.fp8: Transformer Engine's FP8 GEMMs (recipe {recipe!r}) need every "
            f"weight and input dimension per tensor-parallel shard divisible by {step} (leading "
            f"dimensions by {8 if step == 16 else 32}): " + "; ".join(problems)
            + f". Use a smaller parallel.tensor_model_parallel_size, model sizes that are "
            f"multiples of {step} x TP (LLaMA rounds ffn_hidden_size to a multiple of 256), or "
            "precision.fp8: null")


def check_storage_block(model: ModelConfig, block_size: int,
                        tensor_model_parallel_size: int = 1) -> None:
    """Raise ValueError naming `precision.fp8_frozen_block_size` when a block would straddle a
    tensor-parallel shard or a row's end (it must divide every per-shard input dimension)."""
    if not block_size:
        return
    bad = [f"{name} ({in_local})" for name, (_, in_local)
           in linear_shards(model, tensor_model_parallel_size).items() if in_local % block_size]
    if bad:
        raise ValueError(f"precision.fp8_frozen_block_size: {block_size} does not divide the "
                         f"per-shard input dimension of {', '.join(bad)} at TP "
                         f"{tensor_model_parallel_size}; use a divisor, or 0 (per channel)")


def check_hardware(recipe: str, capability: tuple[int, int]) -> None:
    """Raise ValueError naming `precision.fp8_recipe` when this GPU cannot run the recipe.

    Args:
        recipe: `precision.fp8_recipe`.
        capability: (major, minor) CUDA compute capability, e.g. (9, 0) for H100.
    """
    need = _MIN_CAPABILITY[recipe]
    sm = f"sm{capability[0]}{capability[1]}"
    if tuple(capability) < need:
        kind = {"mxfp8": "MXFP8 needs a Blackwell GPU (sm100)",
                "blockwise": "FP8 block scaling needs Hopper (sm90) or newer",
                }.get(recipe, "FP8 needs compute capability 8.9 or newer (Ada, Hopper)")
        alternative = ("use fp8_recipe: delayed or tensorwise on Hopper" if recipe != "delayed"
                       and capability >= (8, 9) else "set precision.fp8: null")
        raise ValueError(f"precision.fp8_recipe: {recipe!r} cannot run on this GPU ({sm}): "
                          f"{kind}; {alternative}")
    if recipe == "mxfp8" and tuple(capability) >= _MXFP8_BELOW:
        raise ValueError(f"precision.fp8_recipe: 'mxfp8' is not supported by Transformer Engine "
                          f"on {sm} (sm120+); use fp8_recipe: tensorwise or blockwise")
