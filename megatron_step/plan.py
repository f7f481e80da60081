"""STEP stage planner: how many layers each stage adds so that peak training memory is smallest.

Paper (Yano et al., NAACL 2025, section 2): stage i adds n_i layers, N_i = n_1 + ... + n_i,
N_0 = 0, N_K = L, and costs (bytes of model states)

    P_i = 16 n_i P_layer + 2 N_{i-1} P_layer + 16 N_{i-1} E(P_layer)      vanilla: 16 L P_layer

    choose positive integers n_1..n_K minimising max_i P_i subject to N_K = L.

Code names: n_i -> `num_new_layers`, N_i -> `num_layers` (StageCost fields), K -> `num_stages`,
P_layer -> `params_per_layer(model)`, E(P_layer) -> `lora_params_per_layer(model, rank, targets)`,
P_i -> `stage_cost(...).peak_bytes` (memory.py, which also holds the extended per-GPU model).

Solver: every stage cost depends only on (n_i, N_{i-1}), so the minimax problem is a dynamic
programme over (stage, depth so far): best[k][d] = min over n of max(cost(n, d), best[k+1][d + n]).
It is exact, O(K L^2) cost look-ups (K=16, L=128 well under a second), and needs no linearised
cost: the full model's stage cost (pipeline placement, activations) is not linear in n_i, which an
integer-programming formulation would require. Among plans with the same
optimal peak it returns the lexicographically largest (n_1, n_2, ...): the most layers trained
fully and early. Constraints: per-stage min/max new layers, `max_growth_factor` (n_i <= f N_{i-1}
for i >= 2; unlimited by default since growth.py wraps round the gaps), and a first stage of at
least PP layers under the full model (every pipeline rank needs a layer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_step.config import ConfigError, ModelConfig, config_from_dict
from megatron_step.memory import MemorySettings, StageCost, format_size, stage_cost

MAX_STAGES = 16
"""Budget mode tries K = 1 .. MAX_STAGES (and never more stages than layers)."""


class InfeasiblePlanError(ConfigError):
    """No split of the layers into the requested stages satisfies the constraints."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StageConstraints:
    """Limits on the layers each stage adds; an int applies to every stage, a tuple per stage."""

    min_new_layers: int | tuple[int, ...] = 1
    max_new_layers: int | tuple[int, ...] | None = None
    max_growth_factor: float | None = None
    """Stage i >= 2 adds at most this many layers per existing layer (1.0: at most doubling)."""

    def bounds(self, stage: int, num_stages: int) -> tuple[int, int | None]:
        """(min, max) new layers for a 0-based stage; max None means unbounded."""
        values = []
        for name in ("min_new_layers", "max_new_layers"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                if len(value) != num_stages:
                    raise ConfigError(f"{name}: {len(value)} values given for {num_stages} "
                                      "stages")
                value = value[stage]
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
            values.append(value)
        if self.max_growth_factor is not None and self.max_growth_factor <= 0:
            raise ConfigError(f"max_growth_factor: must be > 0, got {self.max_growth_factor}")
        return values[0], values[1]


NO_CONSTRAINTS = StageConstraints()
DEFAULT_SETTINGS = MemorySettings()


@dataclass(frozen=True, kw_only=True, slots=True)
class StagePlan:
    """The chosen stages, their per-GPU costs and the vanilla (one-stage) baseline."""

    model: ModelConfig
    settings: MemorySettings
    constraints: StageConstraints
    stages: tuple[StageCost, ...]
    vanilla: StageCost

    @property
    def peak_bytes(self) -> int:
        return max(stage.peak_bytes for stage in self.stages)

    @property
    def vanilla_peak_bytes(self) -> int:
        return self.vanilla.peak_bytes

    @property
    def reduction(self) -> float:
        """1 - peak / vanilla peak: the fraction of peak memory STEP saves."""
        return 1.0 - self.peak_bytes / self.vanilla_peak_bytes

    @property
    def splits(self) -> tuple[int, ...]:
        return tuple(stage.num_new_layers for stage in self.stages)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (the `--json` output of tools/plan_stages.py)."""
        return {"memory_model": self.settings.memory_model, "num_stages": len(self.stages),
                "splits": list(self.splits), "stages": [s.as_dict() for s in self.stages],
                "vanilla": self.vanilla.as_dict(), "vanilla_peak_bytes": self.vanilla_peak_bytes,
                "peak_bytes": self.peak_bytes, "reduction": self.reduction,
                "model": dataclasses.asdict(self.model),
                "settings": dataclasses.asdict(self.settings),
                "constraints": dataclasses.asdict(self.constraints)}


@dataclass(frozen=True, kw_only=True, slots=True)
class BudgetPlan:
    """Budget mode's answer: the fewest stages that fit, or the best plan and its shortfall."""

    plan: StagePlan
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.plan.peak_bytes <= self.budget_bytes

    @property
    def shortfall_bytes(self) -> int:
        """Bytes by which the plan's peak exceeds the budget (0 when it fits)."""
        return max(0, self.plan.peak_bytes - self.budget_bytes)

    def as_dict(self) -> dict[str, Any]:
        """The plan's dict plus `budget_bytes`, `fits` and `shortfall_bytes`."""
        return {**self.plan.as_dict(), "budget_bytes": self.budget_bytes, "fits": self.fits,
                "shortfall_bytes": self.shortfall_bytes}


def solve_splits(total_layers: int, num_stages: int, cost: Callable[[int, int], int],
                 constraints: StageConstraints = NO_CONSTRAINTS,
                 min_depth: int = 1) -> tuple[int, ...]:
    """Exact minimax split of `total_layers` into `num_stages` positive stage sizes.

    Args:
        total_layers: L, the final depth.
        num_stages: K >= 1.
        cost: cost(n_i, N_{i-1}) of a stage; only compared, never added.
        constraints: per-stage bounds and the growth limit.
        min_depth: every N_i must be at least this (the PP size), i.e. n_1 >= min_depth.

    Returns:
        (n_1, ..., n_K) minimising max_i cost, the lexicographically largest such tuple.

    Raises:
        ConfigError: bad constraints; InfeasiblePlanError when no split satisfies them.
    """
    if num_stages < 1:
        raise ConfigError(f"num_stages: must be >= 1, got {num_stages}")
    bounds = [constraints.bounds(k, num_stages) for k in range(num_stages)]
    factor = constraints.max_growth_factor

    def candidates(stage: int, depth: int) -> range:
        """New-layer counts allowed for `stage` starting at `depth`."""
        low, high = bounds[stage]
        low = max(low, min_depth) if stage == 0 else low
        high = total_layers - depth if high is None else min(high, total_layers - depth)
        if stage > 0 and factor is not None:
            high = min(high, math.floor(factor * depth))
        return range(low, high + 1)

    # best[k][d]: smallest achievable max cost of stages k..K-1 starting from depth d
    best: list[dict[int, int]] = [{} for _ in range(num_stages)] + [{total_layers: 0}]
    for stage in reversed(range(num_stages)):
        first = min_depth + stage - 1  # stages before this one added >= min_depth + stage - 1
        starts = [0] if stage == 0 else range(first, total_layers - num_stages + stage + 1)
        for depth in starts:
            values = [max(cost(n, depth), best[stage + 1][depth + n])
                      for n in candidates(stage, depth) if depth + n in best[stage + 1]]
            if values:
                best[stage][depth] = min(values)
    if 0 not in best[0]:
        raise InfeasiblePlanError(
            f"num_stages: no split of {total_layers} layers into {num_stages} stages satisfies "
            f"the constraints (first stage >= {min_depth} layers, {constraints})")
    peak, depth, splits = best[0][0], 0, []
    for stage in range(num_stages):
        n = max(n for n in candidates(stage, depth) if depth + n in best[stage + 1]
                and max(cost(n, depth), best[stage + 1][depth + n]) <= peak)
        splits.append(n)
        depth += n
    return tuple(splits)


@functools.lru_cache(maxsize=1 << 16)
def _stage_peak(model: ModelConfig, settings: MemorySettings, num_new: int, num_old: int) -> int:
    """Cached peak bytes of one stage, shared by every K tried in budget mode."""
    return stage_cost(model, num_new, num_old, settings).peak_bytes


def _min_depth(settings: MemorySettings) -> int:
    """Smallest stage depth: each pipeline rank needs a layer (the paper model has no PP)."""
    return 1 if settings.memory_model == "paper" else settings.pipeline_model_parallel_size


def plan_stages(model: ModelConfig, num_stages: int,
                settings: MemorySettings = DEFAULT_SETTINGS,
                constraints: StageConstraints = NO_CONSTRAINTS) -> StagePlan:
    """The memory-optimal K-stage plan for `model` (K=1 is vanilla training).

    Args:
        model: target model; `model.num_layers` is the final depth L.
        num_stages: K, 1 <= K <= L - PP + 1 (the first stage fills every pipeline rank).
        settings: memory model and training setup.
        constraints: limits on the per-stage layer counts.

    Returns:
        The plan minimising the peak over stages (exact), with the vanilla baseline.

    Raises:
        ConfigError: naming the field for impossible settings or more stages than layers;
            InfeasiblePlanError (a ConfigError) when the constraints admit no split.
    """
    settings.validate(model)
    total = model.num_layers
    min_depth = _min_depth(settings)
    if not 1 <= num_stages <= total - min_depth + 1:
        raise ConfigError(f"num_stages: must be in [1, {total - min_depth + 1}] for a "
                          f"{total}-layer model (first stage >= {min_depth} layers), "
                          f"got {num_stages}")
    splits = solve_splits(total, num_stages, functools.partial(_stage_peak, model, settings),
                          constraints, min_depth)
    stages, depth = [], 0
    for n in splits:
        stages.append(stage_cost(model, n, depth, settings))
        depth += n
    return StagePlan(model=model, settings=settings, constraints=constraints,
                     stages=tuple(stages), vanilla=stage_cost(model, total, 0, settings))


def plan_for_budget(model: ModelConfig, budget_bytes: int,
                    settings: MemorySettings = DEFAULT_SETTINGS,
                    constraints: StageConstraints = NO_CONSTRAINTS,
                    max_stages: int = MAX_STAGES) -> BudgetPlan:
    """The smallest K whose optimal per-GPU peak fits `budget_bytes`, or the best plan overall.

    Args:
        model: target model.
        budget_bytes: per-GPU memory budget in bytes.
        settings: memory model and training setup.
        constraints: limits on the per-stage layer counts (ints only: K varies here).
        max_stages: largest K tried (capped by the depth).

    Returns:
        BudgetPlan whose `fits` says whether the plan fits; if none fits, the plan with the
        lowest peak (fewest stages on ties) and its `shortfall_bytes`.

    Raises:
        ConfigError: bad settings or a budget <= 0; InfeasiblePlanError if no K is feasible.
    """
    if budget_bytes <= 0:
        raise ConfigError(f"memory_budget: must be > 0 bytes, got {budget_bytes}")
    settings.validate(model)
    best: StagePlan | None = None
    for num_stages in range(1, min(max_stages, model.num_layers - _min_depth(settings) + 1) + 1):
        try:
            plan = plan_stages(model, num_stages, settings, constraints)
        except InfeasiblePlanError:
            continue
        if plan.peak_bytes <= budget_bytes:
            return BudgetPlan(plan=plan, budget_bytes=budget_bytes)
        if best is None or plan.peak_bytes < best.peak_bytes:
            best = plan
    if best is None:
        raise InfeasiblePlanError(f"num_stages: no K in 1..{max_stages} satisfies the "
                                  f"constraints {constraints}")
    return BudgetPlan(plan=best, budget_bytes=budget_bytes)


def stage_config_dicts(plan: StagePlan, train_steps: int | Sequence[int] = 1000,
                       lora_alpha: float = 16.0) -> list[dict[str, Any]]:
    """The plan as `stages:` items of a run config (config.StageConfig fields).

    Stage 1 trains everything; later stages carry the growth position the plan assumed and the
    LoRA settings for their frozen layers.

    Raises:
        ConfigError: `train_steps` of the wrong length, or LoRA rank 0 with more than one stage
            (training needs adapters on the frozen layers).
    """
    steps = [train_steps] * len(plan.stages) if isinstance(train_steps, int) else train_steps
    if len(steps) != len(plan.stages):
        raise ConfigError(f"train_steps: {len(steps)} values given for {len(plan.stages)} "
                          "stages")
    settings = plan.settings
    if len(plan.stages) > 1 and settings.lora_rank == 0:
        raise ConfigError("lora_rank: must be > 0 in a written plan (STEP adapts the frozen "
                          "layers with LoRA)")
    items: list[dict[str, Any]] = []
    for index, (stage, num_steps) in enumerate(zip(plan.stages, steps, strict=True)):
        item: dict[str, Any] = {"num_layers": stage.num_layers, "train_steps": num_steps}
        if index:
            item["growth"] = {"operator": settings.growth_operator,
                              "position": settings.growth_position}
            item["lora"] = {"rank": settings.lora_rank, "alpha": lora_alpha,
                            "targets": list(settings.lora_targets)}
        items.append(item)
    return items


def check_stage_dicts(plan: StagePlan, items: list[dict[str, Any]]) -> None:
    """Validate stage items exactly as a run config with this plan's model and layout would.

    Raises:
        ConfigError: naming the offending `stages[i]...` field.
    """
    settings = plan.settings
    config_from_dict({
        "out_dir": "plan-check", "model": dataclasses.asdict(plan.model), "stages": items,
        "parallel": {"tensor_model_parallel_size": settings.tensor_model_parallel_size,
                     "pipeline_model_parallel_size": settings.pipeline_model_parallel_size,
                     "use_distributed_optimizer": settings.use_distributed_optimizer,
                     "recompute_activations": settings.recompute_activations},
        "freeze_embeddings_after_stage1": settings.freeze_embeddings_after_stage1})


def write_plan(path: str | Path, plan: StagePlan, *, command: str,
               train_steps: int | Sequence[int] = 1000, lora_alpha: float = 16.0,
               overwrite: bool = False) -> None:
    """Write the plan as YAML with a top-level `stages:` list (a run config's `stages: FILE`).

    The items are validated through config.py first; the file is written to a temporary name
    and renamed, so a reader never sees a partial plan.

    Args:
        path: destination `.yaml` file.
        plan: the plan to write.
        command: how the plan was produced, recorded in the header comment.
        train_steps: planned steps per stage (one value for all, or one per stage).
        lora_alpha: LoRA alpha of the adapted stages.
        overwrite: replace an existing file.

    Raises:
        ConfigError: `write_plan: ...` for an existing file or a missing directory, or a stage
            field the run config would reject.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"write_plan: {str(path)!r} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"write_plan: directory {str(path.parent)!r} does not exist")
    items = stage_config_dicts(plan, train_steps, lora_alpha)
    check_stage_dicts(plan, items)
    header = (f"# STEP stage plan written by: {command}\n"
              f"# memory model {plan.settings.memory_model}: per-GPU peak "
              f"{format_size(plan.peak_bytes)} vs vanilla {format_size(plan.vanilla_peak_bytes)}"
              f" (reduction {plan.reduction:.1%}), splits {list(plan.splits)}\n"
              f"# assumes {describe_settings(plan.model, plan.settings)}\n"
              "# Use it from a run config as `stages: <this file>` with the same layout.\n")
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(header + yaml.safe_dump({"stages": items}, sort_keys=False))
    os.replace(temporary, path)


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def describe_settings(model: ModelConfig, settings: MemorySettings) -> str:
    """One line with what the numbers assume (echoed above every table)."""
    lora = (f"LoRA rank {settings.lora_rank} on {','.join(settings.lora_targets)}"
            if settings.lora_rank else "no LoRA")
    if settings.memory_model == "paper":
        return f"memory model paper (transformer-layer model states only), {lora}"
    parts = [f"memory model full, per GPU: TP={settings.tensor_model_parallel_size} "
             f"PP={settings.pipeline_model_parallel_size} DP={settings.data_parallel_size}",
             settings.params_dtype, f"micro-batch {settings.micro_batch_size} x seq "
             f"{model.seq_length}", lora, f"{settings.attention_backend} attention"]
    flags = ("use_distributed_optimizer", "grad_reduce_in_fp32", "fp8_frozen_storage",
             "recompute_activations", "sequence_parallel", "freeze_embeddings_after_stage1")
    parts += [name for name in flags if getattr(settings, name)]
    if settings.fp8_recipe is not None:
        parts.append(f"FP8 compute ({settings.fp8_recipe})")
    growth = settings.growth_position
    if settings.growth_operator != "interpolation_mean":
        growth = f"{settings.growth_operator} at {growth}"
    return ", ".join(parts) + f", growth {growth}"


def format_plan(plan: StagePlan, title: str) -> str:
    """A plain-text table: one row per stage plus vanilla, sizes in GiB, params in millions."""
    caches = plan.settings.fp8_recipe is not None  # the column only matters with FP8 compute
    header = ("stage", "+layers", "layers", "trainable", "frozen", "adapter", "weights",
              "grads", "master", "adam", "main_grads", "activations",
              *(("fp8_caches",) if caches else ()), "peak", "reduction")
    rows = [header]
    labelled = [(str(i + 1), s) for i, s in enumerate(plan.stages)] + [("vanilla", plan.vanilla)]
    for label, stage in labelled:
        memory = stage.memory
        sizes = (memory.weights, memory.grads, memory.master_weights, memory.optimizer_states,
                 memory.main_grads, memory.activations,
                 *((memory.weight_caches,) if caches else ()), stage.peak_bytes)
        rows.append((label, str(stage.num_new_layers), str(stage.num_layers),
                     _millions(stage.trainable_params), _millions(stage.frozen_params),
                     _millions(stage.adapter_params), *(format_size(v) for v in sizes),
                     f"{1 - stage.peak_bytes / plan.vanilla_peak_bytes:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    footer = (f"{title}: {len(plan.stages)} stages {list(plan.splits)}, peak "
              f"{format_size(plan.peak_bytes)} per GPU vs vanilla "
              f"{format_size(plan.vanilla_peak_bytes)}: reduction {plan.reduction:.1%}")
    return "\n".join([f"{title}: {describe_settings(plan.model, plan.settings)}", *lines,
                      footer])


def format_summary_markdown(rows: Sequence[tuple[str, Sequence[StagePlan]]]) -> str:
    """A Markdown table: one row per (label, plans for several K of one model and memory model).

    Each cell shows the per-GPU peak, the reduction vs vanilla and the splits.
    """
    stage_counts = [len(plan.stages) for plan in rows[0][1]]
    lines = ["| Model | Memory model | Vanilla | "
             + " | ".join(f"STEP K={k}" for k in stage_counts) + " |",
             "|---" * (3 + len(stage_counts)) + "|"]
    for label, plans in rows:
        cells = [f"{format_size(p.peak_bytes)} (-{p.reduction:.1%}; "
                 f"{'+'.join(map(str, p.splits))})" for p in plans]
        lines.append(f"| {label} | {plans[0].settings.memory_model} | "
                     f"{format_size(plans[0].vanilla_peak_bytes)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
