"""Memory model and stage solver: hand-checked paper numbers, exactness against brute force."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from megatron_step.config import LORA_TARGETS, MODEL_PRESETS, ConfigError, ModelConfig
from megatron_step.memory import (
    MemorySettings,
    activation_bytes_per_layer,
    count_parameters,
    lora_params_per_layer,
    params_per_layer,
    parse_size,
    stage_cost,
)
from megatron_step.plan import (
    InfeasiblePlanError,
    StageConstraints,
    plan_for_budget,
    plan_stages,
    stage_config_dicts,
)

LLAMA_368M = MODEL_PRESETS["llama-368m"]
PAPER_NO_LORA = MemorySettings(memory_model="paper", lora_rank=0)
GQA_MODEL = ModelConfig(num_layers=16, hidden_size=96, num_attention_heads=6, num_query_groups=2,
                        ffn_hidden_size=256, vocab_size=512, seq_length=128)


def _with_depth(model: ModelConfig, depth: int) -> ModelConfig:
    return dataclasses.replace(model, num_layers=depth)


# ---------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize(("preset", "expected"), [
    # per layer: qkv (a + 2g) d h + proj h h + fc1 2 f h + fc2 f h + 2 h norms;
    # model: L * layer + 2 V h (untied) + h (final norm)
    ("tiny", 4 * 36_992 + 2 * 256 * 64 + 64),  # 180,800
    ("llama-368m", 24 * 12_601_344 + 2 * 32_000 * 1024 + 1024),  # 367,969,280
    ("llama-1.2b", 24 * 51_384_320 + 2 * 32_000 * 2048 + 2048),  # 1,364,297,728
    ("llama2-7b", 32 * 202_383_360 + 2 * 32_000 * 4096 + 4096),  # 6,738,415,616 (Llama-2-7b)
])
def test_count_parameters_matches_megatron_gptmodel(preset: str, expected: int) -> None:
    """Closed-form count equals what Megatron-Core's GPTModel allocates for every preset.

    Guards the memory model's base unit: llama-368m is 367,969,280 including the final norm.
    """
    assert count_parameters(MODEL_PRESETS[preset]) == expected


def test_params_per_layer_counts_gqa_swiglu_and_norms() -> None:
    """P_layer of a GQA model: qkv has (heads + 2 groups) * head_dim rows, fc1 2 * ffn rows."""
    h, d, f = 96, 16, 256
    expected = (6 + 2 * 2) * d * h + h * h + 2 * f * h + f * h + 2 * h
    assert params_per_layer(GQA_MODEL) == expected


def test_lora_params_per_layer_is_rank_times_in_plus_out() -> None:
    """E(P_layer) for rank 8 on llama-368m: r * (in + out) summed over the chosen linears."""
    rank = 8
    per_target = {"linear_qkv": rank * (1024 + 3072), "linear_proj": rank * (1024 + 1024),
                  "linear_fc1": rank * (1024 + 2 * 2736), "linear_fc2": rank * (2736 + 1024)}
    assert lora_params_per_layer(LLAMA_368M, rank) == sum(per_target.values()) == 131_200
    assert lora_params_per_layer(LLAMA_368M, rank, ("linear_fc2",)) == per_target["linear_fc2"]
    assert lora_params_per_layer(LLAMA_368M, 0) == 0


# ---------------------------------------------------------------------------------------------
# Paper memory model


def test_paper_k2_llama_368m_hand_calculation() -> None:
    """Paper model, llama-368m, rank 0, K=2 gives splits (13, 11) and 45.8% reduction.

    In units of P_layer: P_1 = 16 * 13 = 208, P_2 = 16 * 11 + 2 * 13 = 202, peak 208; vanilla
    16 * 24 = 384; reduction 1 - 208/384 = 0.4583. Neighbours are worse: (12, 12) -> P_2 = 216,
    (14, 10) -> P_1 = 224.
    """
    plan = plan_stages(LLAMA_368M, 2, PAPER_NO_LORA)
    p_layer = params_per_layer(LLAMA_368M)
    assert plan.splits == (13, 11)
    assert [s.peak_bytes for s in plan.stages] == [208 * p_layer, 202 * p_layer]
    assert plan.vanilla_peak_bytes == 384 * p_layer
    assert plan.reduction == pytest.approx(1 - 208 / 384, abs=1e-12)
    assert round(100 * plan.reduction, 1) == 45.8


def test_paper_k3_llama_368m_hand_calculation() -> None:
    """Paper model, llama-368m, rank 0, K=3 gives splits (9, 8, 7) and 62.0% reduction.

    P_1 = 16 * 9 = 144, P_2 = 16 * 8 + 2 * 9 = 146, P_3 = 16 * 7 + 2 * 17 = 146; peak 146 of
    384: 1 - 146/384 = 0.6198. n_1 = 10 would cost 160 > 146; with n_1 = 9, n_2 <= 8 keeps
    P_2 <= 146 and n_2 >= 8 keeps P_3 = 258 - 14 n_2 <= 146.
    """
    plan = plan_stages(LLAMA_368M, 3, PAPER_NO_LORA)
    p_layer = params_per_layer(LLAMA_368M)
    assert plan.splits == (9, 8, 7)
    assert [s.peak_bytes // p_layer for s in plan.stages] == [144, 146, 146]
    assert plan.reduction == pytest.approx(1 - 146 / 384, abs=1e-12)
    assert round(100 * plan.reduction, 1) == 62.0


def test_paper_stage_cost_is_the_published_formula() -> None:
    """stage_cost under `paper` equals 16 n P + 2 N P + 16 N E exactly, components included."""
    settings = MemorySettings(memory_model="paper", lora_rank=16)
    p_layer, e = params_per_layer(GQA_MODEL), lora_params_per_layer(GQA_MODEL, 16)
    cost = stage_cost(GQA_MODEL, 5, 7, settings)
    assert cost.peak_bytes == 16 * 5 * p_layer + 2 * 7 * p_layer + 16 * 7 * e
    assert cost.memory.model_state_bytes == cost.peak_bytes
    assert (cost.trainable_params, cost.frozen_params, cost.adapter_params) == (
        5 * p_layer, 7 * p_layer, 7 * e)


def _random_model(rng: random.Random) -> ModelConfig:
    heads = rng.choice([4, 8, 16, 32])
    return ModelConfig(num_layers=rng.randint(2, 96), hidden_size=heads * rng.choice([32, 64]),
                       num_attention_heads=heads, num_query_groups=rng.choice([None, heads // 4]),
                       ffn_hidden_size=rng.randint(64, 8192), vocab_size=rng.randint(256, 64000),
                       seq_length=1024)


def test_paper_k2_reduction_never_exceeds_continuous_bound() -> None:
    """No K=2 plan under the paper model saves more than 7/15 = 46.67% of vanilla peak memory.

    Continuous relaxation: max(16 x, 16 (L - x) + 2 x) is smallest at x = 8 L / 15, where the peak
    is 128 L / 15 = (8 / 15) 16 L; adapters (E >= 0) only add cost. Random models and ranks.
    """
    rng = random.Random(1234)
    for _ in range(300):
        targets = tuple(rng.sample(LORA_TARGETS, rng.randint(1, 4)))
        settings = MemorySettings(memory_model="paper", lora_rank=rng.choice([0, 1, 8, 64, 256]),
                                  lora_targets=targets)
        plan = plan_stages(_random_model(rng), 2, settings)
        assert plan.reduction <= 7 / 15 + 1e-12


# ---------------------------------------------------------------------------------------------
# Solver exactness


def _brute_force(model: ModelConfig, num_stages: int, settings: MemorySettings,
                 constraints: StageConstraints) -> tuple[int, tuple[int, ...]] | None:
    """(optimal peak, lexicographically largest optimal splits) over all compositions."""
    depth = model.num_layers
    pp = 1 if settings.memory_model == "paper" else settings.pipeline_model_parallel_size
    best: tuple[int, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, depth), num_stages - 1):
        splits = tuple(b - a for a, b in zip((0, *cuts), (*cuts, depth), strict=True))
        if splits[0] < pp:  # every pipeline rank needs a layer
            continue
        ok, peak, before = True, 0, 0
        for index, n in enumerate(splits):
            low, high = constraints.bounds(index, num_stages)
            factor = constraints.max_growth_factor
            if n < low or (high is not None and n > high) or (
                    index and factor is not None and n > factor * before):
                ok = False
                break
            peak = max(peak, stage_cost(model, n, before, settings).peak_bytes)
            before += n
        if ok and (best is None or peak < best[0] or (peak == best[0] and splits > best[1])):
            best = (peak, splits)
    return best


SETTINGS_GRID = [
    MemorySettings(memory_model="paper", lora_rank=0),
    MemorySettings(memory_model="paper", lora_rank=8),
    MemorySettings(memory_model="paper", lora_rank=64, lora_targets=("linear_qkv", "linear_fc2")),
    MemorySettings(lora_rank=8),
    MemorySettings(lora_rank=32, tensor_model_parallel_size=2, use_distributed_optimizer=True,
                   data_parallel_size=4, recompute_activations=True),
    MemorySettings(lora_rank=4, pipeline_model_parallel_size=2, fp8_frozen_storage=True,
                   freeze_embeddings_after_stage1=True, growth_position="lower"),
    MemorySettings(lora_rank=16, pipeline_model_parallel_size=3, grad_reduce_in_fp32=False,
                   micro_batch_size=4),
]


@pytest.mark.parametrize("settings", SETTINGS_GRID, ids=lambda s: f"{s.memory_model}-r"
                         f"{s.lora_rank}-tp{s.tensor_model_parallel_size}"
                         f"-pp{s.pipeline_model_parallel_size}")
@pytest.mark.parametrize("base", [MODEL_PRESETS["tiny"], GQA_MODEL, LLAMA_368M],
                         ids=["tiny", "gqa", "llama-368m"])
def test_solver_equals_brute_force_small_depths(base: ModelConfig,
                                                settings: MemorySettings) -> None:
    """For every depth <= 16 and K <= 4 the DP finds the brute-force optimum and its splits.

    Guards exactness (optimal peak) and the documented tie-break (lexicographically largest);
    with PP the depths are uneven over ranks and the first stage must fill every rank.
    """
    pp = settings.pipeline_model_parallel_size if settings.memory_model == "full" else 1
    for depth in range(pp, 17):
        model = _with_depth(base, depth)
        for num_stages in range(1, min(4, depth - pp + 1) + 1):
            expected = _brute_force(model, num_stages, settings, StageConstraints())
            plan = plan_stages(model, num_stages, settings)
            assert expected is not None
            assert (plan.peak_bytes, plan.splits) == expected, (depth, num_stages)


@pytest.mark.parametrize("constraints", [
    StageConstraints(min_new_layers=2),
    StageConstraints(max_new_layers=5),
    StageConstraints(min_new_layers=(4, 1, 1), max_new_layers=(6, 6, 3)),
    StageConstraints(max_growth_factor=0.5),
])
def test_solver_with_constraints_equals_brute_force(constraints: StageConstraints) -> None:
    """Per-stage bounds and the growth limit: DP and brute force agree, or both find nothing."""
    for depth in range(3, 17):
        model = _with_depth(GQA_MODEL, depth)
        expected = _brute_force(model, 3, MemorySettings(lora_rank=8), constraints)
        if expected is None:
            with pytest.raises(InfeasiblePlanError):
                plan_stages(model, 3, MemorySettings(lora_rank=8), constraints)
            continue
        plan = plan_stages(model, 3, MemorySettings(lora_rank=8), constraints)
        assert (plan.peak_bytes, plan.splits) == expected, depth


def test_solver_handles_sixteen_stages_of_128_layers() -> None:
    """K=16, L=128 (the stated scale) returns a valid plan: 16 positive splits summing to 128."""
    model = _with_depth(MODEL_PRESETS["llama2-7b"], 128)
    plan = plan_stages(model, 16, MemorySettings(pipeline_model_parallel_size=4,
                                                 tensor_model_parallel_size=4))
    assert len(plan.splits) == 16 and sum(plan.splits) == 128 and min(plan.splits) >= 1
    assert plan.splits[0] >= 4


def test_more_stages_than_layers_is_rejected() -> None:
    """K above the depth (minus PP - 1: the first stage fills every rank) names `num_stages`."""
    with pytest.raises(ConfigError, match=r"^num_stages: must be in \[1, 24\]"):
        plan_stages(LLAMA_368M, 25)
    with pytest.raises(ConfigError, match=r"^num_stages: must be in \[1, 21\]"):
        plan_stages(LLAMA_368M, 22, MemorySettings(pipeline_model_parallel_size=4))


# ---------------------------------------------------------------------------------------------
# Full memory model


@pytest.mark.parametrize(("settings", "per_param"), [
    # default: bf16 weights, fp32 grad buffer (precision.grad_reduce_in_fp32), fp32 master + Adam
    (MemorySettings(), {"weights": 2, "grads": 4, "master_weights": 4, "optimizer_states": 8,
                        "main_grads": 0}),
    # the paper's 16 bytes; the optimizer then makes a transient fp32 copy of the bf16 grads
    (MemorySettings(grad_reduce_in_fp32=False), {"weights": 2, "grads": 2, "master_weights": 4,
                                                 "optimizer_states": 8, "main_grads": 4}),
    (MemorySettings(params_dtype="fp32"), {"weights": 4, "grads": 4, "master_weights": 0,
                                           "optimizer_states": 8, "main_grads": 0}),
])
def test_full_bytes_per_parameter_by_precision(settings: MemorySettings,
                                               per_param: dict[str, int]) -> None:
    """Vanilla, no sharding: every component is bytes-per-parameter times count_parameters."""
    cost = stage_cost(LLAMA_368M, 24, 0, settings)
    memory = cost.memory.as_dict()
    total = count_parameters(LLAMA_368M)
    assert {k: memory[k] for k in per_param} == {k: v * total for k, v in per_param.items()}
    assert cost.peak_bytes == cost.memory.model_state_bytes + max(memory["activations"],
                                                                  memory["main_grads"])


def test_model_state_matches_measured_megatron_buffers() -> None:
    """Byte counts measured on Megatron 0.16.1 (shared megatron_notes.md 3.1, bf16 run, DDP with
    grad_reduce_in_fp32): layers 0-1 of 4 frozen + LoRA r=4 on their four linears -> 174,400
    trainable, grad buffer 697,600 B, Adam 1,395,200 B, fp32 master 697,600 B."""
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                        vocab_size=256, seq_length=32)
    assert count_parameters(model) == 295_488  # "nothing frozen" row
    memory = stage_cost(model, 2, 2, MemorySettings(lora_rank=4)).memory
    assert (memory.grads, memory.optimizer_states, memory.master_weights) == (
        697_600, 1_395_200, 697_600)


def test_distributed_optimizer_shards_master_and_adam_not_grads() -> None:
    """DP=4 with the distributed optimizer divides master, Adam and main grads by 4 (rounded up);
    weights and the grad buffer stay whole."""
    total = count_parameters(LLAMA_368M)
    memory = stage_cost(LLAMA_368M, 24, 0, MemorySettings(
        use_distributed_optimizer=True, data_parallel_size=4, grad_reduce_in_fp32=False)).memory
    shard = math.ceil(total / 4)
    assert (memory.weights, memory.grads) == (2 * total, 2 * total)
    assert (memory.master_weights, memory.optimizer_states, memory.main_grads) == (
        4 * shard, 8 * shard, 4 * shard)


def test_frozen_layers_cost_weight_bytes_only_and_fp8_halves_linears() -> None:
    """A stage with N old layers: they add 2 bytes/param (linears 1 with FP8 storage, plus one
    fp32 scale per output row, or per block of input elements) plus their adapters, which are
    trainable (16 bytes each without the fp32 grad buffer)."""
    model = _with_depth(GQA_MODEL, 8)
    rank = 4
    settings = MemorySettings(lora_rank=rank, grad_reduce_in_fp32=False)
    layer, adapter = params_per_layer(model), lora_params_per_layer(model, rank)
    norms = 2 * model.hidden_size
    grown = stage_cost(model, 3, 5, settings).memory
    first = stage_cost(model, 3, 0, settings).memory
    assert grown.model_state_bytes - first.model_state_bytes == 5 * (2 * layer + 16 * adapter)
    fp8 = stage_cost(model, 3, 5, dataclasses.replace(settings, fp8_frozen_storage=True)).memory
    qkv_out = (model.num_attention_heads + 2 * model.query_groups) * model.head_dim
    rows = qkv_out + model.hidden_size + 2 * model.ffn_hidden_size + model.hidden_size
    assert grown.weights - fp8.weights == 5 * (layer - norms - 4 * rows)
    blocks = dataclasses.replace(settings, fp8_frozen_storage=True, fp8_frozen_block_size=32)
    per_block = stage_cost(model, 3, 5, blocks).memory
    inputs = (qkv_out * 96 + 96 * 96 + 2 * model.ffn_hidden_size * 96 + 96 * 256) // 32
    assert grown.weights - per_block.weights == 5 * (layer - norms - 4 * inputs)


def test_tensor_parallel_splits_linears_and_vocab_but_not_norms() -> None:
    """TP=2: every linear and the embedding/output vocab rows halve; RMSNorm weights replicate."""
    model = LLAMA_368M
    weights = stage_cost(model, 24, 0, MemorySettings(tensor_model_parallel_size=2)).memory.weights
    norms = 2 * model.hidden_size
    linears = params_per_layer(model) - norms
    expected = 24 * (linears // 2 + norms) + 2 * model.vocab_size * model.hidden_size // 2 \
        + model.hidden_size
    assert weights == 2 * expected


def test_pipeline_places_new_layers_by_growth_position() -> None:
    """PP=2, growing 5 -> 6 layers: `upper` puts the new layer on rank 1, `lower` on rank 0.

    Ranks hold 3 layers each; the embedding sits on rank 0, output layer and final norm on rank 1.
    """
    model, rank = _with_depth(GQA_MODEL, 6), 8
    layer, adapter = params_per_layer(model), lora_params_per_layer(model, rank)
    vocab = model.vocab_size * model.hidden_size
    for position, new_rank in (("upper", 1), ("lower", 0)):
        settings = MemorySettings(lora_rank=rank, pipeline_model_parallel_size=2,
                                  growth_position=position)
        ranks = stage_cost(model, 1, 5, settings).pipeline_ranks
        trainable = [vocab + 3 * adapter, vocab + model.hidden_size + 3 * adapter]
        trainable[new_rank] += layer - adapter
        assert [r.grads for r in ranks] == [4 * t for t in trainable], position


def test_pipeline_places_new_layers_where_growth_puts_them() -> None:
    """PP=2, growing 4 -> 6 layers: `stack` appends both new layers on top (rank 1), `upper`
    interleaves them (one per rank), and the planner agrees with growth.layer_map, including a
    seeded `random` position (the bug: it used `upper`'s placement for every operator)."""
    from megatron_step.config import GrowthConfig
    from megatron_step.growth import layer_map

    model, rank = _with_depth(GQA_MODEL, 6), 8
    layer, adapter = params_per_layer(model), lora_params_per_layer(model, rank)
    for operator, position, seed in (("stack", "upper", 0), ("interpolation_mean", "upper", 0),
                                     ("copy", "random", 3), ("copy", "random", 4)):
        settings = MemorySettings(lora_rank=rank, pipeline_model_parallel_size=2,
                                  growth_operator=operator, growth_position=position,
                                  growth_seed=seed)
        new = [i for i, source in enumerate(layer_map(4, 2, GrowthConfig(
            operator=operator, position=position, seed=seed))) if source.is_new]
        per_rank = [sum(i < 3 for i in new), sum(i >= 3 for i in new)]
        ranks = stage_cost(model, 2, 4, settings).pipeline_ranks
        vocab = model.vocab_size * model.hidden_size
        expected = [vocab, vocab + model.hidden_size]
        for r in range(2):
            expected[r] += per_rank[r] * layer + (3 - per_rank[r]) * adapter
        assert [r.grads for r in ranks] == [4 * t for t in expected], (operator, position, seed)


def test_fp8_compute_adds_transformer_engines_weight_caches() -> None:
    """FP8 compute: TE keeps an FP8 copy + transpose of every linear weight, frozen included
    (2 bytes per linear parameter on Hopper; MXFP8 + 2/32 for block scales); a weight already
    stored in FP8 keeps only its 1-byte transpose. No FP8 compute, no caches. The caches are
    alive across steps (in the peak) but are not model state."""
    model = _with_depth(GQA_MODEL, 6)
    linear = params_per_layer(model) - 2 * model.hidden_size
    plain = stage_cost(model, 2, 4, MemorySettings())
    assert plain.memory.weight_caches == 0
    fp8 = stage_cost(model, 2, 4, MemorySettings(fp8_recipe="delayed"))
    assert fp8.memory.weight_caches == 2 * 6 * linear
    assert fp8.memory.model_state_bytes == plain.memory.model_state_bytes
    mx = stage_cost(model, 2, 4, MemorySettings(fp8_recipe="mxfp8"))
    assert mx.memory.weight_caches == math.ceil((2 + 2 / 32) * 6 * linear)
    stored = stage_cost(model, 2, 4, MemorySettings(fp8_recipe="delayed", fp8_frozen_storage=True))
    assert stored.memory.weight_caches == 2 * 2 * linear + 1 * 4 * linear
    assert fp8.peak_bytes - plain.peak_bytes >= fp8.memory.weight_caches


def test_fp8_adapted_norm_linears_keep_an_fp8_copy_of_their_input() -> None:
    """Under FP8 an adapted TE LayerNormLinear (qkv, fc1) of a frozen layer saves 1 byte per
    [s, b, h] element that a frozen weight would not need; only with adapters on those targets."""
    model = _with_depth(GQA_MODEL, 6)
    s, h = model.seq_length, model.hidden_size
    base = MemorySettings(fp8_recipe="delayed", micro_batch_size=2)
    with_fp8 = stage_cost(model, 2, 4, base).memory.activations
    without = stage_cost(model, 2, 4, dataclasses.replace(base, fp8_recipe=None))
    assert with_fp8 - without.memory.activations == 4 * 2 * s * 2 * h
    row_only = dataclasses.replace(base, lora_targets=("linear_proj", "linear_fc2"))
    assert stage_cost(model, 2, 4, row_only).memory.activations == \
        stage_cost(model, 2, 4, dataclasses.replace(row_only, fp8_recipe=None)).memory.activations


def test_uneven_pipeline_split_gives_earlier_ranks_the_extra_layer() -> None:
    """PP=2 at depth 5 (as layout.pipeline_split): rank 0 holds 3 layers, rank 1 holds 2."""
    model = _with_depth(GQA_MODEL, 5)
    settings = MemorySettings(pipeline_model_parallel_size=2)
    layer, vocab = params_per_layer(model), model.vocab_size * model.hidden_size
    ranks = stage_cost(model, 5, 0, settings).pipeline_ranks
    assert [r.weights for r in ranks] == [2 * (3 * layer + vocab),
                                          2 * (2 * layer + vocab + model.hidden_size)]


def test_activation_formula_llama_368m() -> None:
    """Per-layer activations, bf16, flash, s=1024, b=1: 2 s b (6 h + 2 g d + 3 ffn) bytes.

    6 h = 4 h (two norm inputs, qkv and fc1 inputs) + 2 h (q, attention output); k, v: 2 g d = 2 h
    for MHA; SwiGLU: 3 ffn. Vanilla adds the last-rank head: 2 * 2 s b h + 4 s b V (fp32 logits).
    """
    s, h, f, vocab = 1024, 1024, 2736, 32000
    per_layer = 2 * s * (6 * h + 2 * h + 3 * f)
    assert activation_bytes_per_layer(LLAMA_368M, MemorySettings()) == per_layer == 33_587_200
    vanilla = stage_cost(LLAMA_368M, 24, 0, MemorySettings()).memory
    assert vanilla.activations == 24 * per_layer + 4 * s * h + 4 * s * vocab


def test_recompute_keeps_layer_inputs_plus_one_layer() -> None:
    """Full recompute: 2 s b h bytes per layer input, one recomputed layer, and the head."""
    s, h, vocab = 1024, 1024, 32000
    settings = MemorySettings(recompute_activations=True)
    per_layer = activation_bytes_per_layer(LLAMA_368M, settings)
    activations = stage_cost(LLAMA_368M, 24, 0, settings).memory.activations
    assert activations == 24 * 2 * s * h + per_layer + 4 * s * h + 4 * s * vocab


def test_first_pipeline_rank_holds_pp_micro_batches() -> None:
    """1F1B with PP=2: rank 0 keeps 2 micro-batches of its layers' activations, rank 1 one."""
    settings = MemorySettings(pipeline_model_parallel_size=2)
    per_layer = activation_bytes_per_layer(LLAMA_368M, settings)
    ranks = stage_cost(LLAMA_368M, 24, 0, settings).pipeline_ranks
    assert ranks[0].activations == 2 * 12 * per_layer


def test_unfused_attention_adds_softmax_probabilities() -> None:
    """Unfused attention keeps a * s^2 * b probabilities per layer (bf16: 2 bytes each)."""
    flash = activation_bytes_per_layer(LLAMA_368M, MemorySettings())
    unfused = activation_bytes_per_layer(LLAMA_368M, MemorySettings(attention_backend="unfused"))
    assert unfused - flash == 2 * 16 * 1024 * 1024


@pytest.mark.parametrize(("field", "settings"), [
    ("tensor_model_parallel_size", MemorySettings(tensor_model_parallel_size=3)),
    ("pipeline_model_parallel_size", MemorySettings(pipeline_model_parallel_size=25)),
    ("micro_batch_size", MemorySettings(micro_batch_size=0)),
    ("lora_rank", MemorySettings(lora_rank=-1)),
])
def test_impossible_settings_name_the_field(field: str, settings: MemorySettings) -> None:
    """Settings that cannot apply to the model raise ConfigError starting with the field name."""
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        plan_stages(LLAMA_368M, 2, settings)


# ---------------------------------------------------------------------------------------------
# Budget mode, sizes, plan output


def test_budget_mode_returns_fewest_stages_that_fit() -> None:
    """A budget between the K=2 and K=1 peaks selects K=2 with the K=2 optimum."""
    two = plan_stages(LLAMA_368M, 2)
    vanilla = two.vanilla_peak_bytes
    result = plan_for_budget(LLAMA_368M, (two.peak_bytes + vanilla) // 2)
    assert result.fits and result.shortfall_bytes == 0
    assert result.plan.splits == two.splits


def test_budget_mode_reports_best_plan_and_shortfall_when_nothing_fits() -> None:
    """An impossible budget returns the lowest peak over all K and how far above budget it is."""
    result = plan_for_budget(LLAMA_368M, 2**20)
    best = min(plan_stages(LLAMA_368M, k).peak_bytes for k in range(1, 17))
    assert not result.fits
    assert result.plan.peak_bytes == best
    assert result.shortfall_bytes == best - 2**20


@pytest.mark.parametrize(("text", "expected"), [
    ("40GiB", 40 * 2**30), ("40GB", 40 * 10**9), ("39.5GiB", int(39.5 * 2**30)),
    ("512MiB", 512 * 2**20), ("1000000", 10**6), ("80 gb", 80 * 10**9)])
def test_parse_size_accepts_binary_decimal_and_plain_bytes(text: str, expected: int) -> None:
    """Sizes in IEC (GiB) and SI (GB) units, or bytes, parse to exact byte counts."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["40GB?", "40 GiB/s", "GiB", "-4GiB", "0GiB", "1.5", "40XB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    """Anything but a positive number with a known unit is a ValueError."""
    with pytest.raises(ValueError):
        parse_size(text)


def test_stage_config_dicts_need_adapters_after_stage_one() -> None:
    """A written multi-stage plan with LoRA rank 0 would train no adapters: rejected by name."""
    plan = plan_stages(LLAMA_368M, 2, PAPER_NO_LORA)
    with pytest.raises(ConfigError, match=r"^lora_rank: "):
        stage_config_dicts(plan)
