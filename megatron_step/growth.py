"""Depth growth: where each layer of a grown model comes from (pure layer maps).

STEP (Yano et al., NAACL 2025, section 2 and the growth ablation) grows a trained model by inserting
new transformer layers among the trained ones. A *layer map* is a list with one `LayerSource` per
layer of the grown model, saying whether that layer is an old layer (moved) or a new one, and how
the new one is initialised:

- `interpolation_mean` (the paper's "Interpolation-Mean"): the new layer is the element-wise mean
  of its two neighbouring old layers, every tensor including norms.
- `copy`: duplicate the old layer just below the new one (the one above for a slot at the bottom).
- `random`: fresh initialisation with the model's init method (Megatron's scaled output init).
- `stack` (G_stack, Du et al. 2024): append the old block again on top, layer 0 first, so
  n -> 2n repeats the whole model; ignores `position`.

Positions (where new layers go) are the *gaps* between adjacent old layers, gap j lying between
old layers j and j+1:

- `upper` (default, best in the paper's ablation): gaps from the top down, one new layer per gap,
  wrapping round to the top again when there are more new layers than gaps.
- `lower`: gaps from the bottom up. `intermediate`: gaps nearest the middle first.
- `random`: a seeded random order of the gaps.
- explicit indices: the positions of the new layers in the grown model.

A one-layer model has no gap; its new layers go on top and `interpolation_mean` degenerates to a
copy of the single layer. `zero_output` (LLaMA-Pro) is orthogonal: it zeroes the new layers'
`linear_proj` and `linear_fc2`, making any operator function preserving.

`grow_state_dict` applies a layer map to *full* (unsharded) tensors keyed by checkpoint key
(`decoder.layers.<i>.<tensor>`, see checkpoint.py). Invariants, shared with the online growth of
a live TP/PP-sharded model (growth_online.py), which must give bit-identical weights:
- old layers are moved unchanged (bit-identical); embeddings, final norm and output layer are
  carried unchanged;
- a mean is computed element-wise in fp32 and cast back (`mean_tensor`), so it is the same
  whether computed on full tensors or on TP shards;
- a random layer's tensors are drawn as *full* tensors from a generator seeded by (growth seed,
  stage, grown-layer index, tensor name) (`random_tensor`): independent of TP/PP, of the order
  of generation and of which process draws them; a sharded model takes its shard of them.
Layer provenance (`layers` in checkpoint metadata) records for each layer the stage it was born
in and where it came from, so a trainer knows which layers to freeze.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megatron_step.config import GrowthConfig, ModelConfig
from megatron_step.seeds import derive_seed

SourceKind = Literal["old", "mean", "copy", "random"]


@dataclass(frozen=True, slots=True)
class LayerSource:
    """Origin of one layer of a grown model.

    `old` holds the old layer indices read: `(j,)` for a moved or copied layer, `(j, j + 1)` for a
    mean, `()` for a random layer.
    """

    kind: SourceKind
    old: tuple[int, ...] = ()

    @property
    def is_new(self) -> bool:
        return self.kind != "old"

    def describe(self) -> str:
        """Provenance string: "old:3", "mean:2,3", "copy:1" or "random"."""
        if self.kind == "random":
            return "random"
        return f"{self.kind}:{','.join(map(str, self.old))}"


def _gap_order(old_depth: int, position: str, seed: int) -> list[int]:
    """Interior gaps (j between old layers j and j+1) in the order a position policy fills them."""
    gaps = list(range(old_depth - 1))
    if position == "upper":
        return gaps[::-1]
    if position == "lower":
        return gaps
    if position == "intermediate":
        middle = (old_depth - 2) / 2
        return sorted(gaps, key=lambda j: (abs(j - middle), -j))
    if position == "random":
        rng = random.Random(seed)
        rng.shuffle(gaps)
        return gaps
    raise ValueError(f"growth.position: unknown position {position!r}")


def new_layer_indices(old_depth: int, num_new: int, position: str | Sequence[int],
                      seed: int = 0) -> list[int]:
    """Indices (in the grown model) of the new layers for a position policy, sorted ascending.

    Raises:
        ValueError: naming `growth.position` for indices that do not fit the grown depth.
    """
    if old_depth < 1 or num_new < 0:
        raise ValueError(f"growth: need old depth >= 1 and new layers >= 0, got {old_depth}, "
                         f"{num_new}")
    new_depth = old_depth + num_new
    if not isinstance(position, str):
        indices = sorted(int(i) for i in position)
        if len(indices) != num_new or len(set(indices)) != num_new:
            raise ValueError(f"growth.position: {num_new} distinct indices needed, got "
                             f"{list(position)}")
        if indices and (indices[0] < 0 or indices[-1] >= new_depth):
            raise ValueError(f"growth.position: indices must lie in [0, {new_depth}), got "
                             f"{list(position)}")
        return indices
    order = _gap_order(old_depth, position, seed)
    # new layers per gap; gap `old_depth - 1` (on top) only when there is no interior gap
    per_gap = [0] * old_depth
    for i in range(num_new):
        per_gap[order[i % len(order)] if order else old_depth - 1] += 1
    indices, cursor = [], 0
    for j in range(old_depth):
        cursor += 1  # old layer j
        indices.extend(range(cursor, cursor + per_gap[j]))
        cursor += per_gap[j]
    return indices


def layer_map(old_depth: int, num_new: int,
              growth: GrowthConfig | None = None) -> list[LayerSource]:
    """Sources of every layer of the grown model (old depth + num_new layers).

    Args:
        old_depth: layers of the trained model.
        num_new: layers to insert (0 gives the identity map).
        growth: operator, position and seed; the default is interpolation_mean at `upper`.

    Returns:
        One LayerSource per grown layer, bottom to top; the old layers appear in order.
    """
    growth = growth or GrowthConfig()
    new_depth = old_depth + num_new
    if growth.operator == "stack":
        if growth.position != "upper":
            raise ValueError("growth.position: the stack operator always appends on top; "
                             f"leave position at 'upper', got {growth.position!r}")
        if old_depth < 1 or num_new < 0:
            raise ValueError(f"growth: need old depth >= 1 and new layers >= 0, got "
                             f"{old_depth}, {num_new}")
        return ([LayerSource("old", (j,)) for j in range(old_depth)]
                + [LayerSource("copy", (i % old_depth,)) for i in range(num_new)])
    new = set(new_layer_indices(old_depth, num_new, growth.position, growth.seed))
    sources: list[LayerSource] = []
    below = -1  # the old layer most recently placed
    for index in range(new_depth):
        if index not in new:
            below += 1
            sources.append(LayerSource("old", (below,)))
            continue
        lower = below if below >= 0 else 0
        upper = min(below + 1, old_depth - 1)
        if growth.operator == "random":
            sources.append(LayerSource("random"))
        elif growth.operator == "copy":
            sources.append(LayerSource("copy", (lower,)))
        elif lower == upper:  # no neighbour on one side: mean of one layer is a copy
            sources.append(LayerSource("copy", (lower,)))
        else:
            sources.append(LayerSource("mean", (lower, upper)))
    return sources


# ---------------------------------------------------------------------------------------------
# Provenance: which stage each layer was born in (checkpoint metadata key `layers`)


def default_provenance(num_layers: int) -> list[dict[str, Any]]:
    """Provenance of a model trained from scratch: every layer born in stage 1."""
    return [{"born_stage": 1, "source": "init"} for _ in range(num_layers)]


def provenance_from_meta(meta: Mapping[str, Any], num_layers: int) -> list[dict[str, Any]]:
    """The `layers` list of checkpoint metadata, checked against the checkpoint's depth.

    A checkpoint without it (a stage-1 or foreign checkpoint) counts as trained from scratch.

    Raises:
        ValueError: the list does not have one {"born_stage", "source"} entry per layer.
    """
    layers = meta.get("layers")
    if layers is None:
        return default_provenance(num_layers)
    if (not isinstance(layers, list) or len(layers) != num_layers
            or not all(isinstance(e, dict) and isinstance(e.get("born_stage"), int)
                       for e in layers)):
        raise ValueError(f"checkpoint metadata 'layers': expected {num_layers} entries "
                         f"{{born_stage, source}}, got {layers!r}")
    return [dict(entry) for entry in layers]


def grow_provenance(old: Sequence[Mapping[str, Any]], sources: Sequence[LayerSource],
                    stage: int) -> list[dict[str, Any]]:
    """Provenance after growth: old layers keep theirs, new ones are born in `stage`.

    Raises:
        ValueError: `stage` is not later than every old layer's birth stage.
    """
    born = max((entry["born_stage"] for entry in old), default=0)
    if any(s.is_new for s in sources) and stage <= born:
        raise ValueError(f"growth stage: new layers must be born after the old ones (stage "
                         f"{born}), got stage {stage}")
    return [dict(old[s.old[0]]) if not s.is_new
            else {"born_stage": stage, "source": s.describe()} for s in sources]


# ---------------------------------------------------------------------------------------------
# Tensors of grown layers. A layer is a dict {tensor name: tensor}; names are checkpoint-key
# suffixes (full tensors) or module parameter names (live shards): the rules below only use the
# names the two share (`...linear_proj.weight`, `...linear_fc2.weight`, norms end in a norm name).

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
ZERO_OUTPUT_TENSORS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
"""Output projections: zeroed by `zero_output`, Megatron's scaled init for random layers."""


def split_layer_key(key: str) -> tuple[int, str] | None:
    """(layer index, tensor name) of a `decoder.layers.<i>.<name>` key, None for other keys."""
    match = LAYER_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_key(index: int, name: str) -> str:
    """Checkpoint key of tensor `name` of layer `index`."""
    return f"decoder.layers.{index}.{name}"


def is_adapter_key(key: str) -> bool:
    """LoRA adapter tensors (`<linear>.lora_a.weight` / `.lora_b.weight`)."""
    return ".lora_a." in key or ".lora_b." in key


def mean_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) / 2 element-wise, computed in fp32 and cast back to a's dtype."""
    return ((a.float() + b.float()) / 2).to(a.dtype)


def random_tensor(name: str, shape: Sequence[int], dtype: torch.dtype, *, init_method_std: float,
                  num_layers: int, seed: int, stage: int, index: int) -> torch.Tensor:
    """Full tensor `name` of a randomly initialised new layer `index` of a grown model.

    Megatron's init: norms are ones, `linear_proj` / `linear_fc2` weights are
    N(0, std / sqrt(2 * num_layers)) (`scaled_init_method_normal` with the grown model's
    `TransformerConfig.num_layers`), other weights N(0, std). Drawn in fp32 on the CPU from a
    generator seeded by (seed, stage, index, name), then cast to `dtype`.

    Raises:
        ValueError: no init rule for this tensor name.
    """
    if "norm" in name:  # `...layer_norm_weight` (checkpoint) or `...layernorm.weight` (module)
        return torch.ones(tuple(shape), dtype=dtype)
    if not name.endswith(".weight"):
        raise ValueError(f"growth.operator random: no init rule for layer tensor {name!r}")
    std = init_method_std
    if name.endswith(ZERO_OUTPUT_TENSORS):
        std = init_method_std / math.sqrt(2.0 * num_layers)
    generator = torch.Generator().manual_seed(derive_seed("growth", seed, stage, index, name))
    full = torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=generator)
    return full.to(dtype)


def derived_layer(source: LayerSource, old_layers: Mapping[int, Mapping[str, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    """Tensors of a moved, copied or mean layer from the old layers' tensors (full or shards).

    A moved layer reuses the old tensors (no copy), a copy clones them.
    """
    if source.kind == "old":
        return dict(old_layers[source.old[0]])
    if source.kind == "copy":
        return {name: t.clone() for name, t in old_layers[source.old[0]].items()}
    if source.kind == "mean":
        lower, upper = (old_layers[j] for j in source.old)
        return {name: mean_tensor(t, upper[name]) for name, t in lower.items()}
    raise ValueError(f"derived_layer: {source.kind} layers are drawn, not derived")


def zero_output_(layer: dict[str, torch.Tensor]) -> None:
    """Zero a new layer's output projections in place: the layer then adds nothing to the
    residual stream, so the grown model computes the old function (LLaMA-Pro)."""
    for name, tensor in layer.items():
        if name.endswith(ZERO_OUTPUT_TENSORS):
            layer[name] = torch.zeros_like(tensor)


def grow_state_dict(tensors: Mapping[str, torch.Tensor], sources: Sequence[LayerSource],
                    model: ModelConfig, growth: GrowthConfig, stage: int,
                    layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Apply a layer map to full tensors (checkpoint keys, per-layer format).

    Args:
        tensors: the old model's full tensors (`checkpoint.load_full_tensors`), adapters merged.
            Only the old layers that `layers` read need real data; the others may be meta
            tensors (their shapes and dtypes describe a layer for random init).
        sources: the layer map (`layer_map`), one entry per grown layer.
        model: the model description (random init reads `init_method_std`).
        growth: operator settings (`zero_output`, and `seed` for random layers).
        stage: the stage the grown model trains in (new layers are born in it; seeds random
            init).
        layers: grown-layer indices to build; then only their tensors are returned (the parallel
            offline tool splits the layers over ranks). Default: the whole state dict, with
            the non-layer tensors carried unchanged.

    Returns:
        Full tensors of the grown model: `decoder.layers.<i>.*` for each built layer i.

    Raises:
        ValueError: adapter tensors present (merge them first) or an old layer is missing.
    """
    old_layers: dict[int, dict[str, torch.Tensor]] = {}
    grown: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_adapter_key(key):
            raise ValueError(f"grow_state_dict: adapter tensor {key!r} present; merge the "
                             "adapters into the base weights first (lora.merge_full_state_dict)")
        parsed = split_layer_key(key)
        if parsed is None:
            if layers is None:
                grown[key] = tensor
        else:
            old_layers.setdefault(parsed[0], {})[parsed[1]] = tensor
    build = range(len(sources)) if layers is None else list(layers)
    missing = sorted({j for i in build for j in sources[i].old} - set(old_layers))
    if missing or not old_layers:
        raise ValueError(f"grow_state_dict: old layers {missing or 'all'} missing from the "
                         "tensors")
    template = old_layers[min(old_layers)]
    for index in build:
        source = sources[index]
        if source.kind == "random":
            layer = {name: random_tensor(name, t.shape, t.dtype,
                                         init_method_std=model.init_method_std,
                                         num_layers=len(sources), seed=growth.seed, stage=stage,
                                         index=index)
                     for name, t in template.items()}
        else:
            layer = derived_layer(source, old_layers)
        if source.is_new and growth.zero_output:
            zero_output_(layer)
        grown.update({layer_key(index, name): t for name, t in layer.items()})
    return grown
