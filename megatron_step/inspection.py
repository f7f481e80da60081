"""Checkpoint inspection: what a megatron_step checkpoint holds, and whether all of it is there.

A checkpoint directory (see `checkpoint.py`) is complete when
- `megatron_step.json` (our metadata) parses and describes the model,
- `metadata.json` names the `torch_dist` backend, `common.pt` unpickles,
- `.metadata` (torch.distributed.checkpoint's index) unpickles, and every `__<rank>_<n>.distcp`
  file it references exists and is long enough for the byte ranges it lists,
- every tensor the model needs is indexed with the right shape: the tensors of
  `model_tensor_shapes(model config, adapters)`, plus optimizer state when `has_optimizer`.

These checks read only metadata (cheap even for a 7B checkpoint). The deep check additionally
reads every tensor (needs a process group, e.g. `parallel.local_world()`) and rejects
unreadable or non-finite data. Each problem names the file or tensor at fault, so a user can
tell a crashed save (no metadata file) from a lost shard or a truncated copy.

The description (`describe_checkpoint`) is plain JSON-able data: stage, steps, model config,
layer provenance (born in which stage, from which source, trainable or frozen in the saved
stage), adapters, the layout saved and tensor shapes from the index, never from tensor data.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from megatron_step.checkpoint import (
    META_FILE,
    CheckpointError,
    load_full_tensors,
    model_config_from_meta,
    read_meta,
)
from megatron_step.config import ModelConfig
from megatron_step.growth import split_layer_key

TensorSpec = tuple[tuple[int, ...], torch.dtype]
"""A tensor's full (unsharded) shape and dtype, as the torch_dist index records them."""

INDEX_FILE = ".metadata"
BACKEND_FILE = "metadata.json"
COMMON_FILE = "common.pt"
# Base linears of one layer: (checkpoint suffix, (out features, in features)) by ModelConfig.
_LINEARS = {
    "linear_qkv": ("self_attention.linear_qkv",
                   lambda m: ((m.num_attention_heads + 2 * m.query_groups) * m.head_dim,
                              m.hidden_size)),
    "linear_proj": ("self_attention.linear_proj",
                    lambda m: (m.hidden_size, m.num_attention_heads * m.head_dim)),
    "linear_fc1": ("mlp.linear_fc1", lambda m: (2 * m.ffn_hidden_size, m.hidden_size)),
    "linear_fc2": ("mlp.linear_fc2", lambda m: (m.hidden_size, m.ffn_hidden_size)),
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a checkpoint is incomplete or corrupt; `item` is the file or tensor."""

    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


def model_tensor_shapes(model: ModelConfig,
                        adapters: Mapping[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Every model tensor a checkpoint of `model` holds (full shapes, checkpoint keys).

    With `adapters` ({"rank", "targets", "layers", ...}), the unmerged LoRA tensors too:
    `<linear>.lora_a.weight` [rank, in] and `<linear>.lora_b.weight` [out, rank].
    """
    hidden, vocab = model.hidden_size, model.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (vocab, hidden)}
    for layer in range(model.num_layers):
        prefix = f"decoder.layers.{layer}."
        shapes[prefix + "self_attention.linear_qkv.layer_norm_weight"] = (hidden,)
        shapes[prefix + "mlp.linear_fc1.layer_norm_weight"] = (hidden,)
        for path, size in _LINEARS.values():
            shapes[f"{prefix}{path}.weight"] = size(model)
    shapes["decoder.final_layernorm.weight"] = (hidden,)
    if model.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (vocab, hidden)
    if adapters:
        rank = adapters["rank"]
        for layer in adapters["layers"]:
            for target in adapters["targets"]:
                path, size = _LINEARS[target]
                out_features, in_features = size(model)
                key = f"decoder.layers.{layer}.{path}"
                shapes[f"{key}.lora_a.weight"] = (rank, in_features)
                shapes[f"{key}.lora_b.weight"] = (out_features, rank)
    return shapes


def _model_tensors(index: Metadata) -> dict[str, TensorSpec]:
    """The index's model tensors (optimizer state excluded): key -> (full shape, dtype)."""
    return {key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in index.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata) and not key.startswith("optimizer.")}


def indexed_tensors(path: str | Path) -> dict[str, TensorSpec]:
    """Model tensors a checkpoint's torch_dist index lists, with full shapes and dtypes.

    Reads only the index; call `verify_checkpoint` first to know the files behind it exist.
    """
    return _model_tensors(FileSystemReader(str(path)).read_metadata())


# ---------------------------------------------------------------------------------------------
# Load-free checks


def _read_index(path: Path, problems: list[Problem]) -> Metadata | None:
    """torch_dist's `.metadata`, or None with the problem recorded."""
    if not (path / INDEX_FILE).is_file():
        problems.append(Problem(INDEX_FILE, "missing (the tensor index of torch_dist)"))
        return None
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt index
        problems.append(Problem(INDEX_FILE, f"unreadable, truncated or corrupt "
                                            f"({type(exc).__name__}: {exc})"))
        return None


def _check_backend_files(path: Path, problems: list[Problem]) -> None:
    backend = path / BACKEND_FILE
    if not backend.is_file():
        problems.append(Problem(BACKEND_FILE, "missing (names the checkpoint backend)"))
    else:
        try:
            name = json.loads(backend.read_text()).get("sharded_backend")
        except (json.JSONDecodeError, AttributeError) as exc:
            problems.append(Problem(BACKEND_FILE, f"unreadable ({exc})"))
        else:
            if name != "torch_dist":
                problems.append(Problem(BACKEND_FILE, f"backend {name!r} is not torch_dist"))
    if not (path / COMMON_FILE).is_file():
        problems.append(Problem(COMMON_FILE, "missing (holds the non-tensor state)"))
        return
    try:
        with warnings.catch_warnings():  # torch warns about the protocol of garbage pickles
            warnings.simplefilter("ignore")
            torch.load(path / COMMON_FILE, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        problems.append(Problem(COMMON_FILE, f"unreadable ({type(exc).__name__}: {exc})"))


def _check_storage(path: Path, index: Metadata, problems: list[Problem]) -> None:
    """Each `.distcp` file the index references exists and covers the byte ranges listed."""
    needed: dict[str, int] = {}
    first_item: dict[str, str] = {}
    count: dict[str, int] = {}
    for item, info in index.storage_data.items():
        name = info.relative_path
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
        first_item.setdefault(name, item.fqn)
        count[name] = count.get(name, 0) + 1
    for name in sorted(needed):
        file = path / name
        if not file.is_file():
            problems.append(Problem(name, f"missing (holds {count[name]} items, e.g. "
                                          f"{first_item[name]})"))
        elif file.stat().st_size < needed[name]:
            problems.append(Problem(name, f"truncated ({file.stat().st_size} bytes, the index "
                                          f"needs {needed[name]})"))


def _check_tensors(meta: Mapping[str, Any], model: ModelConfig, index: Metadata,
                   problems: list[Problem]) -> None:
    indexed = index.state_dict_metadata
    for key, shape in model_tensor_shapes(model, meta.get("adapters")).items():
        entry = indexed.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            problems.append(Problem(f"tensor {key}", "missing from the index"))
        elif tuple(entry.size) != shape:
            problems.append(Problem(f"tensor {key}", f"shape {list(entry.size)}, the model "
                                                     f"needs {list(shape)}"))
    if meta.get("has_optimizer") and not any(k.startswith("optimizer.") for k in indexed):
        problems.append(Problem("optimizer state", "missing though has_optimizer is true"))


def _meta_and_model(path: Path, problems: list[Problem]
                    ) -> tuple[dict[str, Any] | None, ModelConfig | None]:
    if not (path / META_FILE).is_file():
        problems.append(Problem(META_FILE, "missing (the save did not finish, or this is not a "
                                           "megatron_step checkpoint)"))
        return None, None
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        problems.append(Problem(META_FILE, f"unreadable ({exc})"))
        return None, None
    try:
        model = model_config_from_meta(meta)
    except (CheckpointError, ValueError) as exc:
        problems.append(Problem(META_FILE, f"no valid model description: {exc}"))
        return meta, None
    layers = meta.get("layers")
    if layers is not None and len(layers) != model.num_layers:
        problems.append(Problem(META_FILE, f"'layers' lists {len(layers)} layers, the "
                                           f"checkpoint has {model.num_layers}"))
    return meta, model


def _scan(path: Path, deep: bool) -> tuple[dict[str, Any] | None, Metadata | None,
                                          list[Problem]]:
    """(metadata, tensor index, problems): every check, each skipped only where what it reads
    is already reported missing; the deep check runs only on an otherwise complete checkpoint
    (needs a process group: `parallel.local_world()`)."""
    problems: list[Problem] = []
    if not path.is_dir():
        return None, None, [Problem(str(path), "does not exist or is not a directory")]
    meta, model = _meta_and_model(path, problems)
    _check_backend_files(path, problems)
    index = _read_index(path, problems)
    if index is not None:
        _check_storage(path, index, problems)
        if meta is not None and model is not None:
            _check_tensors(meta, model, index, problems)
    if deep and not problems:
        problems.extend(_deep_check(path))
    return meta, index, problems


def _deep_check(path: Path) -> list[Problem]:
    """Read every tensor; report unreadable data and non-finite values."""
    try:
        tensors = load_full_tensors(path)
    except Exception as exc:  # noqa: BLE001 - the loader's error says what failed
        return [Problem("tensor data", f"cannot be read ({type(exc).__name__}: {exc})")]
    return [Problem(f"tensor {key}", "holds NaN or infinite values")
            for key, tensor in tensors.items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint that passes the load-free checks (module docstring).

    Raises:
        CheckpointError: the checkpoint is incomplete or corrupt; the message lists every
            problem, each naming its file or tensor.
    """
    meta, _, problems = _scan(Path(path), deep=False)
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete or corrupt: "
                              + "; ".join(map(str, problems)))
    assert meta is not None  # no problems implies the metadata was read
    return meta


# ---------------------------------------------------------------------------------------------
# Description


def _layer_rows(meta: Mapping[str, Any], num_layers: int) -> list[dict[str, Any]]:
    """Provenance and training status of each layer in the saved stage."""
    stage = meta.get("stage", 1)
    adapters = meta.get("adapters") or {}
    adapted = set(adapters.get("layers", ()))
    rows = []
    for layer, origin in enumerate(meta.get("layers") or [{}] * num_layers):
        born = origin.get("born_stage")
        trainable = born is None or born >= stage
        rows.append({"layer": layer, "born_stage": born, "source": origin.get("source"),
                     "trainable": trainable, "adapters": layer in adapted})
    return rows


def describe_checkpoint(path: str | Path, deep: bool = False) -> dict[str, Any]:
    """JSON-able description of a checkpoint, complete or not (see the module docstring)."""
    meta, index, problems = _scan(Path(path), deep)
    meta = meta or {}
    tensors: dict[str, dict[str, Any]] = {}
    optimizer_items = 0
    if index is not None:
        tensors = {key: {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
                   for key, (shape, dtype) in _model_tensors(index).items()}
        optimizer_items = sum(key.startswith("optimizer.") for key in index.state_dict_metadata)
    num_layers = meta.get("num_layers")
    return {
        "path": str(path),
        "complete": not problems,
        "problems": [str(p) for p in problems],
        **{key: meta.get(key) for key in ("kind", "stage", "stage_step", "global_step",
                                          "consumed_samples", "precision", "has_optimizer",
                                          "layout", "adapters", "num_layers", "model",
                                          "format_version")},
        "layers": _layer_rows(meta, num_layers) if num_layers else [],
        "parameters": sum(math.prod(t["shape"]) for t in tensors.values()),
        "tensors": tensors,
        "optimizer_items": optimizer_items,
    }


def _group_tensors(tensors: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(name, "shape dtype") rows in index order, per-layer keys folded: decoder.layers.{0-5}.x
    (listed where the tensor first appears)."""
    rows: dict[tuple[str, str], list[int] | None] = {}
    for key, info in tensors.items():
        text = f"{info['shape']} {info['dtype']}"
        parsed = split_layer_key(key)
        if parsed is None:
            rows[(key, text)] = None
        else:
            rows.setdefault((parsed[1], text), []).append(parsed[0])
    out = []
    for (name, text), layers in rows.items():
        if layers is not None:
            layers.sort()
            span = (f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0],
                                                                         layers[-1] + 1))
                    else ",".join(map(str, layers)))
            name = f"decoder.layers.{{{span}}}.{name}"
        out.append((name, text))
    return out


def format_description(desc: Mapping[str, Any]) -> str:
    """Human-readable text of `describe_checkpoint`'s result."""
    lines = [f"checkpoint   {desc['path']}"]
    if desc["complete"]:
        lines.append("status       complete")
    else:
        lines.append("status       INCOMPLETE OR CORRUPT")
        lines += [f"  - {problem}" for problem in desc["problems"]]
    if desc["kind"] is not None or desc["stage"] is not None:
        lines.append(f"kind         {desc['kind']}, stage {desc['stage']}, stage step "
                     f"{desc['stage_step']}, global step {desc['global_step']}, consumed "
                     f"samples {desc['consumed_samples']}")
    model = desc["model"]
    if model:
        groups = model.get("num_query_groups") or model["num_attention_heads"]
        lines.append(f"model        {desc['num_layers']} layers (target {model['num_layers']}), "
                     f"hidden {model['hidden_size']}, heads {model['num_attention_heads']} "
                     f"({groups} query groups), ffn {model['ffn_hidden_size']}, vocab "
                     f"{model['vocab_size']}, seq {model['seq_length']}, rope base "
                     f"{model['rotary_base']}, eps {model['norm_epsilon']}")
    lines.append(f"parameters   {desc['parameters']:,} (model tensors in the index); optimizer "
                 f"state {'yes' if desc['has_optimizer'] else 'no'}; precision "
                 f"{desc['precision']}")
    layout = desc["layout"]
    if layout:
        lines.append(f"layout saved TP={layout['tensor_model_parallel_size']} "
                     f"PP={layout['pipeline_model_parallel_size']} "
                     f"(world {layout['world_size']}); loads at any TP/PP")
    adapters = desc["adapters"]
    lines.append("adapters     none (merged or never attached)" if not adapters else
                 f"adapters     LoRA rank {adapters['rank']}, alpha {adapters['alpha']}, on "
                 f"{', '.join(adapters['targets'])}, layers {adapters['layers']} (unmerged)")
    if desc["layers"]:
        stage = desc["stage"] or 1
        depth, target = len(desc["layers"]), (model or {}).get("num_layers", 0)
        lines.append(f"layers       (a next stage freezes all {depth} and adapts them with LoRA)"
                     if depth < target else "layers       (the target depth is reached)")
        lines.append(f"  {'layer':>5}  {'born':>4}  {'source':<12} in stage {stage}")
        for row in desc["layers"]:
            status = "trainable" if row["trainable"] else "frozen"
            if row["adapters"]:
                status += " + LoRA"
            lines.append(f"  {row['layer']:>5}  {row['born_stage'] or '?':>4}  "
                         f"{row['source'] or '?':<12} {status}")
    rows = _group_tensors(desc["tensors"])
    if rows:
        lines.append("tensors")
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {text}" for name, text in rows]
    if desc["optimizer_items"]:
        lines.append(f"  (+ {desc['optimizer_items']} optimizer state items)")
    return "\n".join(lines)
