"""LLaMA on Megatron-Core: `ModelConfig` -> `TransformerConfig` -> one `GPTModel` per pipeline rank.

LLaMA = RMSNorm, SwiGLU MLP, rotary position embeddings, no biases, untied input/output
embeddings, grouped-query attention when `num_query_groups < num_attention_heads`. The layer spec
is Transformer Engine's when TE imports (GPU), Megatron's local spec otherwise; both give the same
checkpoint keys, so checkpoints move between them.

Initial weights do not depend on the parallel layout. Megatron initialises on the CPU from full
"master" tensors (`use_cpu_initialization`), which makes a TP=2 model hold exactly the shards of
the TP=1 model (megatron_notes.md, pitfall 3); and `SeededTransformerLayer` re-seeds the CPU
generator before building each layer from (seed, global layer index), so a layer is initialised
the same whichever pipeline rank builds it (Megatron alone gives every pipeline rank the same
generator state, so layer 2 on PP rank 1 would repeat layer 0). The embedding is built before any
layer and the output layer after the last one, so they match too: same seed -> same model at any
TP x PP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from megatron_step import te
from megatron_step.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_step.layout import pipeline_split
from megatron_step.seeds import derive_seed

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SeededTransformerLayer(TransformerLayer):
    """Megatron's TransformerLayer, initialised from (init_seed, global layer index) only."""

    def __init__(self, config: TransformerConfig, submodules: Any, layer_number: int = 1, *,
                 init_seed: int, **kwargs: Any) -> None:
        if config.init_method is not _leave_uninitialised:
            offset = get_transformer_layer_offset(
                config, kwargs.get("vp_stage"), parallel_state.get_pipeline_model_parallel_rank())
            index = layer_number - 1 + offset
            torch.default_generator.manual_seed(derive_seed("layer", init_seed, index))
        super().__init__(config, submodules, layer_number, **kwargs)


def layer_spec(precision: PrecisionConfig, seed: int = 1234) -> ModuleSpec:
    """TE spec with Transformer Engine, the local (pure megatron-core) spec without; layers are
    seeded per global index (`SeededTransformerLayer`).

    Raises:
        ConfigError: FP8 requested (`precision.fp8`) that this process cannot run (no
            Transformer Engine, or a recipe the GPU does not support).
    """
    te.check_fp8(precision)
    if te.HAVE_TE:
        spec = te.te_layer_spec()
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    return dataclasses.replace(spec, module=SeededTransformerLayer,
                               params={**spec.params, "init_seed": seed})


def pipeline_layout(num_layers: int, pipeline_model_parallel_size: int) -> list[list[str]] | None:
    """Megatron's explicit layout for our (possibly uneven) split; None without pipelining."""
    if pipeline_model_parallel_size == 1:
        return None
    split = pipeline_split(num_layers, pipeline_model_parallel_size)
    layout = [["decoder"] * n for n in split]
    layout[0].insert(0, "embedding")
    layout[-1].append("loss")
    return layout


def _leave_uninitialised(tensor: torch.Tensor) -> torch.Tensor:
    """An init method that leaves the tensor as allocated (its values come from elsewhere)."""
    return tensor


def transformer_config(model: ModelConfig, num_layers: int, parallel: ParallelConfig,
                       precision: PrecisionConfig, initialize: bool = True) -> TransformerConfig:
    """Megatron TransformerConfig of a `num_layers`-deep LLaMA (a STEP stage's depth).

    `initialize=False` skips weight initialisation and allocates directly on the current device,
    for models whose weights are loaded or grown right after (and for meta-device builds). It
    keeps Megatron's initialisation *path* with do-nothing init functions, because that path is
    also where Megatron marks tensor-parallel weights (`tensor_model_parallel`, `partition_dim`):
    with `perform_initialization=False` they would look like TP duplicates and drop out of the
    gradient norm on all but one TP rank.
    """
    dtype = DTYPES[precision.params_dtype]
    pp = parallel.pipeline_model_parallel_size
    recompute = ({"recompute_granularity": "full", "recompute_method": "uniform",
                  "recompute_num_layers": 1} if parallel.recompute_activations else {})
    fp8 = ({"fp8": precision.fp8, "fp8_recipe": precision.fp8_recipe}
           if precision.fp8 is not None else {})
    skip = ({} if initialize else {"init_method": _leave_uninitialised,
                                   "output_layer_init_method": _leave_uninitialised,
                                   "embedding_init_method": _leave_uninitialised})
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        use_cpu_initialization=initialize,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_layout=pipeline_layout(num_layers, pp),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **recompute,
        **fp8,
        **skip,
    )


def build_model(model: ModelConfig, num_layers: int, parallel: ParallelConfig,
                precision: PrecisionConfig, *, pre_process: bool,
                post_process: bool, initialize: bool = True, seed: int = 1234) -> GPTModel:
    """This pipeline rank's GPTModel of a `num_layers`-deep LLaMA, on the GPU when there is one.

    Megatron's model-parallel state must be initialised (see `parallel.init_distributed`) and
    seeded (`model_parallel_cuda_manual_seed`) before the call. With `initialize=False` the
    weights are left uninitialised (fill them by loading a checkpoint or by growth); otherwise
    `seed` decides them, whatever the TP/PP layout.
    """
    config = transformer_config(model, num_layers, parallel, precision, initialize)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(precision, seed),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
    )
    _cast_stray_parameters(gpt, config.params_dtype)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


@torch.no_grad()
def _cast_stray_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every floating-point parameter the params dtype.

    The local spec builds its RMSNorm (torch.nn.RMSNorm through Megatron's WrappedTorchNorm)
    in fp32 whatever `params_dtype` is; Megatron-LM casts such leftovers with its Float16Module
    and TE builds norms in params_dtype. Left in fp32 they break Megatron's non-distributed
    bf16 optimizer checkpoint (its sharded_state_dict maps only the float16 groups to model
    tensors: "Param id ... does not match any model sharded param") and cost 2 extra bytes per
    norm weight the planner does not count.
    """
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def layer_offset(module: GPTModel) -> int:
    """Global index of this pipeline rank's first transformer layer."""
    return module.decoder.layers[0].layer_number - 1 if len(module.decoder.layers) else 0
