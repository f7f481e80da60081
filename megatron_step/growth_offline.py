"""Offline growth: grow (or only re-shard) a distributed checkpoint into a new checkpoint.

SRC is a megatron_step checkpoint (torch_dist, per-layer keys, any TP/PP it was saved at). DST is
written as *full, unsharded tensors* (checkpoint.save_full_tensors): a layout-independent
checkpoint that dist_checkpointing re-shards on load to whatever TP/PP the receiving model has.
The target TP/PP given by the user is validated against the grown model and recorded in DST's
metadata (`target_layout`); it does not change the files. With no new layers the job is a pure
convert/re-shard (any source layout -> layout-independent). Optimizer state is not carried: a new
stage builds a new optimizer.

Flow (`prepare_growth` checks everything before anything is written, `run_growth` does it):
one round per grown layer and rank: load the full tensors of the old layers it reads
(dist_checkpointing load of full-tensor requests), merge adapters if asked, grow it with the
pure growth.grow_state_dict, keep it; finally every rank saves its share, DST appears atomically.
Under torchrun the grown layers are dealt round-robin over the ranks, so no process holds more
than its share of the model; the output is bit-identical to a one-process run.

Safety: SRC is only read; DST is written to a temporary directory and renamed; an existing DST is
refused without `overwrite` (and is never anything but a checkpoint); DST may not be SRC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from tqdm import tqdm

from megatron_step.checkpoint import (
    META_FILE,
    CheckpointError,
    save_full_tensors,
)
from megatron_step.config import GrowthConfig, ModelConfig, config_from_dict, load_model_config
from megatron_step.growth import (
    LayerSource,
    grow_provenance,
    grow_state_dict,
    is_adapter_key,
    layer_map,
    provenance_from_meta,
    split_layer_key,
)
from megatron_step.inspection import TensorSpec, indexed_tensors, verify_checkpoint
from megatron_step.layout import ParallelSizes, check_layout
from megatron_step.lora import merge_full_state_dict

_SAVE_TIME_META = ("format_version", "has_optimizer", "layout", "world_size")
"""SRC metadata keys that describe SRC's own save, not the model: DST gets fresh ones."""


class GrowthError(ValueError):
    """A growth request cannot be carried out; the message names the argument or file."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GrowthJob:
    """A checked offline growth: everything `run_growth` needs, nothing left to fail on input."""

    src: Path
    dst: Path
    src_meta: dict[str, Any]
    tensors: dict[str, TensorSpec]
    """SRC's model tensors (checkpoint key -> full shape, dtype), optimizer state excluded."""
    model: ModelConfig
    """The run's model from SRC's metadata (its `num_layers` is the run's final depth)."""
    old_num_layers: int
    sources: tuple[LayerSource, ...]
    growth: GrowthConfig
    stage: int
    provenance: tuple[dict[str, Any], ...]
    target: ParallelSizes
    merge_adapters: bool

    @property
    def num_layers(self) -> int:
        return len(self.sources)

    @property
    def adapters(self) -> dict[str, Any] | None:
        return self.src_meta.get("adapters")

    def dst_meta(self) -> dict[str, Any]:
        """DST metadata: SRC's run description with the grown model's depth and provenance."""
        meta = {k: v for k, v in self.src_meta.items() if k not in _SAVE_TIME_META}
        model = dataclasses.asdict(self.model)
        model["num_layers"] = max(model["num_layers"], self.num_layers)
        new = [i for i, s in enumerate(self.sources) if s.is_new]
        meta.update(
            model=model, num_layers=self.num_layers, layers=list(self.provenance),
            adapters=None, stage=self.stage, kind="grown",
            target_layout={"tensor_model_parallel_size": self.target.tensor_model_parallel_size,
                           "pipeline_model_parallel_size":
                               self.target.pipeline_model_parallel_size},
            growth={"source": str(self.src), "old_num_layers": self.old_num_layers,
                    "num_new_layers": len(new), "new_layers": new,
                    "operator": self.growth.operator, "zero_output": self.growth.zero_output,
                    "position": (list(self.growth.position)
                                 if isinstance(self.growth.position, tuple)
                                 else self.growth.position),
                    "seed": self.growth.seed, "merged_adapters": self.merge_adapters})
        if new:
            meta["stage_step"] = 0
        return meta


# ---------------------------------------------------------------------------------------------
# Checking SRC


def inspect_source(src: str | Path) -> tuple[dict[str, Any], dict[str, TensorSpec]]:
    """Metadata and model tensor specs of a checkpoint, after checking it is complete.

    Raises:
        CheckpointError: SRC missing, incomplete (names the file or tensor), not a megatron_step
            GPT checkpoint, or inconsistent with its own metadata (inspection.verify_checkpoint).
    """
    try:
        meta = verify_checkpoint(src)
    except CheckpointError as exc:
        raise CheckpointError(f"SRC: {exc}") from None
    return meta, indexed_tensors(src)


# ---------------------------------------------------------------------------------------------
# Planning


def stage_from_plan(plan: str | Path, stage: int, model: ModelConfig) -> tuple[int, GrowthConfig]:
    """Depth and growth settings of stage `stage` (1-based) of a plan file (`stages:` list).

    Raises:
        GrowthError / ConfigError: unreadable plan, invalid for the model, or no such stage.
    """
    config = config_from_dict({"out_dir": "grow_checkpoint", "model": dataclasses.asdict(model),
                               "stages": str(plan)})
    if not 2 <= stage <= len(config.stages):
        raise GrowthError(f"--stage: the plan has stages 1..{len(config.stages)} and stage 1 is "
                          f"trained from scratch; choose 2..{len(config.stages)}, got {stage}")
    chosen = config.stages[stage - 1]
    return chosen.num_layers, chosen.growth


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise GrowthError(f"DST {str(dst)!r}: must lie outside SRC (SRC is never modified)")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise GrowthError(f"DST {str(dst)!r} exists; pass --overwrite to replace it")
        if not (dst.is_dir() and (dst / META_FILE).is_file()):
            raise GrowthError(f"DST {str(dst)!r} exists and is not a megatron_step checkpoint; "
                              "refusing to replace it")


def _growth_settings(base: GrowthConfig, overrides: Mapping[str, Any]) -> GrowthConfig:
    """`base` with some fields replaced, validated like a config file's `growth:` section."""
    overrides = dict(overrides)
    if isinstance(overrides.get("position"), list):
        overrides["position"] = tuple(overrides["position"])
    try:
        growth = dataclasses.replace(base, **overrides)
    except TypeError as exc:
        raise GrowthError(f"growth: {exc}") from None
    growth.validate("growth")
    return growth


def prepare_growth(src: str | Path, dst: str | Path, *, num_layers: int | None = None,
                   num_new_layers: int | None = None, plan: str | Path | None = None,
                   stage: int | None = None, growth: Mapping[str, Any] | None = None,
                   tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   merge_adapters: bool = False, overwrite: bool = False) -> GrowthJob:
    """Check a growth request completely and resolve it into a job (reads metadata only).

    Args:
        src, dst: source checkpoint and destination directory.
        num_layers, num_new_layers, plan: the target depth, exactly one of: the grown depth,
            the layers to add (0: re-shard only), or a plan file whose stage `stage` gives it.
        stage: the stage the grown model trains in (1-based); default SRC's stage + 1 (SRC's
            stage when nothing grows). Required with `plan`.
        growth: GrowthConfig fields (operator, position, zero_output, seed) overriding the
            plan stage's growth settings, or the defaults without a plan.
        tensor_model_parallel_size, pipeline_model_parallel_size: the layout DST will be
            loaded at (checked against the grown model, recorded in the metadata).
        merge_adapters: fold SRC's unmerged LoRA adapters into the base weights.
        overwrite: replace an existing DST checkpoint.

    Raises:
        CheckpointError: SRC problems (see `inspect_source`).
        GrowthError: DST exists or is SRC, smaller depth, impossible layout, unmerged adapters,
            bad growth settings, plan or stage.
    """
    if sum(x is not None for x in (num_layers, num_new_layers, plan)) != 1:
        raise GrowthError("give exactly one of --num-layers, --num-new-layers and --plan")
    if plan is not None and stage is None:
        raise GrowthError("--plan: needs --stage (the plan stage to grow into)")
    src, dst = Path(src), Path(dst)
    meta, tensors = inspect_source(src)
    _check_destination(src, dst, overwrite)
    # the run's target model (inspect_source validated it); SRC's own depth if none is recorded
    model = load_model_config({"num_layers": meta["num_layers"], **meta["model"]})
    old_depth = meta["num_layers"]
    base = GrowthConfig()
    if plan is not None:
        num_layers, base = stage_from_plan(plan, stage, model)
    elif num_new_layers is not None:
        if num_new_layers < 0:
            raise GrowthError(f"--num-new-layers: must be >= 0, got {num_new_layers}")
        num_layers = old_depth + num_new_layers
    growth = _growth_settings(base, growth or {})
    adapter_keys = sorted(k for k in tensors if is_adapter_key(k))
    if (adapter_keys or meta.get("adapters")) and not merge_adapters:
        found = adapter_keys[0] if adapter_keys else f"metadata adapters={meta['adapters']}"
        raise GrowthError(f"SRC {str(src)!r} has unmerged LoRA adapters ({found}, ...); pass "
                          "--merge-adapters to fold them into the base weights "
                          "(W += alpha/rank * B @ A) before growing")
    adapters = meta.get("adapters") or {}
    adapted = sorted({split_layer_key(k)[0] for k in adapter_keys})
    if merge_adapters and adapter_keys and (not {"rank", "alpha"} <= set(adapters)
                                            or sorted(adapters.get("layers", adapted)) != adapted):
        raise GrowthError(f"SRC {str(src)!r}: {META_FILE} 'adapters' ({adapters or None}) does "
                          f"not describe the adapter tensors on layers {adapted}; cannot merge")
    if num_layers < old_depth:
        raise GrowthError(f"--num-layers: target depth {num_layers} is smaller than SRC's "
                          f"{old_depth} layers; growth never removes layers")
    sizes = ParallelSizes(tensor_model_parallel_size * pipeline_model_parallel_size,
                          tensor_model_parallel_size, pipeline_model_parallel_size)
    try:
        check_layout(model, num_layers, sizes)
    except ValueError as exc:
        raise GrowthError(f"--tp/--pp (the layout DST is for): {exc}") from None
    try:
        sources = layer_map(old_depth, num_layers - old_depth, growth)
        old_provenance = provenance_from_meta(meta, old_depth)
    except ValueError as exc:
        raise GrowthError(str(exc)) from None
    src_stage = meta.get("stage") or max(e["born_stage"] for e in old_provenance)
    if stage is None:
        stage = src_stage + 1 if num_layers > old_depth else src_stage
    try:
        provenance = grow_provenance(old_provenance, sources, stage)
    except ValueError as exc:
        raise GrowthError(f"--stage: {exc}") from None
    return GrowthJob(src=src, dst=dst, src_meta=meta, tensors=tensors, model=model,
                     old_num_layers=old_depth, sources=tuple(sources), growth=growth,
                     stage=stage, provenance=tuple(provenance), target=sizes,
                     merge_adapters=merge_adapters)


def describe_job(job: GrowthJob) -> str:
    """What the job will do, printed before it starts (and all `--dry-run` prints)."""
    meta = job.src_meta
    saved = meta.get("layout", {})
    growth = job.growth
    lines = [
        f"SRC {job.src}: {job.old_num_layers} layers, stage {meta.get('stage', '?')}, "
        f"kind {meta.get('kind', '?')}, saved at TP={saved.get('tensor_model_parallel_size', '?')}"
        f" PP={saved.get('pipeline_model_parallel_size', '?')}",
        f"DST {job.dst}: {job.num_layers} layers for stage {job.stage}, full (layout-independent)"
        f" tensors, to be loaded at TP={job.target.tensor_model_parallel_size} "
        f"PP={job.target.pipeline_model_parallel_size}",
        f"growth: operator {growth.operator}, position {growth.position}, zero_output "
        f"{growth.zero_output}, seed {growth.seed}",
        "adapters: " + ("merged into the base weights" if job.merge_adapters and job.adapters
                        else "none"),
        "layers of the grown model:",
    ]
    for index, (source, born) in enumerate(zip(job.sources, job.provenance, strict=True)):
        what = (f"old layer {source.old[0]}" if not source.is_new
                else f"NEW {source.describe()}" + (" + zero output" if growth.zero_output else ""))
        lines.append(f"  {index:4d} <- {what} (born in stage {born['born_stage']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running


def _load_full(src: Path, specs: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Full tensors of some keys (collective: every rank calls it, possibly with no keys)."""
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype),
                                                    replica_id=0)
               for key, (shape, dtype) in specs.items()}
    loaded = dist_checkpointing.load(request, str(src), validate_access_integrity=False)
    return {key: loaded[key] for key in specs}  # not the common (non-tensor) state


def _round_keys(job: GrowthJob, index: int, with_non_layer: bool) -> list[str]:
    """SRC keys the grown layer `index` reads (plus the non-layer tensors if asked)."""
    old = set(job.sources[index].old) if index < job.num_layers else set()
    keys = []
    for key in job.tensors:
        parsed = split_layer_key(key)
        if parsed is None:
            if with_non_layer:
                keys.append(key)
        elif parsed[0] in old:
            keys.append(key)
    return keys


def run_growth(job: GrowthJob, progress: bool = True) -> Path:
    """Grow SRC into DST (collective over the current world; see the module docstring).

    Returns:
        DST, complete (its metadata file written last, then renamed into place).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Random layers take shapes and dtypes from an old layer: layer 0's, as meta tensors.
    template = {}
    for key, (shape, dtype) in job.tensors.items():
        parsed = split_layer_key(key)
        if parsed and parsed[0] == 0 and not is_adapter_key(key):
            template[key] = torch.empty(shape, dtype=dtype, device="meta")
    grown: dict[str, torch.Tensor] = {}
    bar = tqdm(total=job.num_layers, desc="growing layers", unit="layer",
               disable=not progress or rank != 0)
    for first in range(0, job.num_layers, world):
        index = first + rank
        keys = _round_keys(job, index, with_non_layer=first == 0 and rank == 0)
        loaded = _load_full(job.src, {key: job.tensors[key] for key in keys})
        if job.merge_adapters and any(is_adapter_key(k) for k in loaded):
            # this round's adapted layers only; prepare_growth checked the metadata as a whole
            adapted = sorted({split_layer_key(k)[0] for k in loaded if is_adapter_key(k)})
            loaded = merge_full_state_dict(loaded, {**job.adapters, "layers": adapted})
        if index < job.num_layers:
            grown.update(grow_state_dict({**template, **loaded}, job.sources, job.model,
                                         job.growth, job.stage, layers=[index]))
        grown.update({k: v for k, v in loaded.items() if split_layer_key(k) is None})
        bar.update(min(world, job.num_layers - first))
    bar.close()
    return save_full_tensors(job.dst, grown, job.dst_meta(), split_over_ranks=True)
