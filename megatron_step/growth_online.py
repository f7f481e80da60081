"""Online growth: turn this rank's live stage-i model into its stage-(i+1) model, in memory.

At a stage boundary every rank holds its TP/PP shard of the trained model. `grow_model` builds the
deeper model at the same TP and PP sizes (`model.build_model`; the pipeline split changes with the
depth, see layout.pipeline_split) and fills it, without restarting processes or touching disk:

- non-layer parameters stay where they are: the embedding on the first pipeline rank, the final
  norm and output layer on the last (pipeline ranks keep their roles);
- an old layer a pipeline rank needs (to move, copy or average) but does not hold comes from the
  rank that holds it, by point-to-point send within the pipeline group. Sender and receiver have
  the same TP rank (and DP rank), so the local shards have the same shapes on both;
- moved, copied and mean layers are computed on the local shards with growth.py's element-wise
  rules; a random layer is drawn as full tensors (growth.random_tensor) and each rank keeps its
  shard, located through the model's own sharded_state_dict (ShardedTensor offsets, and the
  SwiGLU fc1 factory that splits gate and up rows), never by hand-slicing.

Hence the weights are bit-identical to offline growth (growth_offline.py) of a checkpoint of the
same model with the same settings. Adapters must be merged by the caller (lora.merge_adapters;
unmerged ones are an error): only the base weights, the parameters of a plain layer, are carried.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.models.gpt import GPTModel

from megatron_step import collectives
from megatron_step.checkpoint import SHARDED_METADATA
from megatron_step.config import GrowthConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_step.growth import (
    LayerSource,
    derived_layer,
    grow_provenance,
    layer_map,
    random_tensor,
    split_layer_key,
    zero_output_,
)
from megatron_step.layout import pipeline_offsets
from megatron_step.lora import adapted_modules
from megatron_step.model import build_model, layer_offset

LAYERS_PREFIX = "decoder.layers."


def layer_transfers(sources: Sequence[LayerSource], old_depth: int,
                    pipeline_size: int) -> list[tuple[int, int, int]]:
    """Old layers that must move between pipeline ranks for a layer map.

    Returns:
        (old layer, pipeline rank holding it, pipeline rank needing it) for every old layer a
        rank of the grown model reads but the old split did not give it; sorted, so that all
        ranks walk the list in the same order (blocking send/recv pairs cannot deadlock).
    """
    old_offsets = pipeline_offsets(old_depth, pipeline_size)
    new_offsets = pipeline_offsets(len(sources), pipeline_size) + [len(sources)]
    transfers = set()
    for dst in range(pipeline_size):
        for index in range(new_offsets[dst], new_offsets[dst + 1]):
            for old in sources[index].old:
                src = bisect.bisect_right(old_offsets, old) - 1
                if src != dst:
                    transfers.add((old, src, dst))
    return sorted(transfers)


def _local_layers(module: GPTModel, names: Sequence[str]) -> dict[int, dict[str, torch.Tensor]]:
    """{global layer index: {parameter name: local shard}} of a chunk, restricted to `names`."""
    offset = layer_offset(module)
    layers = {}
    for k, layer in enumerate(module.decoder.layers):
        params = dict(layer.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"grow_model: old layer {offset + k} lacks parameters {missing}")
        layers[offset + k] = {n: params[n].detach() for n in names}
    return layers


def _exchange_old_layers(old: GPTModel, sources: Sequence[LayerSource],
                         templates: Mapping[str, torch.Tensor]
                         ) -> dict[int, dict[str, torch.Tensor]]:
    """This rank's old layers plus the ones it needs from other pipeline ranks."""
    layers = _local_layers(old, list(templates))
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pipeline_size == 1:
        return layers
    me = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    for index, src, dst in layer_transfers(sources, old.config.num_layers, pipeline_size):
        if me == src:
            for tensor in layers[index].values():
                collectives.send(tensor, dist.get_global_rank(group, dst), group)
        elif me == dst:
            layers[index] = {name: collectives.recv(template, dist.get_global_rank(group, src),
                                                    group)
                             for name, template in templates.items()}
    return layers


def _local_shard(entry: Any, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full checkpoint tensor, placed by a sharded_state_dict entry."""
    local = torch.empty_like(entry.data)
    entry = dataclasses.replace(entry, data=local)
    leaves = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
    assert sum(leaf.data.numel() for leaf in leaves) == local.numel(), entry.key
    for leaf in leaves:
        leaf.data.copy_(full[leaf.global_slice()])
    return local


def _random_layer(sharded: Mapping[str, Any], local_index: int, index: int, model: ModelConfig,
                  num_layers: int, growth: GrowthConfig, stage: int) -> dict[str, torch.Tensor]:
    """Local shards of random layer `index` (local position `local_index` on this rank)."""
    prefix = f"{LAYERS_PREFIX}{local_index}."
    layer = {}
    for key, entry in sharded.items():
        if not key.startswith(prefix) or key.endswith("._extra_state"):
            continue
        global_index, name = split_layer_key(entry.key)
        assert global_index == index, (entry.key, index)
        full = random_tensor(name, _global_shape(entry), entry.data.dtype,
                             init_method_std=model.init_method_std, num_layers=num_layers,
                             seed=growth.seed, stage=stage, index=index)
        layer[key.removeprefix(prefix)] = _local_shard(entry, full)
    return layer


def _global_shape(entry: Any) -> tuple[int, ...]:
    """Full tensor shape of a sharded_state_dict entry (a factory builds its leaves for it)."""
    leaf = entry.build()[0] if isinstance(entry, ShardedTensorFactory) else entry
    return tuple(leaf.global_shape)


def _has_extra_state(module: torch.nn.Module) -> bool:
    return type(module).get_extra_state is not torch.nn.Module.get_extra_state


def _scaling_states(old: GPTModel) -> dict[int, dict[str, Any]]:
    """TE FP8 scaling state (`_extra_state`) of every old layer, by global index, on all ranks.

    Only modules that hold one (TE linears after an FP8 forward); Megatron's local linears
    return None. The states are small pickled tensors, gathered over the pipeline group.
    """
    offset = layer_offset(old)
    local = {}
    for k, layer in enumerate(old.decoder.layers):
        states = {name: module.get_extra_state() for name, module in layer.named_modules()
                  if _has_extra_state(module)}
        states = {name: state for name, state in states.items() if state is not None
                  and not (isinstance(state, torch.Tensor) and state.numel() == 0)}
        if states:
            local[offset + k] = states
    merged: dict[int, dict[str, Any]] = {}
    for part in collectives.all_gather_object(
            local, parallel_state.get_pipeline_model_parallel_group()):
        merged.update(part)
    return merged


def _carry_scaling_states(new: GPTModel, sources: Sequence[LayerSource],
                          states: Mapping[int, Mapping[str, Any]]) -> None:
    """Give each grown layer the FP8 scaling history of the old layer it comes from.

    Without it every layer of the grown model starts FP8 delayed scaling from scale 1 and an
    empty amax history, like step 1 of a fresh run: small weights flush to zero and gradients
    underflow in the first micro-batch after growth. A moved layer keeps its own history; a
    copy or mean layer takes its (first) source's, the closest estimate of its ranges; a random
    layer starts fresh.
    """
    offset = layer_offset(new)
    for k, layer in enumerate(new.decoder.layers):
        source = sources[offset + k]
        state = states.get(source.old[0]) if source.old else None
        for name, value in (state or {}).items():
            layer.get_submodule(name).set_extra_state(value)


@torch.no_grad()
def grow_model(chunks: Sequence[GPTModel], provenance: Sequence[Mapping[str, Any]],
               model: ModelConfig, num_layers: int, growth: GrowthConfig,
               parallel: ParallelConfig, precision: PrecisionConfig,
               stage: int) -> tuple[list[GPTModel], list[dict[str, Any]]]:
    """Build and fill this rank's chunk of the grown model from its live old chunk.

    Collective over the pipeline group (every rank calls it). Megatron's parallel state must be
    the one the old model was built under; TP and PP sizes do not change.

    Args:
        chunks: this rank's unwrapped old GPTModel (one chunk), adapters already merged.
        provenance: the old model's layer provenance (growth.provenance_from_meta).
        model: the model description the old model was built from.
        num_layers: depth of the grown model (>= the old depth).
        growth: operator, position, zero_output and seed.
        parallel, precision: as the old model was built with.
        stage: the stage the grown model trains in (new layers are born in it).

    Returns:
        ([new chunk], provenance of the grown model). The caller drops its references to the
        old chunk (and its DDP wrapper and optimizer) to free their memory.

    Raises:
        ValueError: several chunks, unmerged adapters, a provenance of the wrong length, a
            smaller depth.
    """
    if len(chunks) != 1:
        raise ValueError(f"grow_model: one model chunk per rank expected, got {len(chunks)}")
    old = chunks[0]
    scaling_states = _scaling_states(old)
    unmerged = [m.lora_state.name for m in adapted_modules(chunks) if not m.lora_state.merged]
    if unmerged:
        raise ValueError(f"grow_model: {len(unmerged)} LoRA adapters are not merged (e.g. "
                         f"{unmerged[0]}); call lora.merge_adapters(chunks) first")
    old_depth = old.config.num_layers
    if len(provenance) != old_depth:
        raise ValueError(f"grow_model: {len(provenance)} provenance entries for a "
                         f"{old_depth}-layer model")
    if num_layers < old_depth:
        raise ValueError(f"grow_model: cannot shrink a {old_depth}-layer model to {num_layers}")
    sources = layer_map(old_depth, num_layers - old_depth, growth)
    new_provenance = grow_provenance(provenance, sources, stage)
    # no initialisation: every parameter is written below (minutes saved at 7B)
    new = build_model(model, num_layers, parallel, precision, pre_process=old.pre_process,
                      post_process=old.post_process, initialize=False)

    old_params = dict(old.named_parameters())
    for name, param in new.named_parameters():
        if not name.startswith(LAYERS_PREFIX):
            param.copy_(old_params[name])

    templates = dict(new.decoder.layers[0].named_parameters())
    old_layers = _exchange_old_layers(old, sources, templates)
    offset = layer_offset(new)
    sharded = None
    for k, layer in enumerate(new.decoder.layers):
        source = sources[offset + k]
        if source.kind == "random":
            sharded = sharded or new.sharded_state_dict(metadata=dict(SHARDED_METADATA))
            tensors = _random_layer(sharded, k, offset + k, model, num_layers, growth, stage)
        else:
            tensors = derived_layer(source, old_layers)
        if source.is_new and growth.zero_output:
            zero_output_(tensors)
        for name, param in layer.named_parameters():
            param.copy_(tensors[name])
    _carry_scaling_states(new, sources, scaling_states)
    return [new], new_provenance
