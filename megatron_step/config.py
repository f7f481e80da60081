"""Typed run configuration: frozen dataclasses loaded from YAML, validated with dotted field paths.

One tree, `RunConfig(model, parallel, precision, optimizer, train, data, checkpoint, logging,
stages)`. Field names that exist in Megatron's `TransformerConfig` keep Megatron's spelling so the
mapping in `model.py` is near-identity; STEP-only fields use full words (`num_new_layers`,
`grow_at_fraction`).

Every user error is a `ConfigError` (a `ValueError`) whose message starts with the dotted path of
the offending field, e.g. `stages[1].lora.rank: must be > 0, got 0`. The same validator runs for
YAML files, Python dicts and `--set key=value` overrides, so there is exactly one notion of "valid".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_step import fp8_support
from megatron_step.layout import ParallelSizes, check_layout

ROOT_NAME = ""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (message names it)."""


def _path(parent: str, child: str | int) -> str:
    if isinstance(child, int):
        return f"{parent}[{child}]"
    return f"{parent}.{child}" if parent else child


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path or '<root>'}: {message}")


def _check(path: str, condition: bool, message: str) -> None:
    if not condition:
        _fail(path, message)


# ---------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """A LLaMA-style decoder: RMSNorm, SwiGLU, RoPE, no biases, untied embeddings by default."""

    num_layers: int
    """Target depth L (the last stage's depth in a STEP run)."""
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means one per attention head (MHA)."""
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True

    @property
    def query_groups(self) -> int:
        """Number of key/value heads actually used."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, path: str) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "seq_length", "rotary_base"):
            value = getattr(self, name)
            _check(_path(path, name), value > 0, f"must be > 0, got {value}")
        _check(_path(path, "hidden_size"), self.hidden_size % self.num_attention_heads == 0,
               f"{self.hidden_size} is not divisible by num_attention_heads "
               f"({self.num_attention_heads})")
        if self.num_query_groups is not None:
            _check(_path(path, "num_query_groups"), self.num_query_groups > 0,
                   f"must be > 0, got {self.num_query_groups}")
            _check(_path(path, "num_query_groups"),
                   self.num_attention_heads % self.num_query_groups == 0,
                   f"{self.num_query_groups} does not divide num_attention_heads "
                   f"({self.num_attention_heads})")
        _check(_path(path, "norm_epsilon"), self.norm_epsilon > 0,
               f"must be > 0, got {self.norm_epsilon}")
        _check(_path(path, "init_method_std"), self.init_method_std > 0,
               f"must be > 0, got {self.init_method_std}")


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Divisible by TP=2 and PP=2, GQA (2 query groups for 4 heads): the test-suite model.
    "tiny": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, vocab_size=256, seq_length=64),
    # The ReLoRA/GaLore "350M" LLaMA, almost surely the paper's 368M (367.97M parameters). Kept
    # exact for the paper; its FFN 2736 allows FP8 only at TP=1 (1368 per TP=2 shard is not a
    # multiple of 16).
    "llama-368m": ModelConfig(num_layers=24, hidden_size=1024, num_attention_heads=16,
                              ffn_hidden_size=2736, vocab_size=32000, seq_length=1024),
    # GaLore's "1B" LLaMA, a 1.2B-class stand-in for the paper's 1.2B (config unpublished),
    # with its FFN 8/3 * 2048 = 5461 rounded up to a multiple of 256 as LLaMA and Megatron do:
    # 5461 is odd, so no tensor parallelism and no FP8 GEMMs (dims must divide by 16 per shard).
    "llama-1.2b": ModelConfig(num_layers=24, hidden_size=2048, num_attention_heads=32,
                              ffn_hidden_size=5632, vocab_size=32000, seq_length=1024),
    "llama2-7b": ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                             ffn_hidden_size=11008, vocab_size=32000, seq_length=4096),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return a preset by name, optionally with fields replaced (validated)."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; "
                          f"choose one of {', '.join(MODEL_PRESETS)}")
    return load_model_config({"preset": name, **overrides})


# ---------------------------------------------------------------------------------------------
# Parallelism and precision


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelConfig:
    """Megatron parallel layout; the data-parallel size is derived as world / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam states over data-parallel ranks (ZeRO-1)."""
    recompute_activations: bool = False
    """Full activation recompute of every transformer layer (Megatron 'full'/'uniform')."""

    def validate(self, path: str) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            _check(_path(path, name), value >= 1, f"must be >= 1, got {value}")


Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PrecisionConfig:
    """Numeric formats. FP8 needs Transformer Engine on Hopper GPUs (see `megatron_step.te`)."""

    params_dtype: Literal["fp32", "bf16"] = "bf16"
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Fp8Recipe = "delayed"
    fp8_frozen_storage: bool = False
    """Store the frozen layers' linear weights in FP8 (float8_e4m3fn, 1 byte per parameter +
    fp32 scales) on the device, with or without FP8 compute; full precision stays on the host
    and in checkpoints (see megatron_step/fp8_storage.py)."""
    fp8_frozen_block_size: int = 0
    """Scale granularity of FP8 storage on Megatron's local spec: 0 = one scale per output
    channel (row of W), N = one per N consecutive input elements of a row (N must divide every
    frozen linear's per-shard input dimension). The TE spec uses one scale per tensor."""
    grad_reduce_in_fp32: bool = True
    """With bf16 params, accumulate and all-reduce gradients in fp32 (4 B per trainable param),
    as Megatron-LM does for bf16; false keeps bf16 gradient buffers (2 B)."""

    def validate(self, path: str) -> None:
        _check(_path(path, "fp8_frozen_block_size"), self.fp8_frozen_block_size >= 0,
               f"must be >= 0 (0: one scale per output channel), got "
               f"{self.fp8_frozen_block_size}")
        if self.fp8_frozen_block_size and not self.fp8_frozen_storage:
            _fail(_path(path, "fp8_frozen_block_size"), "has no effect without "
                  "precision.fp8_frozen_storage: true")


# ---------------------------------------------------------------------------------------------
# Stage components

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

GrowthOperator = Literal["interpolation_mean", "copy", "random", "stack"]
GrowthPosition = Literal["upper", "intermediate", "lower", "random"]


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraConfig:
    """Low-rank adapters on the frozen layers' linears (scale = alpha / rank)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, path: str) -> None:
        _check(_path(path, "rank"), self.rank > 0, f"must be > 0, got {self.rank}")
        _check(_path(path, "alpha"), self.alpha > 0, f"must be > 0, got {self.alpha}")
        _check(_path(path, "dropout"), 0.0 <= self.dropout < 1.0,
               f"must be in [0, 1), got {self.dropout}")
        _check(_path(path, "targets"), len(self.targets) > 0, "must name at least one linear")
        for i, target in enumerate(self.targets):
            _check(_path(_path(path, "targets"), i), target in LORA_TARGETS,
                   f"unknown target {target!r}; choose from {', '.join(LORA_TARGETS)}")
        _check(_path(path, "targets"), len(set(self.targets)) == len(self.targets),
               f"duplicate entries in {list(self.targets)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReloraConfig:
    """ReLoRA inside a stage: merge + re-init adapters every `reset_interval` steps."""

    reset_interval: int
    optimizer_reset: Literal["reset", "magnitude_prune", "random_prune"] = "magnitude_prune"
    prune_ratio: float = 0.99
    """Fraction of each adapter's Adam state zeroed by the prune modes (ReLoRA's 0.99)."""
    rewarmup_steps: int = 10
    """Jagged schedule: steps of linear LR re-warmup after each reset."""

    def validate(self, path: str) -> None:
        _check(_path(path, "reset_interval"), self.reset_interval > 0,
               f"must be > 0, got {self.reset_interval}")
        _check(_path(path, "prune_ratio"), 0.0 <= self.prune_ratio <= 1.0,
               f"must be in [0, 1], got {self.prune_ratio}")
        _check(_path(path, "rewarmup_steps"), self.rewarmup_steps >= 0,
               f"must be >= 0, got {self.rewarmup_steps}")
        _check(_path(path, "rewarmup_steps"), self.rewarmup_steps < self.reset_interval,
               f"{self.rewarmup_steps} must be < reset_interval ({self.reset_interval})")


@dataclass(frozen=True, kw_only=True, slots=True)
class GrowthConfig:
    """How the layers added at a stage boundary are placed and initialised (see growth.py)."""

    operator: GrowthOperator = "interpolation_mean"
    position: GrowthPosition | tuple[int, ...] = "upper"
    """A named policy, or explicit indices of the new layers in the grown model."""
    zero_output: bool = False
    """Function preserving: new layers' linear_proj and linear_fc2 start at zero (LLaMA-Pro)."""
    seed: int = 0

    def validate(self, path: str) -> None:
        if isinstance(self.position, tuple):
            _check(_path(path, "position"), all(i >= 0 for i in self.position),
                   f"indices must be >= 0, got {list(self.position)}")
            _check(_path(path, "position"), len(set(self.position)) == len(self.position),
                   f"indices must be distinct, got {list(self.position)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StageConfig:
    """One STEP stage: its depth, its budget and its learning-rate schedule.

    Stage 1 trains all its layers; every later stage grows the model to `num_layers`, freezes the
    layers that existed before, adapts them with LoRA and trains the new layers + adapters.
    """

    num_layers: int
    """Total depth after this stage's growth (N_i in the paper). Equal to the previous stage's
    depth, the stage grows nothing and trains every layer through adapters (a ReLoRA-style
    parameter-efficient stage)."""
    train_steps: int
    """Planned length of this stage's schedule (T_i); the stage runs grow_at_fraction of it."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    grow_at_fraction: float = 0.75
    """The next stage starts after this fraction of train_steps (1.0 for the last stage)."""
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    relora: ReloraConfig | None = None

    def validate(self, path: str) -> None:
        _check(_path(path, "num_layers"), self.num_layers > 0,
               f"must be > 0, got {self.num_layers}")
        _check(_path(path, "train_steps"), self.train_steps > 0,
               f"must be > 0, got {self.train_steps}")
        _check(_path(path, "lr"), self.lr > 0, f"must be > 0, got {self.lr}")
        _check(_path(path, "min_lr"), 0 <= self.min_lr <= self.lr,
               f"must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(_path(path, "warmup_steps"), 0 <= self.warmup_steps < self.train_steps,
               f"must be in [0, train_steps={self.train_steps}), got {self.warmup_steps}")
        _check(_path(path, "grow_at_fraction"), 0.0 < self.grow_at_fraction <= 1.0,
               f"must be in (0, 1], got {self.grow_at_fraction}")

    @property
    def run_steps(self) -> int:
        """Steps actually trained in this stage when another stage follows."""
        return max(1, round(self.grow_at_fraction * self.train_steps))


# ---------------------------------------------------------------------------------------------
# Optimisation, data, checkpoints, logging


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW hyper-parameters (the learning rates live in each stage)."""

    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def validate(self, path: str) -> None:
        _check(_path(path, "weight_decay"), self.weight_decay >= 0,
               f"must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(_path(path, name), 0.0 <= value < 1.0, f"must be in [0, 1), got {value}")
        _check(_path(path, "adam_eps"), self.adam_eps > 0, f"must be > 0, got {self.adam_eps}")
        _check(_path(path, "clip_grad"), self.clip_grad >= 0,
               f"must be >= 0 (0 disables clipping), got {self.clip_grad}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Batching, evaluation cadence and the seed."""

    micro_batch_size: int = 2
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills
    the gap between micro_batch_size * DP and this)."""
    seed: int = 1234
    eval_interval: int = 50
    eval_iters: int = 4
    """Validation reads eval_iters global batches (the same samples at every evaluation and
    every parallel layout)."""
    log_interval: int = 10

    def validate(self, path: str) -> None:
        for name in ("micro_batch_size", "global_batch_size", "eval_interval", "eval_iters",
                     "log_interval"):
            value = getattr(self, name)
            _check(_path(path, name), value > 0, f"must be > 0, got {value}")
        _check(_path(path, "global_batch_size"),
               self.global_batch_size % self.micro_batch_size == 0,
               f"{self.global_batch_size} is not a multiple of micro_batch_size "
               f"({self.micro_batch_size})")


@dataclass(frozen=True, kw_only=True, slots=True)
class BlendEntry:
    """One weighted source of a data blend."""

    path: str
    """Prefix of an indexed dataset, or a glob of prefixes ('data/fwe-*': the shards written by
    tools/preprocess_data.py --output-shards), which share the weight in proportion to their
    tokens."""
    weight: float = 1.0
    """Relative weight (weights are normalised over the blend): the share of samples drawn."""

    def validate(self, path: str) -> None:
        _check(_path(path, "path"), bool(self.path), "must be a non-empty path")
        _check(_path(path, "weight"), self.weight > 0, f"must be > 0, got {self.weight}")


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitBlends:
    """Separate train / valid / test distributions (Megatron's blend_per_split)."""

    train: tuple[BlendEntry, ...]
    valid: tuple[BlendEntry, ...] = ()
    """Validation data (empty: no validation)."""
    test: tuple[BlendEntry, ...] = ()

    def validate(self, path: str) -> None:
        _check(_path(path, "train"), len(self.train) > 0, "must list at least one dataset")


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Where tokens come from: an indexed dataset prefix, a weighted blend of them, or the
    embedded demo corpus."""

    path: str | None = None
    """Prefix of a `.bin/.idx` pair written by tools/preprocess_data.py, or 'embedded'; unset:
    the embedded demo corpus, unless `blend` is set."""
    blend: tuple[BlendEntry, ...] | SplitBlends | None = None
    """Weighted datasets mixed by Megatron's BlendedMegatronDatasetBuilder: a list of
    {path, weight}, each split into train/valid/test by `split`; or {train: [...], valid: [...],
    test: [...]}, separate distributions used whole (`split` is then unused)."""
    tokenizer: str = "byte"
    """'byte' (built in, vocab 256), a tokenizer.json path, or a SentencePiece .model path."""
    split: str = "98,2,0"
    """Train/valid/test weights, Megatron's string format."""
    num_workers: int = 2
    """DataLoader processes that prepare the next micro-batches while the model computes
    (Megatron's --num-workers); 0 reads them in the training process."""

    def validate(self, path: str) -> None:
        parts = self.split.split(",")
        ok = len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts)
        _check(_path(path, "split"), ok, f"must be three comma-separated weights, got "
               f"{self.split!r}")
        _check(_path(path, "blend"), self.blend is None or self.path is None,
               f"set either data.path ({self.path!r}) or data.blend, not both")
        _check(_path(path, "num_workers"), self.num_workers >= 0,
               f"must be >= 0, got {self.num_workers}")


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Checkpoint cadence; files go under `<out_dir>/checkpoints`."""

    save_interval: int = 0
    """Save every N steps within a stage (0: only at stage ends and on signals)."""
    keep_last: int = 2
    """Complete mid-stage checkpoints to keep; stage-end checkpoints are always kept."""

    def validate(self, path: str) -> None:
        _check(_path(path, "save_interval"), self.save_interval >= 0,
               f"must be >= 0, got {self.save_interval}")
        _check(_path(path, "keep_last"), self.keep_last >= 1,
               f"must be >= 1, got {self.keep_last}")


@dataclass(frozen=True, kw_only=True, slots=True)
class WandbConfig:
    """Weights & Biases run (rank 0): wandb.init's project, entity, name and mode."""

    project: str
    entity: str | None = None
    """Team or user; None: the logged-in user's default entity."""
    name: str | None = None
    """Run name; None: the name of out_dir."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """offline: log under <out_dir>/wandb only (no network; `wandb sync` uploads it later)."""

    def validate(self, path: str) -> None:
        _check(_path(path, "project"), bool(self.project), "must be a non-empty string")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggingConfig:
    """Rank-0 logging outputs."""

    tensorboard: bool = True
    """Write TensorBoard scalars when the `tensorboard` package is installed."""
    wandb: WandbConfig | None = None
    """Also log to Weights & Biases (needs the `wandb` package): the same scalars as
    TensorBoard, plus stage boundaries and the planner's predicted memory."""
    plots: bool = True
    progress_bar: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """A whole STEP (or, with one stage, vanilla) pre-training run."""

    out_dir: str
    model: ModelConfig
    stages: tuple[StageConfig, ...]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    freeze_embeddings_after_stage1: bool = False
    """From stage 2 on, freeze the word embeddings and output layer too (not adapted)."""
    init_checkpoint: str | None = None
    """A megatron_step checkpoint (e.g. from tools/import_hf.py) of stages[0].num_layers layers
    that stands for a finished stage 1: the run starts by growing it into stage 2."""

    def validate(self, path: str) -> None:
        _check("out_dir", bool(self.out_dir), "must be a non-empty path")
        _check("stages", len(self.stages) > 0, "must list at least one stage")
        previous = 0
        for i, stage in enumerate(self.stages):
            _check(_path(_path("stages", i), "num_layers"), stage.num_layers >= previous,
                   f"must not shrink the model: {stage.num_layers} < previous depth {previous}")
            if i == 0:
                _check(_path(_path("stages", i), "relora"), stage.relora is None,
                       "stage 1 trains every layer fully; ReLoRA applies to adapted stages")
            previous = stage.num_layers
        _check(_path(_path("stages", len(self.stages) - 1), "num_layers"),
               self.stages[-1].num_layers == self.model.num_layers,
               f"the last stage must reach model.num_layers ({self.model.num_layers}), "
               f"got {self.stages[-1].num_layers}")
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        try:
            check_layout(self.model, self.stages[0].num_layers, ParallelSizes(tp * pp, tp, pp))
        except ValueError as exc:
            raise ConfigError(str(exc).replace("pipeline stages > ", "pipeline stages > "
                                               "stages[0].num_layers = ")) from None
        mbs, gbs = self.train.micro_batch_size, self.train.global_batch_size
        _check("train.global_batch_size", gbs % mbs == 0,
               f"{gbs} is not a multiple of micro_batch_size ({mbs})")
        try:
            if self.precision.fp8 is not None:
                fp8_support.check_shapes(self.model, self.precision.fp8_recipe,
                                         tensor_model_parallel_size=tp, micro_batch_size=mbs)
            fp8_support.check_storage_block(self.model, self.precision.fp8_frozen_block_size, tp)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Generic loading: dicts -> dataclasses with type checks and dotted paths


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to `tp`, raising ConfigError that names `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            _check(path, type(None) in args, "must not be null")
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1:  # a list or a mapping picks the one option of that shape
            shaped = [a for a in options if (typing.get_origin(a) is tuple
                                             if isinstance(value, list)
                                             else dataclasses.is_dataclass(a)
                                             if isinstance(value, Mapping) else False)]
            options = shaped if len(shaped) == 1 else options
        if len(options) == 1:
            return _convert(value, options[0], path)
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[1])
        kinds = [e.rsplit(", got ", 1)[0] for e in errors if e.startswith("must be")]
        if len(kinds) == len(errors):
            _fail(path, f"{' or '.join(kinds)}, got {value!r}")
        _fail(path, next(e for e in errors if not e.startswith("must be")))
    if origin is Literal:
        _check(path, value in args, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        _check(path, isinstance(value, Sequence) and not isinstance(value, str | bytes),
               f"must be a list, got {value!r}")
        item_type = args[0]
        return tuple(_convert(v, item_type, _path(path, i)) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        _check(path, isinstance(value, bool), f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(path, isinstance(value, int) and not isinstance(value, bool),
               f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(path, isinstance(value, int | float) and not isinstance(value, bool),
               f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(path, isinstance(value, str), f"must be a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported field type {_type_name(tp)}")  # internal error


def _build(cls: type, data: Any, path: str) -> Any:
    _check(path, isinstance(data, Mapping), f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _fail(_path(path, str(unknown[0])),
              f"unknown key; valid keys are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _path(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(_path(path, name), "required field is missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def load_model_config(data: Mapping[str, Any], path: str = "model") -> ModelConfig:
    """Build a ModelConfig from `{preset: NAME, **overrides}` or from explicit dimensions."""
    _check(path, isinstance(data, Mapping), f"must be a mapping, got {data!r}")
    data = dict(data)
    preset = data.pop("preset", None)
    if preset is not None:
        _check(_path(path, "preset"), preset in MODEL_PRESETS,
               f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
        data = {**dataclasses.asdict(MODEL_PRESETS[preset]), **data}
    return _build(ModelConfig, data, path)


def _resolve_stages(value: Any, base_dir: Path | None) -> Any:
    """`stages:` may be a path to a plan file written by tools/plan_stages.py --write-plan."""
    if not isinstance(value, str):
        return value
    plan_path = Path(value)
    if not plan_path.is_absolute() and base_dir is not None:
        plan_path = base_dir / plan_path
    if not plan_path.is_file():
        _fail("stages", f"plan file {str(plan_path)!r} does not exist")
    plan = yaml.safe_load(plan_path.read_text())
    _check("stages", isinstance(plan, Mapping) and "stages" in plan,
           f"plan file {str(plan_path)!r} has no top-level 'stages' list")
    return plan["stages"]


def config_from_dict(data: Mapping[str, Any], base_dir: Path | None = None) -> RunConfig:
    """Validate a plain dict (e.g. parsed YAML) into a RunConfig."""
    _check(ROOT_NAME, isinstance(data, Mapping), f"must be a mapping, got {type(data).__name__}")
    data = dict(data)
    _check("model", "model" in data, "required field is missing")
    model = load_model_config(data.pop("model"))
    if "stages" in data:
        data["stages"] = _resolve_stages(data["stages"], base_dir)
    return _build(RunConfig, {**data, "model": dataclasses.asdict(model)}, ROOT_NAME)


def _parse_override(item: str) -> tuple[list[str | int], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.seed=3)")
    key, raw = item.split("=", 1)
    parts: list[str | int] = []
    for token in key.strip().split("."):
        name, _, rest = token.partition("[")
        if name:
            parts.append(name)
        while rest:
            index, _, rest = rest.partition("]")
            if not index.isdigit():
                raise ConfigError(f"--set {item!r}: bad index in {key!r}")
            parts.append(int(index))
            rest = rest.lstrip("[")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b[1].c=value` overrides to a raw config dict (values parsed as YAML scalars)."""
    for item in overrides:
        parts, value = _parse_override(item)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(f"--set {item!r}: index {part} out of range")
            elif not isinstance(node.get(part), dict | list):
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(last, int) and (not isinstance(node, list) or last >= len(node)):
            raise ConfigError(f"--set {item!r}: index {last} out of range")
        node[last] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides, validate everything once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    return config_from_dict(apply_overrides(data, overrides), base_dir=path.parent)


def config_to_dict(config: Any) -> Any:
    """Plain YAML-able dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name))
                for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [config_to_dict(v) for v in config]
    return config


def dump_config(config: RunConfig) -> str:
    """YAML text that `load_config` reads back to an equal RunConfig."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
