"""Plan STEP stages: how many layers each stage adds, and what each stage costs per GPU.

Give a target model (a preset, or its dimensions) and either a number of stages (--stages K) or a
per-GPU memory budget (--memory-budget 40GiB: the fewest stages that fit). The planner picks the
per-stage layer counts that minimise the peak memory over all stages, exactly, under the paper's
memory model (model states of the transformer layers only) or the full per-GPU model (embeddings,
LoRA, TP/PP/DP sharding, distributed optimizer, FP8 frozen storage, activations). It prints a
table, JSON (--json), a Markdown summary over models and K (--markdown), and can write the stage
list for a run config (--write-plan plan.yaml; then `stages: plan.yaml` in the config).

Examples:
  python tools/plan_stages.py --model llama-368m --stages 3
  python tools/plan_stages.py --model llama2-7b --memory-budget 40GiB --tp 2 --dp 8 \\
      --use-distributed-optimizer --recompute-activations
  python tools/plan_stages.py --model llama-368m --stages 2 --write-plan plan.yaml
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import NoReturn

from megatron_step.cli import Parser, returns_exit_code
from megatron_step.config import (
    LORA_TARGETS,
    MODEL_PRESETS,
    ConfigError,
    ModelConfig,
    load_model_config,
)
from megatron_step.memory import MemorySettings, format_size, parse_size
from megatron_step.plan import (
    MAX_STAGES,
    BudgetPlan,
    StageConstraints,
    StagePlan,
    format_plan,
    format_summary_markdown,
    plan_for_budget,
    plan_stages,
    write_plan,
)

MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "seq_length")
FULL_ONLY = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
             "use_distributed_optimizer", "params_dtype", "grad_reduce_in_fp32",
             "fp8_frozen_storage", "fp8_frozen_block_size", "micro_batch_size",
             "recompute_activations", "sequence_parallel", "attention_backend",
             "freeze_embeddings_after_stage1", "growth_operator", "growth_position", "fp8_recipe")
"""MemorySettings fields the paper model ignores (a warning says so when they are set)."""
FLAG_FOR_FIELD = {"num_stages": "--stages", "model.preset": "--model"}


def _int_list(text: str) -> int | tuple[int, ...]:
    """`N` (every stage) or `N,N,...` (one per stage)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... got {text!r}") from None
    return values[0] if len(values) == 1 else values


def build_parser() -> Parser:
    """The command line; flag names follow the config fields (kebab case)."""
    parser = Parser("plan_stages.py", __doc__)
    model = parser.add_argument_group("target model: a preset, dimensions, or both (overrides)")
    model.add_argument("--model", nargs="+", metavar="PRESET",
                       help=f"preset name(s): {', '.join(MODEL_PRESETS)}")
    for name in MODEL_FIELDS:
        model.add_argument(f"--{name.replace('_', '-')}", type=int, metavar="N")

    mode = parser.add_argument_group("what to plan").add_mutually_exclusive_group(required=True)
    mode.add_argument("--stages", type=int, nargs="+", metavar="K",
                      help="number of stages (several values: one plan each)")
    mode.add_argument("--memory-budget", metavar="SIZE",
                      help="per-GPU budget, e.g. 40GiB, 80GB, 512MiB: the fewest stages that fit")
    limits = parser.add_argument_group("stage constraints")
    limits.add_argument("--max-stages", type=int, default=MAX_STAGES, metavar="K",
                        help="largest K tried in budget mode (default %(default)s)")
    limits.add_argument("--min-new-layers", type=_int_list, default=1, metavar="N[,N...]",
                        help="fewest layers a stage adds: one value, or one per stage")
    limits.add_argument("--max-new-layers", type=_int_list, metavar="N[,N...]",
                        help="most layers a stage adds: one value, or one per stage")
    limits.add_argument("--max-growth-factor", type=float, metavar="F",
                        help="stage i >= 2 adds at most F layers per existing layer")

    memory = parser.add_argument_group("memory model")
    memory.add_argument("--memory-model", nargs="+", choices=("paper", "full"), default=["full"],
                        help="paper: the published formula; full: per-GPU (default)")
    memory.add_argument("--lora-rank", type=int, default=8, metavar="R",
                        help="adapter rank on frozen layers, 0: none (default %(default)s)")
    memory.add_argument("--lora-alpha", type=float, default=16.0, metavar="A",
                        help="LoRA alpha written by --write-plan (default %(default)s)")
    memory.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, default=LORA_TARGETS,
                        metavar="NAME", help=f"adapted linears (default: {' '.join(LORA_TARGETS)})")
    for flag, alias in (("tensor-model-parallel-size", "--tp"),
                        ("pipeline-model-parallel-size", "--pp"),
                        ("data-parallel-size", "--dp")):
        memory.add_argument(f"--{flag}", alias, type=int, default=1, metavar="N")
    memory.add_argument("--use-distributed-optimizer", action="store_true",
                        help="shard fp32 master weights and Adam states over DP")
    memory.add_argument("--params-dtype", choices=("bf16", "fp32"), default="bf16")
    memory.add_argument("--grad-reduce-in-fp32", action=argparse.BooleanOptionalAction,
                        default=True, help="bf16 params: fp32 grad buffer, 4 bytes per trainable "
                        "parameter (default, as precision.grad_reduce_in_fp32); --no-...: 2")
    memory.add_argument("--fp8-frozen-storage", action="store_true",
                        help="frozen linear weights stored in FP8 (1 byte per parameter + "
                        "fp32 scales)")
    memory.add_argument("--fp8-frozen-block-size", type=int, default=0, metavar="N",
                        help="FP8 storage scale per N input elements (default 0: per output "
                        "channel)")
    memory.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "blockwise", "mxfp8"),
                        help="FP8 compute through Transformer Engine (precision.fp8 set, with "
                        "this precision.fp8_recipe): adds TE's FP8 weight caches, 2 bytes per "
                        "linear parameter on Hopper")
    memory.add_argument("--micro-batch-size", type=int, default=1, metavar="N")
    memory.add_argument("--recompute-activations", action="store_true",
                        help="full recompute: keep only each layer's input")
    memory.add_argument("--sequence-parallel", action="store_true")
    memory.add_argument("--attention-backend", choices=("flash", "unfused"), default="flash")
    memory.add_argument("--freeze-embeddings-after-stage1", action="store_true")
    memory.add_argument("--growth-operator", default="interpolation_mean",
                        choices=("interpolation_mean", "copy", "random", "stack"),
                        help="growth operator (stack appends new layers on top)")
    memory.add_argument("--growth-position", default="upper",
                        choices=("upper", "intermediate", "lower", "random"),
                        help="where new layers go; decides their pipeline rank")

    output = parser.add_argument_group("output")
    formats = output.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="one JSON object on stdout")
    formats.add_argument("--markdown", action="store_true",
                         help="one summary row per model and memory model (for the README)")
    output.add_argument("--write-plan", metavar="FILE.yaml",
                        help="write the stage list in the run config's format")
    output.add_argument("--overwrite", action="store_true", help="replace --write-plan's file")
    output.add_argument("--train-steps", type=_int_list, default=1000, metavar="N[,N...]",
                        help="planned steps per stage in --write-plan (default %(default)s)")
    return parser


def _flag(field: str) -> str:
    """The command-line flag for a library field path (`model.hidden_size` -> --hidden-size)."""
    if field in FLAG_FOR_FIELD:
        return FLAG_FOR_FIELD[field]
    if field.startswith("stages"):  # a written stage the run config rejected
        return f"--write-plan: {field}"
    return "--" + field.removeprefix("model.").replace("_", "-")


def _config_error(parser: argparse.ArgumentParser, error: ConfigError) -> NoReturn:
    """Re-word a library error (`field: message`) to name the flag."""
    field, _, message = str(error).partition(": ")
    parser.error(f"{_flag(field)}: {message}")


def _models(args: argparse.Namespace) -> list[tuple[str, ModelConfig]]:
    """(label, config) per --model preset, or one model from the dimension flags."""
    overrides = {name: getattr(args, name) for name in MODEL_FIELDS
                 if getattr(args, name) is not None}
    if not args.model:
        return [("custom", load_model_config(overrides))]
    return [(name, load_model_config({"preset": name, **overrides})) for name in args.model]


def _settings(args: argparse.Namespace, memory_model: str) -> MemorySettings:
    return MemorySettings(
        memory_model=memory_model, lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets),
        **{name: getattr(args, name) for name in FULL_ONLY})


def _warn_ignored(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The paper model counts layers only: say which given flags it ignores."""
    ignored = [_flag(name) for name in FULL_ONLY
               if getattr(args, name) != parser.get_default(name)]
    if "paper" in args.memory_model and ignored:
        print(f"warning: --memory-model paper ignores {', '.join(ignored)}", file=sys.stderr)


def _say_budget(label: str, result: BudgetPlan, max_stages: int, to_stdout: bool) -> int:
    """Print budget mode's verdict; return the exit code (1 when nothing fits)."""
    plan = result.plan
    budget = format_size(result.budget_bytes)
    if result.fits:
        if to_stdout:
            print(f"{label}: K={len(plan.stages)} is the fewest stages that fit the {budget} "
                  f"budget ({format_size(plan.peak_bytes)} per GPU)")
        return 0
    print(f"{label}: no plan with up to {max_stages} stages fits the {budget} budget; the best "
          f"(K={len(plan.stages)}, splits {list(plan.splits)}) needs "
          f"{format_size(plan.peak_bytes)} per GPU, {format_size(result.shortfall_bytes)} over "
          "(no plan file written)", file=sys.stderr)
    return 1


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        budget: int | None) -> None:
    """Reject output options that need a single plan when several were asked for."""
    if args.markdown and budget is not None:
        parser.error("--markdown: needs --stages (one column per K)")
    combos = len(args.model or [None]) * len(args.memory_model) * len(args.stages or [None])
    if combos > 1 and (args.json or args.write_plan):
        parser.error(f"{'--json' if args.json else '--write-plan'}: needs one --model, one "
                     "--memory-model and one --stages value")
    if args.overwrite and not args.write_plan:
        parser.error("--overwrite: only applies with --write-plan")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Plan every requested (model, memory model, K or budget) and print; return the exit code."""
    budget = None
    if args.memory_budget is not None:
        try:
            budget = parse_size(args.memory_budget)
        except ValueError as exc:
            parser.error(f"--memory-budget: {exc}")
    _check_combinations(parser, args, budget)
    _warn_ignored(parser, args)
    constraints = StageConstraints(min_new_layers=args.min_new_layers,
                                   max_new_layers=args.max_new_layers,
                                   max_growth_factor=args.max_growth_factor)
    rows: list[tuple[str, list[StagePlan]]] = []
    results: list[tuple[str, StagePlan | BudgetPlan]] = []
    try:
        for label, model in _models(args):
            for memory_model in args.memory_model:
                settings = _settings(args, memory_model)
                if budget is not None:
                    results.append((label, plan_for_budget(model, budget, settings, constraints,
                                                           args.max_stages)))
                    continue
                rows.append((label, [plan_stages(model, k, settings, constraints)
                                     for k in args.stages]))
                results.extend((label, plan) for plan in rows[-1][1])
        written = results[0][1] if args.write_plan else None
        if isinstance(written, BudgetPlan):  # a plan that misses the budget is not written
            written = written.plan if written.fits else None
        if written is not None:
            write_plan(args.write_plan, written,
                       command=shlex.join(["python", "tools/plan_stages.py", *argv]),
                       train_steps=args.train_steps, lora_alpha=args.lora_alpha,
                       overwrite=args.overwrite)
    except ConfigError as exc:
        _config_error(parser, exc)
    if args.markdown:
        print(format_summary_markdown(rows))
        return 0
    code = 0
    for label, result in results:
        plan = result.plan if isinstance(result, BudgetPlan) else result
        print(json.dumps(result.as_dict(), indent=2) if args.json else format_plan(plan, label))
        if isinstance(result, BudgetPlan):
            code = max(code, _say_budget(label, result, args.max_stages,
                                          to_stdout=not args.json))
    if written is not None:
        print(f"wrote {args.write_plan}", file=sys.stderr)
    return code


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), plan, print; return the exit code.

    0: done; 1: budget mode found no plan that fits; 2: bad arguments (one-line message).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    return _run(parser, parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
