"""Growth: layer maps, growth of full state dicts, and online growth of a live TP/PP model.

The distributed tests run real megatron-core models in gloo worlds: function preservation of
`zero_output` at TP=1 and TP=2 x PP=2 for every operator, and online growth (layers moving between
pipeline ranks) bit-identical to offline growth of the same checkpoint at TP2xPP2 and at an
uneven PP=4 split.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megatron_step.checkpoint import load_checkpoint
from megatron_step.config import GrowthConfig, LoraConfig, model_preset
from megatron_step.forward import compute_logits
from megatron_step.growth import (
    LayerSource,
    default_provenance,
    grow_provenance,
    grow_state_dict,
    layer_key,
    layer_map,
    new_layer_indices,
    provenance_from_meta,
)
from megatron_step.growth_online import grow_model, layer_transfers
from megatron_step.lora import adapted_modules, freeze_and_adapt, merge_adapters

from builders import FP32, build_world_model, load_at_layout, random_tokens
from dist import run_world
from growth_builders import (
    GROWN_DEPTH,
    SOURCE_DEPTH,
    grow_offline,
    parallel,
    save_source,
    target_model,
    unequal_params,
)

OLD, MEAN, COPY, RANDOM = "old", "mean", "copy", "random"


def _kinds(sources: list[LayerSource]) -> list[tuple[str, tuple[int, ...]]]:
    return [(s.kind, s.old) for s in sources]


# ---------------------------------------------------------------------------------------------
# Layer maps (pure)


def test_upper_interpolation_mean_fills_top_gaps_first() -> None:
    """The paper's default: new layers go into the gaps between the top layers, top down, and
    each is the mean of its two neighbours; old layers keep their order."""
    assert _kinds(layer_map(4, 2)) == [(OLD, (0,)), (OLD, (1,)), (MEAN, (1, 2)), (OLD, (2,)),
                                       (MEAN, (2, 3)), (OLD, (3,))]
    assert _kinds(layer_map(4, 0)) == [(OLD, (j,)) for j in range(4)]


@pytest.mark.parametrize(("depth", "new", "position", "expected"), [
    (4, 1, "upper", [3]),
    (4, 1, "lower", [1]),
    (4, 2, "lower", [1, 3]),
    (5, 1, "intermediate", [3]),       # gaps 1 and 2 tie around the middle: the upper one wins
    (5, 2, "intermediate", [2, 4]),
    (3, 5, "upper", [1, 2, 4, 5, 6]),  # wrap-around: gap 1 gets 3 layers, gap 0 gets 2
    (1, 2, "upper", [1, 2]),           # one layer: no gap, new layers go on top
    (4, 2, (0, 5), [0, 5]),            # explicit indices in the grown model
])
def test_new_layer_positions(depth: int, new: int, position, expected: list[int]) -> None:
    """Each position policy puts the new layers at the documented indices of the grown model
    (guards against off-by-one placement and broken wrap-around)."""
    assert new_layer_indices(depth, new, position) == expected


def test_wrap_around_and_edges_pick_the_right_neighbours() -> None:
    """Several new layers in one gap all average that gap's neighbours; a slot at the bottom or
    on top has one neighbour, so mean degenerates to a copy of it."""
    assert _kinds(layer_map(3, 5))[1:7] == [(MEAN, (0, 1)), (MEAN, (0, 1)), (OLD, (1,)),
                                            (MEAN, (1, 2)), (MEAN, (1, 2)), (MEAN, (1, 2))]
    assert _kinds(layer_map(1, 2)) == [(OLD, (0,)), (COPY, (0,)), (COPY, (0,))]
    edges = layer_map(4, 2, GrowthConfig(position=(0, 5)))
    assert _kinds(edges) == [(COPY, (0,)), (OLD, (0,)), (OLD, (1,)), (OLD, (2,)), (OLD, (3,)),
                             (COPY, (3,))]


def test_copy_random_and_stack_operators() -> None:
    """copy duplicates the lower neighbour, random reads no old layer, stack repeats the whole
    old block on top (G_stack), wrapping round for more new layers than old ones."""
    assert _kinds(layer_map(4, 2, GrowthConfig(operator="copy", position="lower"))) == [
        (OLD, (0,)), (COPY, (0,)), (OLD, (1,)), (COPY, (1,)), (OLD, (2,)), (OLD, (3,))]
    assert [s.kind for s in layer_map(4, 2, GrowthConfig(operator="random"))].count(RANDOM) == 2
    assert _kinds(layer_map(3, 4, GrowthConfig(operator="stack")))[3:] == [
        (COPY, (0,)), (COPY, (1,)), (COPY, (2,)), (COPY, (0,))]


def test_random_position_is_seeded() -> None:
    """Random placement is reproducible for a seed (online and offline growth must agree) and
    actually depends on the seed."""
    maps = {seed: new_layer_indices(12, 3, "random", seed) for seed in range(8)}
    assert new_layer_indices(12, 3, "random", 5) == maps[5]
    assert len({tuple(v) for v in maps.values()}) > 1
    assert all(len(v) == 3 and all(0 < i < 15 for i in v) for v in maps.values())


@pytest.mark.parametrize(("position", "operator", "match"), [
    ((1, 2, 3), "interpolation_mean", "2 distinct indices needed"),
    ((1, 1), "interpolation_mean", "2 distinct indices needed"),
    ((1, 6), "interpolation_mean", r"must lie in \[0, 6\)"),
    ("lower", "stack", "stack operator always appends on top"),
])
def test_bad_positions_name_the_field(position, operator: str, match: str) -> None:
    """Impossible positions are rejected with a message naming growth.position."""
    with pytest.raises(ValueError, match=rf"growth\.position: .*{match}"):
        layer_map(4, 2, GrowthConfig(operator=operator, position=position))


def test_layer_transfers_between_pipeline_ranks() -> None:
    """Only the old layers a pipeline rank needs but does not hold move, in one global order:
    4 -> 6 layers moves layer 2 at PP=2 (split 2,2 -> 3,3) and a chain at PP=4 (1,1,1,1 ->
    2,2,1,1)."""
    sources = layer_map(4, 2)
    assert layer_transfers(sources, 4, 1) == []
    assert layer_transfers(sources, 4, 2) == [(2, 1, 0)]
    assert layer_transfers(sources, 4, 4) == [(1, 1, 0), (2, 2, 1), (3, 3, 2)]


# ---------------------------------------------------------------------------------------------
# Full state dicts (pure)


def _full_tensors(depth: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random full tensors with the tiny model's checkpoint keys and shapes."""
    generator = torch.Generator().manual_seed(0)
    layer = {"self_attention.linear_qkv.layer_norm_weight": (64,),
             "self_attention.linear_qkv.weight": (128, 64),
             "self_attention.linear_proj.weight": (64, 64),
             "mlp.linear_fc1.layer_norm_weight": (64,),
             "mlp.linear_fc1.weight": (256, 64), "mlp.linear_fc2.weight": (64, 128)}
    shapes = {"embedding.word_embeddings.weight": (256, 64), "output_layer.weight": (256, 64),
              "decoder.final_layernorm.weight": (64,)}
    shapes.update({layer_key(j, n): s for j in range(depth) for n, s in layer.items()})
    return {k: torch.randn(s, generator=generator).to(dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grow_state_dict_mean_is_exact_and_moves_old_layers(dtype: torch.dtype) -> None:
    """interpolation_mean gives exactly (W_j + W_{j+1}) / 2 (fp32 arithmetic, cast back) for
    every tensor of a new layer, norms included; old layers and non-layer tensors are the very
    same tensors (bit-identical), just renumbered."""
    old = _full_tensors(dtype=dtype)
    grown = grow_state_dict(old, layer_map(4, 2), model_preset("tiny"), GrowthConfig(), stage=2)
    assert len(grown) == len(old) + 12
    for new_index, old_index in ((0, 0), (1, 1), (3, 2), (5, 3)):
        for name in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.layer_norm_weight"):
            assert grown[layer_key(new_index, name)] is old[layer_key(old_index, name)]
    for new_index, (a, b) in ((2, (1, 2)), (4, (2, 3))):
        for name in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc2.weight"):
            expected = ((old[layer_key(a, name)].float() + old[layer_key(b, name)].float())
                        / 2).to(dtype)
            assert torch.equal(grown[layer_key(new_index, name)], expected)
    assert grown["output_layer.weight"] is old["output_layer.weight"]


def test_random_layers_use_megatron_init_and_are_reproducible() -> None:
    """A random layer has norms = 1, N(0, 0.02) weights and N(0, 0.02 / sqrt(2 * 6)) output
    projections (Megatron's scaled init at the grown depth); it depends only on (seed, stage,
    index), so building one layer alone gives the same tensors as building all of them."""
    old = _full_tensors()
    sources = layer_map(4, 2, GrowthConfig(operator="random"))
    growth = GrowthConfig(operator="random", seed=3)
    grown = grow_state_dict(old, sources, model_preset("tiny"), growth, stage=2)
    alone = grow_state_dict(old, sources, model_preset("tiny"), growth, stage=2, layers=[4])
    assert set(alone) == {k for k in grown if k.startswith("decoder.layers.4.")}
    assert all(torch.equal(alone[k], grown[k]) for k in alone)
    assert torch.equal(grown[layer_key(2, "mlp.linear_fc1.layer_norm_weight")], torch.ones(64))
    stds = {name: grown[layer_key(2, name)].std().item()
            for name in ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight",
                         "self_attention.linear_proj.weight", "mlp.linear_fc2.weight")}
    scaled = 0.02 / math.sqrt(2 * GROWN_DEPTH)
    assert stds == pytest.approx({"self_attention.linear_qkv.weight": 0.02,
                                  "mlp.linear_fc1.weight": 0.02,
                                  "self_attention.linear_proj.weight": scaled,
                                  "mlp.linear_fc2.weight": scaled}, rel=0.05)
    other_seed = grow_state_dict(old, sources, model_preset("tiny"),
                                 GrowthConfig(operator="random", seed=4), stage=2)
    key = layer_key(2, "self_attention.linear_qkv.weight")
    assert not torch.equal(grown[key], other_seed[key])
    assert not torch.equal(grown[key], grown[layer_key(4, "self_attention.linear_qkv.weight")])


def test_zero_output_zeroes_only_new_output_projections() -> None:
    """zero_output zeroes linear_proj and linear_fc2 of the new layers only; their other
    tensors and all old layers keep the operator's values."""
    old = _full_tensors()
    growth = GrowthConfig(operator="copy", zero_output=True)
    grown = grow_state_dict(old, layer_map(4, 2, growth), model_preset("tiny"), growth, stage=2)
    for index in (2, 4):
        assert not grown[layer_key(index, "self_attention.linear_proj.weight")].any()
        assert not grown[layer_key(index, "mlp.linear_fc2.weight")].any()
        assert grown[layer_key(index, "mlp.linear_fc1.weight")].any()
    assert torch.equal(grown[layer_key(3, "mlp.linear_fc2.weight")],
                       old[layer_key(2, "mlp.linear_fc2.weight")])


def test_grow_state_dict_refuses_unmerged_adapters() -> None:
    """Growing past LoRA tensors would silently drop the adapters' contribution."""
    old = _full_tensors()
    old[layer_key(1, "self_attention.linear_qkv.lora_a.weight")] = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="merge the adapters"):
        grow_state_dict(old, layer_map(4, 1), model_preset("tiny"), GrowthConfig(), stage=2)


def test_provenance_marks_new_layers_and_keeps_old_ones() -> None:
    """Old layers keep their provenance (born stage), new ones are born in the growth stage;
    a missing `layers` key means stage 1; inconsistent metadata and a stage that is not later
    than the old layers' are errors (the trainer would freeze the wrong layers)."""
    old = provenance_from_meta({}, 2)
    assert old == default_provenance(2)
    grown = grow_provenance(old, layer_map(2, 1), stage=2)
    assert grown == [{"born_stage": 1, "source": "init"}, {"born_stage": 2, "source": "mean:0,1"},
                     {"born_stage": 1, "source": "init"}]
    again = grow_provenance(grown, layer_map(3, 1, GrowthConfig(operator="random")), stage=3)
    assert [e["born_stage"] for e in again] == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="born after the old ones"):
        grow_provenance(grown, layer_map(3, 1), stage=2)
    with pytest.raises(ValueError, match="expected 3 entries"):
        provenance_from_meta({"layers": grown[:2]}, 3)


# ---------------------------------------------------------------------------------------------
# Live models in gloo worlds

OPERATORS = ("interpolation_mean", "copy", "random", "stack")
SETTINGS = {  # operator -> a position exercising it (stack always appends on top)
    "interpolation_mean": "upper", "copy": "intermediate", "random": "random", "stack": "upper"}
TP1_POSITIONS = ("upper", "intermediate", "lower", "random", (0, 5))


def _growth(operator: str, position, zero_output: bool) -> GrowthConfig:
    return GrowthConfig(operator=operator, position=position, zero_output=zero_output, seed=7)


def _zero_output_tp1(src: Path) -> dict[str, float]:
    """Max |logit difference| after zero_output growth, per operator and position, at TP=1."""
    model = target_model()
    _, gpt = load_at_layout(model, SOURCE_DEPTH, parallel(1, 1), src)
    tokens = random_tokens(model)
    reference = compute_logits([gpt], tokens)
    diffs = {}
    for operator in OPERATORS:
        for position in TP1_POSITIONS if operator != "stack" else ("upper",):
            growth = _growth(operator, position, zero_output=True)
            grown, _ = grow_model([gpt], default_provenance(SOURCE_DEPTH), model, GROWN_DEPTH,
                                  growth, parallel(1, 1), FP32, stage=2)
            diffs[f"{operator}@{position}"] = (compute_logits(grown, tokens)
                                               - reference).abs().max().item()
    return diffs


def _adapted_then_grown(src: Path) -> tuple[str, float, float]:
    """Grow a model with trained (non-zero) LoRA adapters: refused unmerged; after the merge,
    zero_output growth keeps the adapted model's logits. Also returns how much the adapters
    changed the logits."""
    model = target_model()
    tokens = random_tokens(model)
    _, gpt = load_at_layout(model, SOURCE_DEPTH, parallel(1, 1), src)
    base = compute_logits([gpt], tokens)
    freeze_and_adapt([gpt], [0, 1, 2], LoraConfig(rank=4), seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in adapted_modules([gpt]):
            module.lora_b.weight.copy_(0.05 * torch.randn(module.lora_b.weight.shape,
                                                          generator=generator))
    adapted = compute_logits([gpt], tokens)
    growth = GrowthConfig(zero_output=True)
    try:
        grow_model([gpt], default_provenance(SOURCE_DEPTH), model, GROWN_DEPTH, growth,
                   parallel(1, 1), FP32, stage=2)
        refusal = ""
    except ValueError as exc:
        refusal = str(exc)
    merge_adapters([gpt])
    grown, _ = grow_model([gpt], default_provenance(SOURCE_DEPTH), model, GROWN_DEPTH, growth,
                          parallel(1, 1), FP32, stage=2)
    return (refusal, (compute_logits(grown, tokens) - adapted).abs().max().item(),
            (adapted - base).abs().max().item())


def _online_vs_offline(src: Path, offline: dict[str, Path]) -> dict[str, object]:
    """At TP2xPP2 and PP4: online growth vs offline growth (mismatching parameters), and at
    TP2xPP2 the logit change of zero_output growth per operator."""
    model = target_model()
    tokens = random_tokens(model)
    result: dict[str, object] = {}
    for tp, pp in ((2, 2), (1, 4)):
        _, gpt = load_at_layout(model, SOURCE_DEPTH, parallel(tp, pp), src)
        reference = compute_logits([gpt], tokens)
        for operator in OPERATORS:
            growth = _growth(operator, SETTINGS[operator], zero_output=False)
            (online,), provenance = grow_model([gpt], default_provenance(SOURCE_DEPTH), model,
                                               GROWN_DEPTH, growth, parallel(tp, pp), FP32, 2)
            _, loaded = build_world_model(model, GROWN_DEPTH, parallel(tp, pp))
            meta = load_checkpoint(offline[operator], [loaded])
            result[f"mismatch {operator} tp{tp}pp{pp}"] = unequal_params(online, loaded)
            result[f"provenance {operator}"] = provenance == meta["layers"]
            result[f"uninitialised {operator}"] = not online.config.use_cpu_initialization
            if (tp, pp) == (2, 2):
                zero = _growth(operator, SETTINGS[operator], zero_output=True)
                grown, _ = grow_model([gpt], default_provenance(SOURCE_DEPTH), model,
                                      GROWN_DEPTH, zero, parallel(tp, pp), FP32, 2)
                result[f"zero {operator}"] = (compute_logits(grown, tokens)
                                              - reference).abs().max().item()
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("growth") / "src"
    run_world(save_source, 1, path)
    return path


def test_zero_output_growth_preserves_logits_tp1(source: Path) -> None:
    """zero_output makes every operator at every position function preserving: the grown
    6-layer model's logits equal the 4-layer model's within 1e-5 (online growth, TP=1)."""
    diffs = run_world(_zero_output_tp1, 1, source)[0]
    assert len(diffs) == 16
    assert max(diffs.values()) < 1e-5, diffs


def test_online_growth_needs_merged_adapters(source: Path) -> None:
    """Unmerged LoRA adapters would be dropped silently by growth, so grow_model refuses them;
    once merged (lora.merge_adapters) the grown model keeps the adapted function (1e-5)."""
    refusal, diff, adapter_effect = run_world(_adapted_then_grown, 1, source)[0]
    assert "LoRA adapters are not merged" in refusal and "merge_adapters" in refusal
    assert adapter_effect > 1e-3 and diff < 1e-5


@pytest.fixture(scope="module")
def online_results(source: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("offline")
    offline = {op: grow_offline(source, root / op, num_new_layers=GROWN_DEPTH - SOURCE_DEPTH,
                                growth={"operator": op, "position": SETTINGS[op], "seed": 7})
               for op in OPERATORS}
    return run_world(_online_vs_offline, 4, source, offline)


def test_online_growth_equals_offline_growth(online_results: list[dict]) -> None:
    """Online growth of a live model (old layers sent between pipeline ranks as the PP split
    changes: 2,2 -> 3,3 at TP2xPP2 and 1,1,1,1 -> 2,2,1,1 at PP4) gives bit-identical weights
    and the same provenance as offline growth of its checkpoint, for every operator, including
    random init drawn as full tensors and sharded through the model's sharded_state_dict. The
    grown model is built without initialisation (every weight is written by growth)."""
    for rank, result in enumerate(online_results):
        for key, value in result.items():
            if key.startswith("mismatch"):
                assert value == [], f"rank {rank} {key}: {value}"
            elif key.startswith(("provenance", "uninitialised")):
                assert value is True, f"rank {rank} {key}"


def test_zero_output_growth_preserves_logits_tp2pp2(online_results: list[dict]) -> None:
    """At TP=2 x PP=2, zero_output growth (4 -> 6 layers, new pipeline split) keeps the logits
    within 1e-5 for every operator, on every rank."""
    for rank, result in enumerate(online_results):
        diffs = {k: v for k, v in result.items() if k.startswith("zero")}
        assert len(diffs) == len(OPERATORS)
        assert max(diffs.values()) < 1e-5, f"rank {rank}: {diffs}"
