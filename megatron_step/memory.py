"""Training memory of one STEP stage: the paper's model and an extended per-GPU model.

Paper model (Yano et al., NAACL 2025, section 2): model states only, 16 bytes per trainable
parameter (bf16 weight + bf16 grad + fp32 master, momentum, variance) and 2 per frozen one:

    P_i = 16 n_i P_layer + 2 N_{i-1} P_layer + 16 N_{i-1} E(P_layer)      vanilla: 16 L P_layer

n_i -> num_new_layers, N_{i-1} -> num_old_layers, L -> model.num_layers,
P_layer -> params_per_layer(model), E(P_layer) -> lora_params_per_layer(model, rank, targets).

Full model (`memory_model="full"`), bytes per parameter on one GPU, for Megatron-Core 0.16.1
DDP + `get_megatron_optimizer` (Adam), as megatron_step.optim builds them:

    role / params_dtype              bf16 (mixed precision)            fp32
    trainable weight                 2                                 4
    grad buffer (DDP main_grad)      4 (2 without grad_reduce_in_fp32) 4
    fp32 master copy                 4 (/ DP with distributed opt.)    0
    Adam exp_avg + exp_avg_sq        8 (/ DP with distributed opt.)    8 (/ DP)
    fp32 grad copy in optimizer.step 4 (/ DP) if the grad buffer is bf16, else 0 (transient)
    frozen weight                    2 (linears 1 with FP8 storage)    4

Trainable: new layers, LoRA adapters, embedding, output layer, final norm (embedding and output
layer frozen from stage 2 with `freeze_embeddings_after_stage1`). TP splits every linear and the
vocab rows, never norms; LoRA follows PEFT's TP rule (column-parallel base: A replicated, B split;
row-parallel base: A split, B replicated). PP ranks hold contiguous layers as
`layout.pipeline_split` assigns them (earlier ranks take the remainder), the embedding on the
first rank, output layer and final norm on the last. Activations: `activation_bytes_per_layer`
per layer and micro-batch; under 1F1B rank r keeps PP - r micro-batches in flight (assumes at
least PP micro-batches per step); the last rank adds fp32 logits. Per-GPU peak = the heaviest
rank's `model_state_bytes + weight_caches + max(activations, main_grads)`: the optimizer's fp32
grad copies exist only after backward freed the activations.

What the TE spec and FP8 compute add (each documented where it is computed, with its TE source):
TE's FP8 weight caches, alive across steps (`fp8_weight_cache_bytes`: 2 bytes per linear
parameter on Hopper, frozen ones included), and under FP8 one FP8 copy of the normalised input per
adapted norm-fused linear of a frozen layer (`_activation_bytes`). Left out as negligible: fused
attention's fp32 log-sum-exp (a s b per layer) and the norms' fp32 rsigma (s b), under 0.1% of a
layer's activations at h >= 1024. Not modelled: DDP bucket padding, allocator fragmentation, CUDA
context, communication buffers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from megatron_step import fp8_support
from megatron_step.config import (
    LORA_TARGETS,
    ConfigError,
    Fp8Recipe,
    GrowthConfig,
    GrowthOperator,
    GrowthPosition,
    ModelConfig,
    RunConfig,
    StageConfig,
)
from megatron_step.growth import layer_map
from megatron_step.layout import ParallelSizes, check_layout, pipeline_offsets, pipeline_split

MemoryModel = Literal["paper", "full"]

_COLUMN_PARALLEL = frozenset({"linear_qkv", "linear_fc1"})
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySettings:
    """What the memory model assumes besides the model shape (field names follow the config)."""

    memory_model: MemoryModel = "full"
    """`paper`: the published formula; `full`: the extended per-GPU model below."""
    lora_rank: int = 8
    """Adapter rank on the frozen layers; 0 means no adapters (E(P_layer) = 0)."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    """Megatron's ZeRO-1: fp32 master weights and Adam states sharded over data-parallel ranks."""
    params_dtype: Literal["bf16", "fp32"] = "bf16"
    grad_reduce_in_fp32: bool = True
    """Megatron DDP's fp32 grad buffer for bf16 params (precision.grad_reduce_in_fp32)."""
    fp8_frozen_storage: bool = False
    """Frozen linear weights stored in FP8 (precision.fp8_frozen_storage): 1 byte each plus
    fp32 scales (fp8_storage.py)."""
    fp8_frozen_block_size: int = 0
    """Scale granularity of FP8 storage: 0 per output channel, N per N input elements."""
    micro_batch_size: int = 1
    recompute_activations: bool = False
    """Full recompute of every layer: only layer inputs stay alive between forward and backward."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norm and residual activations are also split over TP."""
    attention_backend: Literal["flash", "unfused"] = "flash"
    """`unfused` keeps the a * s^2 softmax probabilities per layer; flash attention does not."""
    freeze_embeddings_after_stage1: bool = False
    growth_operator: GrowthOperator = "interpolation_mean"
    growth_position: GrowthPosition | tuple[int, ...] = "upper"
    growth_seed: int = 0
    """Operator, position and seed of growth.layer_map: where the new layers of a stage go
    (`stack` appends on top whatever the position), which decides their pipeline rank."""
    fp8_recipe: Fp8Recipe | None = None
    """FP8 compute through Transformer Engine with this recipe (precision.fp8_recipe when
    precision.fp8 is set); None: no FP8 compute. Adds TE's FP8 weight caches (see module doc)."""

    def validate(self, model: ModelConfig) -> None:
        """Raise ConfigError naming the field when a setting is impossible for this model."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "data_parallel_size", "micro_batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank: must be >= 0, got {self.lora_rank}")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ConfigError(f"lora_targets: choose from {', '.join(LORA_TARGETS)}, got "
                              f"{list(self.lora_targets)}")
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        try:  # the same TP/PP rules as the run config and the model builder
            check_layout(model, model.num_layers, ParallelSizes(tp * pp, tp, pp))
        except ValueError as exc:
            raise ConfigError(str(exc).removeprefix("parallel.")) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryBreakdown:
    """Bytes on one GPU (one pipeline rank), by component."""

    weights: int
    grads: int
    master_weights: int
    optimizer_states: int
    main_grads: int
    """Transient fp32 grad copies made by the optimizer step (after activations are freed)."""
    activations: int
    weight_caches: int = 0
    """FP8 copies of the linear weights Transformer Engine keeps across micro-batches (FP8
    compute only); alive across steps like the model state, but not part of it."""

    @property
    def model_state_bytes(self) -> int:
        """Everything alive across steps: weights, grad buffer, master weights, Adam states."""
        return self.weights + self.grads + self.master_weights + self.optimizer_states

    @property
    def peak_bytes(self) -> int:
        return (self.model_state_bytes + self.weight_caches
                + max(self.activations, self.main_grads))

    def as_dict(self) -> dict[str, int]:
        """Components plus `model_state_bytes` and `peak_bytes` (JSON-ready)."""
        return {"weights": self.weights, "grads": self.grads,
                "master_weights": self.master_weights,
                "optimizer_states": self.optimizer_states, "main_grads": self.main_grads,
                "activations": self.activations, "weight_caches": self.weight_caches,
                "model_state_bytes": self.model_state_bytes, "peak_bytes": self.peak_bytes}


@dataclass(frozen=True, kw_only=True, slots=True)
class StageCost:
    """One stage: its growth, whole-model parameter counts and per-GPU memory."""

    num_new_layers: int
    num_layers: int
    trainable_params: int
    """Trainable non-adapter parameters: new layers (+ embeddings, output layer, final norm)."""
    frozen_params: int
    adapter_params: int
    pipeline_ranks: tuple[MemoryBreakdown, ...]
    """Per-GPU memory of each pipeline rank (one entry without PP)."""

    @property
    def pipeline_rank(self) -> int:
        """The heaviest pipeline rank (the first on ties): it sets the per-GPU peak."""
        peaks = [memory.peak_bytes for memory in self.pipeline_ranks]
        return peaks.index(max(peaks))

    @property
    def memory(self) -> MemoryBreakdown:
        return self.pipeline_ranks[self.pipeline_rank]

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    def as_dict(self) -> dict[str, object]:
        """JSON-ready dict: counts, the heaviest rank's breakdown, `peak_bytes`, every rank."""
        return {"num_new_layers": self.num_new_layers, "num_layers": self.num_layers,
                "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
                "adapter_params": self.adapter_params, "pipeline_rank": self.pipeline_rank,
                "bytes": self.memory.as_dict(), "peak_bytes": self.peak_bytes,
                "pipeline_ranks": [memory.as_dict() for memory in self.pipeline_ranks]}


def _linear_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear of a layer, in Megatron's names."""
    h, ffn = model.hidden_size, model.ffn_hidden_size
    qkv_out = (model.num_attention_heads + 2 * model.query_groups) * model.head_dim
    return {"linear_qkv": (h, qkv_out),
            "linear_proj": (model.num_attention_heads * model.head_dim, h),
            "linear_fc1": (h, 2 * ffn),  # SwiGLU: gate and up projections in one weight
            "linear_fc2": (ffn, h)}


def params_per_layer(model: ModelConfig) -> int:
    """P_layer: the four linears (no biases) plus the two RMSNorm weights of one layer."""
    linears = sum(i * o for i, o in _linear_shapes(model).values())
    return linears + 2 * model.hidden_size


def lora_params_per_layer(model: ModelConfig, rank: int,
                          targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """E(P_layer): a rank-r adapter on an in x out linear adds r * (in + out) parameters."""
    shapes = _linear_shapes(model)
    return sum(rank * sum(shapes[name]) for name in targets)


def count_parameters(model: ModelConfig) -> int:
    """Parameters Megatron-Core's GPTModel allocates for this LLaMA (closed form).

    L layers, word embedding vocab x h, output layer vocab x h unless tied, final RMSNorm h.
    """
    return model.num_layers * params_per_layer(model) + _vocab_params(model) + model.hidden_size


def _vocab_params(model: ModelConfig) -> int:
    """Word embedding plus output layer (one tensor when tied)."""
    tensors = 2 if model.untie_embeddings_and_output_weights else 1
    return tensors * model.vocab_size * model.hidden_size


def _layer_params_per_rank(model: ModelConfig, settings: MemorySettings) -> tuple[int, int, int]:
    """(linear, norm, adapter) parameters of one layer held by one TP rank."""
    tp, rank = settings.tensor_model_parallel_size, settings.lora_rank
    shapes = _linear_shapes(model)
    linear = sum(i * o for i, o in shapes.values()) // tp
    adapter = 0
    for name in settings.lora_targets:
        i, o = shapes[name]
        # column-parallel: A [r, in] replicated, B [out/tp, r]
        # row-parallel: A [r, in/tp], B [out, r] replicated
        adapter += rank * (i + o // tp) if name in _COLUMN_PARALLEL else rank * (i // tp + o)
    return linear, 2 * model.hidden_size, adapter


def fp8_scale_elements(model: ModelConfig, settings: MemorySettings) -> int:
    """fp32 scales of one frozen layer's FP8-stored linears on one TP rank (fp8_storage.py):
    one per output row of each shard, or one per `fp8_frozen_block_size` input elements of it.
    (The TE spec keeps one scale per tensor instead: 4 bytes per linear, a negligible
    over-count here.)"""
    shards = fp8_support.linear_shards(model, settings.tensor_model_parallel_size)
    block = settings.fp8_frozen_block_size
    return sum(out * (inputs // block if block else 1) for out, inputs in shards.values())


def fp8_weight_cache_bytes(settings: MemorySettings, trainable_linear: int,
                           frozen_linear: int) -> int:
    """Bytes of the FP8 weight copies TE caches for one rank's linear parameters.

    With FP8 compute, TE quantises each weight once per optimizer step (Megatron sets
    `is_first_microbatch`) and keeps the result for the step's other micro-batches and for the
    backward pass, frozen weights included (TE 2.x `module/base.py` `get_weight_workspace`,
    keyed "weight", independent of requires_grad). Backward needs the transposed weight for the
    input gradient, so on Hopper the copy holds FP8 data + FP8 transpose: 2 bytes per element
    for delayed, current (tensorwise) and block scaling, 2 + 2/32 for MXFP8's E8M0 block scales
    (`csrc/quantizer.cpp` create_tensor). A weight already stored in FP8 (precision.
    fp8_frozen_storage) is used directly, but Hopper attaches its 1-byte transpose to it
    (`Float8TensorStorage.update_usage`). Blackwell needs no transpose for delayed/current
    scaling (1 byte); this model assumes Hopper (H100/H200), the product's target.
    """
    if settings.fp8_recipe is None:
        return 0
    per_element = 2 + (2 / 32 if settings.fp8_recipe == "mxfp8" else 0)
    frozen = 1 if settings.fp8_frozen_storage else per_element
    return math.ceil(per_element * trainable_linear + frozen * frozen_linear)


def _activation_bytes(model: ModelConfig, settings: MemorySettings, num_layers: int,
                      num_frozen: int, in_flight: int, last_rank: bool) -> int:
    """Activation estimate of one PP rank (bytes); see `activation_bytes_per_layer`.

    FP8 with adapters adds one term per frozen layer: an adapted TE LayerNormLinear (linear_qkv,
    linear_fc1) hands its normalised input to the LoRA branch (`return_layernorm_output`), and
    under FP8 TE then also saves its own FP8 copy of that input although a frozen weight needs
    no weight gradient (TE 2.x `module/layernorm_linear.py`: `ln_out` is only freed when the
    weight is frozen *and* not returned): 1 byte per element of [s, b, h].
    """
    s, b, h = model.seq_length, settings.micro_batch_size, model.hidden_size
    tp = settings.tensor_model_parallel_size
    element = 2 if settings.params_dtype == "bf16" else 4
    full_layer = activation_bytes_per_layer(model, settings)
    layer_input = element * s * b * h // (tp if settings.sequence_parallel else 1)
    kept = layer_input if settings.recompute_activations else full_layer
    # last rank: final-norm input, output-layer input, fp32 logits kept by the cross entropy
    head = 2 * layer_input + 4 * s * b * model.vocab_size // tp if last_rank else 0
    recomputed = full_layer if settings.recompute_activations else 0
    fp8_norm_copies = 0  # 1 byte per [s, b, h] element, per adapted norm-fused linear
    if settings.fp8_recipe is not None and settings.lora_rank and num_frozen:
        per_layer = (sum(t in ("linear_qkv", "linear_fc1") for t in settings.lora_targets)
                     * layer_input // element)
        if settings.recompute_activations:  # only the layer being recomputed holds them
            recomputed += per_layer
        else:
            fp8_norm_copies = num_frozen * per_layer
    return in_flight * (num_layers * kept + head + fp8_norm_copies) + recomputed


def activation_bytes_per_layer(model: ModelConfig, settings: MemorySettings) -> int:
    """Estimated bytes one layer keeps for backward, per micro-batch and TP rank.

    Derived like Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", section 4.1, 34 s b h + 5 a s^2 b bytes for GPT with dropout), for LLaMA: no
    dropout masks, GQA (k, v have g * d channels) and SwiGLU (fc1 gives 2 * ffn channels).
    Elements kept: inputs of both RMSNorms and of linear_qkv and linear_fc1 (4 s b h, split over
    TP only with sequence parallelism); q and the attention output that feeds linear_proj
    (2 s b h); k and v (2 s b g d); fc1 output and SwiGLU output (3 s b ffn); with unfused
    attention the softmax probabilities (a s^2 b). All but the first group are split over TP.
    Times 2 bytes (bf16) or 4 (fp32). Ignores LoRA intermediates (r << h), flash-attention
    log-sum-exp and transient buffers: it is an estimate, not a measurement.
    """
    s, b, h = model.seq_length, settings.micro_batch_size, model.hidden_size
    tp = settings.tensor_model_parallel_size
    element = 2 if settings.params_dtype == "bf16" else 4
    replicated = 4 * s * b * h // (tp if settings.sequence_parallel else 1)
    split = (2 * s * b * h + 2 * s * b * model.query_groups * model.head_dim
             + 3 * s * b * model.ffn_hidden_size)
    if settings.attention_backend == "unfused":
        split += model.num_attention_heads * s * s * b
    return element * (replicated + split // tp)


def _paper_cost(model: ModelConfig, num_new: int, num_old: int,
                settings: MemorySettings) -> StageCost:
    """The published formula, split into the components it counts."""
    per_layer = params_per_layer(model)
    adapter = num_old * lora_params_per_layer(model, settings.lora_rank, settings.lora_targets)
    trainable = num_new * per_layer + adapter
    memory = MemoryBreakdown(weights=2 * (trainable + num_old * per_layer), grads=2 * trainable,
                             master_weights=4 * trainable, optimizer_states=8 * trainable,
                             main_grads=0, activations=0)
    return StageCost(num_new_layers=num_new, num_layers=num_old + num_new,
                     trainable_params=num_new * per_layer, frozen_params=num_old * per_layer,
                     adapter_params=adapter, pipeline_ranks=(memory,))


def _full_cost(model: ModelConfig, num_new: int, num_old: int,
               settings: MemorySettings) -> StageCost:
    """The extended per-GPU model, for every pipeline rank of this stage."""
    tp, pp = settings.tensor_model_parallel_size, settings.pipeline_model_parallel_size
    depth = num_old + num_new
    bf16 = settings.params_dtype == "bf16"
    weight_bytes = 2 if bf16 else 4
    grad_bytes = 4 if settings.grad_reduce_in_fp32 or not bf16 else 2
    frozen_linear_bytes = 1 if settings.fp8_frozen_storage else weight_bytes
    scale_bytes = 4 * fp8_scale_elements(model, settings) if settings.fp8_frozen_storage else 0
    dp = settings.data_parallel_size if settings.use_distributed_optimizer else 1
    linear, norm, adapter = _layer_params_per_rank(model, settings)
    vocab_rows = model.vocab_size * model.hidden_size // tp
    embeddings_trainable = not (settings.freeze_embeddings_after_stage1 and num_old > 0)
    # a tied output layer still has its own copy on the last PP rank when PP > 1
    has_output = model.untie_embeddings_and_output_weights or pp > 1
    growth = GrowthConfig(operator=settings.growth_operator, position=settings.growth_position,
                          seed=settings.growth_seed)
    new = ({i for i, source in enumerate(layer_map(num_old, num_new, growth)) if source.is_new}
           if num_old else set(range(depth)))
    ranks = []
    for rank, (first, count) in enumerate(zip(pipeline_offsets(depth, pp),
                                              pipeline_split(depth, pp), strict=True)):
        num_trainable = sum(index in new for index in range(first, first + count))
        num_frozen = count - num_trainable
        trainable = num_trainable * (linear + norm) + num_frozen * adapter
        frozen_bytes = num_frozen * (linear * frozen_linear_bytes + scale_bytes
                                     + norm * weight_bytes)
        vocab_tensors = (rank == 0) + (rank == pp - 1 and has_output)
        if embeddings_trainable:
            trainable += vocab_tensors * vocab_rows
        else:
            frozen_bytes += vocab_tensors * vocab_rows * weight_bytes
        trainable += model.hidden_size if rank == pp - 1 else 0  # final RMSNorm
        shard = math.ceil(trainable / dp)
        ranks.append(MemoryBreakdown(
            weights=weight_bytes * trainable + frozen_bytes, grads=grad_bytes * trainable,
            master_weights=4 * shard if bf16 else 0, optimizer_states=8 * shard,
            main_grads=4 * shard if grad_bytes == 2 else 0,
            activations=_activation_bytes(model, settings, count, num_frozen, pp - rank,
                                          rank == pp - 1),
            weight_caches=fp8_weight_cache_bytes(settings, num_trainable * linear,
                                                 num_frozen * linear)))
    per_layer = params_per_layer(model)
    vocab_params = _vocab_params(model)
    trainable_total = num_new * per_layer + model.hidden_size
    frozen_total = num_old * per_layer
    if embeddings_trainable:
        trainable_total += vocab_params
    else:
        frozen_total += vocab_params
    return StageCost(num_new_layers=num_new, num_layers=depth, trainable_params=trainable_total,
                     frozen_params=frozen_total,
                     adapter_params=num_old * lora_params_per_layer(model, settings.lora_rank,
                                                                    settings.lora_targets),
                     pipeline_ranks=tuple(ranks))


def stage_cost(model: ModelConfig, num_new_layers: int, num_old_layers: int,
               settings: MemorySettings) -> StageCost:
    """Memory of a stage that grows `num_old_layers` by `num_new_layers` and trains the new ones.

    The first stage is `num_old_layers=0` (everything trainable); vanilla training is the first
    stage at full depth. The cost depends only on (num_new_layers, num_old_layers), which is what
    makes the stage solver in plan.py an exact dynamic programme.

    Args:
        model: the target model; only its depth-independent shape is used.
        num_new_layers: n_i >= 0, layers added (and trained) in this stage; 0 is a
            parameter-efficient stage at the previous depth (ReLoRA-style: all layers adapted).
        num_old_layers: N_{i-1} >= 0, layers that existed before (frozen, with adapters).
        settings: memory model and training setup.

    Returns:
        Whole-model parameter counts and the per-GPU breakdown of the heaviest PP rank.

    Raises:
        ConfigError: naming the field when the stage is impossible (a pipeline rank without
            layers).
    """
    if num_new_layers < 0 or num_old_layers < 0 or num_new_layers + num_old_layers < 1:
        raise ConfigError(f"num_new_layers: need >= 0 new and >= 0 old layers, at least one "
                          f"in all, got {num_new_layers} and {num_old_layers}")
    if settings.memory_model == "paper":
        return _paper_cost(model, num_new_layers, num_old_layers, settings)
    pp = settings.pipeline_model_parallel_size
    if num_old_layers + num_new_layers < pp:
        raise ConfigError(f"pipeline_model_parallel_size: {pp} pipeline stages > stage depth "
                          f"{num_old_layers + num_new_layers}; every rank needs a layer")
    return _full_cost(model, num_new_layers, num_old_layers, settings)


def parse_size(text: str) -> int:
    """Bytes in a size such as `40GiB`, `80GB` (decimal), `39.5GiB`, `512MiB` or `1000000`.

    Raises:
        ValueError: the text is not a positive size with a known unit.
    """
    match = _SIZE_PATTERN.fullmatch(text)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS or (unit in ("", "B") and "." in match.group(1)):
        raise ValueError(f"cannot parse {text!r} (examples: 40GiB, 80GB, 512MiB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"must be > 0, got {text!r}")
    return size


def format_size(num_bytes: int) -> str:
    """Bytes as GiB with two decimals (MiB below 1 GiB), the unit people budget GPUs in."""
    if num_bytes < 2**30:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**30:.2f} GiB"


def run_settings(config: RunConfig, stage: StageConfig, data_parallel_size: int
                 ) -> MemorySettings:
    """The full-model settings that describe a training run's stage (trainer summaries)."""
    from megatron_step import te

    return MemorySettings(
        lora_rank=stage.lora.rank, lora_targets=stage.lora.targets,
        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size,
        data_parallel_size=data_parallel_size,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        params_dtype=config.precision.params_dtype,
        grad_reduce_in_fp32=config.precision.grad_reduce_in_fp32,
        fp8_frozen_storage=config.precision.fp8_frozen_storage,
        fp8_frozen_block_size=config.precision.fp8_frozen_block_size,
        micro_batch_size=config.train.micro_batch_size,
        recompute_activations=config.parallel.recompute_activations,
        attention_backend="flash" if te.HAVE_TE else "unfused",
        freeze_embeddings_after_stage1=config.freeze_embeddings_after_stage1,
        growth_operator=stage.growth.operator, growth_position=stage.growth.position,
        growth_seed=stage.growth.seed,
        fp8_recipe=config.precision.fp8_recipe if config.precision.fp8 is not None else None)
