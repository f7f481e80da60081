"""Checkpoints: Megatron distributed checkpoints (torch_dist) written atomically, plus run metadata.

A megatron_step checkpoint is a directory holding
- the model (and optionally optimizer) state saved by `megatron.core.dist_checkpointing` from
  `sharded_state_dict()`, in the *per-layer* format (`decoder.layers.<global index>.*` keys): layers
  differ once some carry adapters, and per-layer keys make depth growth a key remap. Loading
  re-shards to whatever TP/PP the receiving model has;
- `megatron_step.json`: what the trainer and the tools need to know without loading tensors (run
  config, stage, step, layer provenance, layout saved, adapters present, data position);
- `rank_state/<rank>.pt`: per-rank RNG states, for exact resumption on the same layout.

Metadata keys (all writers use these names):
- `format_version`, `has_optimizer`, `layout` ({tensor_model_parallel_size,
  pipeline_model_parallel_size, world_size} at save time), `world_size`: added by `save_checkpoint`;
- `model`: the target ModelConfig as a dict; `num_layers`: the depth of *this* checkpoint's model;
- `layers`: provenance, one {"born_stage": int, "source": str} per layer ("init", "old:3",
  "mean:2,3", "copy:1", "random"): a stage-i trainer freezes the layers born before stage i;
- `adapters`: null, or {"rank", "alpha", "targets", "layers"} when unmerged LoRA tensors are saved;
- `stage` (1-based), `stage_step`, `global_step`, `consumed_samples`, `kind` ("train", "grown",
  "final", "imported"), `precision` (params dtype), `run_config` (the resolved run config).

Writes go to a hidden sibling `.<name>.tmp` directory that is renamed into place only after every
rank finished and the metadata file is written, so a crash never leaves a directory that
`latest_checkpoint` would pick: a checkpoint is complete if and only if its metadata file exists.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_step import collectives
from megatron_step.config import ModelConfig, load_model_config
from megatron_step.optim import prepare_for_load
from megatron_step.parallel import local_world

META_FILE = "megatron_step.json"
FORMAT_VERSION = 1
# Per-layer keys (adapters on some layers need them) and the only DistributedOptimizer format that
# reshards over TP, PP and DP (megatron_notes.md 1.3 and 3.2). Always pass a copy: Megatron stores
# the current `dp_cp_group` into the metadata dict it is given, in place.
SHARDED_METADATA = {"non_homogeneous_layers": True,
                    "distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or not a megatron_step checkpoint."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def model_state_dict(chunks: Sequence[MegatronModule]) -> dict[str, Any]:
    """Sharded state dict of this rank's (unwrapped) model chunks, per-layer format."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=dict(SHARDED_METADATA))}
    return {f"model{i}": chunk.sharded_state_dict(metadata=dict(SHARDED_METADATA))
            for i, chunk in enumerate(chunks)}


def save_checkpoint(path: str | Path, chunks: Sequence[MegatronModule], meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    rank_state: dict[str, Any] | None = None) -> Path:
    """Save model (+ optimizer) state and metadata to `path`, atomically, from every rank.

    Collective: every rank calls it with its own chunks. An existing checkpoint at `path` is
    replaced only after the new one is complete.

    Args:
        path: final checkpoint directory (its parent must be on storage all ranks share).
        chunks: this rank's unwrapped model chunks (not the DDP wrappers).
        meta: JSON-able metadata (stage, step, provenance, ...) written by rank 0.
        optimizer: Megatron optimizer whose state to include.
        rank_state: per-rank picklable state (RNG states).
    """
    state = model_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"],
                                                          metadata=dict(SHARDED_METADATA))
    return _save_atomic(Path(path), state, {"has_optimizer": optimizer is not None, **meta},
                        rank_state)


def _save_atomic(path: Path, state: dict[str, Any], meta: dict[str, Any],
                 rank_state: dict[str, Any] | None) -> Path:
    """dist_checkpointing.save into `.<name>.tmp`, add metadata, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    collectives.barrier()
    dist_checkpointing.save(state, str(tmp), content_metadata=SHARDED_METADATA)
    if rank_state is not None:
        (tmp / "rank_state").mkdir(exist_ok=True)
        torch.save(rank_state, tmp / "rank_state" / f"{_rank():05d}.pt")
    collectives.barrier()
    if _rank() == 0:
        write_json_atomic(tmp / META_FILE, {"format_version": FORMAT_VERSION,
                                            "has_optimizer": False, **_saved_layout(), **meta})
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    collectives.barrier()
    return path


def load_full_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as one full (unsharded) tensor, keyed by checkpoint key.

    Works in a single process (`parallel.local_world()` makes a world of one if none exists;
    under torchrun it joins the launcher's world, so every rank must call it) whatever the TP/PP
    the checkpoint was saved at; optimizer state keys (`optimizer.*`) are left out. The whole
    model must fit in this process's memory.
    """
    path = Path(path)
    read_meta(path)
    with local_world():  # megatron's loader asks torch.distributed for the rank
        tensors = dist_checkpointing.load_plain_tensors(str(path))
    return {k: v for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


def save_full_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any], *, split_over_ranks: bool = False) -> Path:
    """Save full tensors (per-layer checkpoint keys) as a checkpoint any TP/PP can load.

    Collective over the current world, but only rank 0 writes tensors (replica 0); call it from
    a one-process world (`parallel.local_world()`) for small models. With `split_over_ranks`,
    each rank passes a disjoint share of the keys and writes its share itself (the parallel
    offline growth tool). Each `linear_*` module gets the empty `_extra_state` object Megatron's
    loader expects (its TE FP8 metadata slot).
    """
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    replica = 0 if split_over_ranks else _rank()
    state: dict[str, Any] = {}
    for key, tensor in tensors.items():
        state[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(),
                                                     replica_id=replica)
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2].startswith("linear_"):
            extra = f"{module}._extra_state"
            state[extra] = ShardedObject(extra, None, (1,), (0,), replica_id=replica)
    return _save_atomic(Path(path), state, meta, None)


def _saved_layout() -> dict[str, Any]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = pp = 1
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
    return {"world_size": world,
            "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                       "world_size": world}}


def model_config_from_meta(meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of the model stored in a checkpoint (its own depth, not the target's)."""
    try:
        return load_model_config({**meta["model"], "num_layers": meta["num_layers"]})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint metadata lacks the model description: {exc}") from exc


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint.

    Raises:
        CheckpointError: the directory or its metadata file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or not a megatron_step "
                              f"checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {META_FILE} is unreadable: "
                              f"{exc}") from exc
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r}: {META_FILE} has no format_version")
    return meta


def load_checkpoint(path: str | Path, chunks: Sequence[MegatronModule],
                    optimizer: torch.optim.Optimizer | None = None,
                    strict: bool = True) -> dict[str, Any]:
    """Load model (+ optimizer) state into this rank's chunks, re-sharding to their layout.

    Returns:
        The checkpoint metadata, plus `rank_state` when this rank's file exists and the world
        size is unchanged (RNG states only make sense for the same layout).

    Raises:
        CheckpointError: the checkpoint is incomplete, lacks requested optimizer state, or holds
            LoRA adapters the chunks do not have (they would be dropped silently otherwise).
    """
    path = Path(path)
    meta = read_meta(path)
    adapted = any(".lora_a." in name for chunk in chunks for name, _ in chunk.named_parameters())
    if meta.get("adapters") and not adapted:  # the load would silently drop the adapters
        raise CheckpointError(f"checkpoint {str(path)!r} holds unmerged LoRA adapters "
                              f"(layers {meta['adapters']['layers']}); attach them first "
                              "(lora.freeze_and_adapt with the same targets and rank), or merge "
                              "them offline (tools/grow_checkpoint.py --num-new-layers 0 "
                              "--merge-adapters)")
    state = model_state_dict(chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state")
        prepare_for_load(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=True,
                                                          metadata=dict(SHARDED_METADATA))
    loaded = dist_checkpointing.load(state, str(path))
    loaded.pop("content_metadata", None)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{index}"],
                              strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    rank_file = path / "rank_state" / f"{_rank():05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank_file.is_file() and meta.get("world_size", world) == world:
        meta["rank_state"] = torch.load(rank_file, weights_only=False)
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by the step counter in their metadata)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith(".") or not (child / META_FILE).is_file():
            continue
        try:
            meta = read_meta(child)
        except CheckpointError:
            continue
        found.append((meta.get("global_step", 0), child.name, child))
    return [entry[2] for entry in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None
