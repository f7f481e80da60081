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
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from megatron_step.config import GrowthConfig

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
