"""Measured training memory of every STEP stage vs the planner and vs vanilla training.

For a target model and K = 1, 2, 3, ... stages (splits from the planner, megatron_step.plan, with
the full memory model unless --plan paper), each stage's real model is built (old layers frozen +
LoRA, new layers, embeddings), wrapped in Megatron DDP + Adam exactly as the trainer does, and one
real training step is run on random tokens. Then it measures
(megatron_step.metrics.measure_model_state): parameter bytes by dtype, DDP gradient buffers, fp32
master weights and Adam states; and the peak: CUDA max allocated on GPU, process peak RSS on CPU
(both also as the increase over the level before the model was built). Each stage is measured in a
fresh process (peak RSS is a per-process high-water mark) under an address-space limit (--memory-
limit). The planner predicts the same stages with both memory models: `paper` (transformer layers
only, 16 / 2 bytes per trainable / frozen parameter) and `full` (embeddings, LoRA, fp32 grad
buffer, activations).

K = 1 is vanilla training; the reduction of a plan is 1 - (its largest stage) / vanilla.

Writes OUT_DIR/NAME.json, NAME.md (tables) and NAME.png (bars per stage and plan).

Examples:
  python bench/memory.py --model tiny --stages 1 2 3
  python bench/memory.py --model llama-368m --stages 1 2 3 --seq-length 128
  python bench/memory.py --model llama-1.2b --stages 1 2 3 --device cuda --seq-length 1024
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from common import Stage
from tqdm import tqdm

from megatron_step.cli import positive_int, returns_exit_code
from megatron_step.config import (
    MODEL_PRESETS,
    LoraConfig,
    ModelConfig,
    PrecisionConfig,
    model_preset,
)
from megatron_step.memory import parse_size, stage_cost

PAPER_HEADLINE = ("The paper (Yano et al., NAACL 2025) reports peak-memory reductions of up to "
                  "53.9% (and 42.3%, 42.2% for its other model sizes) under its model-state-only "
                  "formula.")
BYTE_FIELDS = ("weights", "grads", "master_weights", "optimizer_states", "model_state_bytes")


def measure_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one stage, run one training step, measure; `spec` as made by `_spec`."""
    from megatron_step.forward import train_step
    from megatron_step.metrics import measure_model_state, peak_memory_bytes
    from megatron_step.parallel import destroy_distributed

    model = ModelConfig(**spec["model"])
    stage = Stage(*spec["stage"])
    common.start_world(model, stage.num_layers)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            baseline = common.current_rss_bytes()
        ddp, optimizer = common.build_stage(model, stage, _precision(spec),
                                            LoraConfig(rank=spec["lora_rank"]))
        step = common.random_microbatches(model, spec["micro_batch_size"], 1)
        result = train_step(ddp, optimizer, step)
        if result["skipped"]:
            raise RuntimeError(f"the training step was skipped (loss {result['loss']}): no Adam "
                               "state to measure")
        dtypes: dict[str, int] = {}
        for param in ddp[0].module.parameters():
            key = str(param.dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + param.numel() * param.element_size()
        return {**measure_model_state(ddp, optimizer), "weights_by_dtype": dtypes,
                "peak_bytes": peak_memory_bytes() if spec["isolated"] else None,
                "baseline_bytes": baseline, "loss": result["loss"]}
    finally:
        destroy_distributed()


def _spec(model: ModelConfig, stage: Stage, args: Any, isolated: bool) -> dict[str, Any]:
    return {"model": dataclasses.asdict(model), "stage": [stage.num_old, stage.num_new],
            "params_dtype": args.params_dtype, "lora_rank": args.lora_rank,
            "fp8_frozen_storage": args.fp8_frozen_storage,
            "fp8_frozen_block_size": args.fp8_frozen_block_size,
            "micro_batch_size": args.micro_batch_size, "isolated": isolated}


def _precision(spec: dict[str, Any]) -> PrecisionConfig:
    return PrecisionConfig(params_dtype=spec["params_dtype"],
                           fp8_frozen_storage=spec["fp8_frozen_storage"],
                           fp8_frozen_block_size=spec["fp8_frozen_block_size"])


def _stage_row(model: ModelConfig, stage: Stage, settings: dict[str, Any],
               measured: dict[str, Any] | None) -> dict[str, Any]:
    full = stage_cost(model, stage.num_new, stage.num_old, settings["full"])
    paper = stage_cost(model, stage.num_new, stage.num_old, settings["paper"])
    if measured is None:  # --planned-vanilla: too large to measure here; the planner's numbers
        measured = {"model_state_bytes": full.memory.model_state_bytes, "peak_bytes": None,
                    "baseline_bytes": 0, "planned": True}
    peak = measured["peak_bytes"]
    return {"num_old": stage.num_old, "num_new": stage.num_new, "num_layers": stage.num_layers,
            "frozen_layers": stage.frozen_layers,
            "predicted_full": full.memory.as_dict(), "predicted_paper": paper.memory.as_dict(),
            "measured": {**measured,
                         "peak_increase_bytes": None if peak is None
                         else peak - measured["baseline_bytes"]},
            "model_state_ratio": measured["model_state_bytes"]
            / full.memory.model_state_bytes}


def _reduction(stages: Sequence[dict[str, Any]], vanilla: dict[str, Any], *keys: str
               ) -> float | None:
    """1 - max over stages / vanilla of the value at `keys` (None when unmeasured)."""
    def value(row: dict[str, Any]) -> float | None:
        for key in keys:
            row = row[key]
        return row

    values = [value(row) for row in stages]
    if any(v is None for v in values) or value(vanilla) is None:
        return None
    return 1.0 - max(values) / value(vanilla)


def assemble(model_name: str, model: ModelConfig, args: Any, plans: dict[int, list[Stage]],
             measured: dict[Stage, dict[str, Any]], settings: dict[str, Any],
             command: str) -> dict[str, Any]:
    """The JSON result: per-plan stage rows, reductions vs vanilla, settings and command."""
    vanilla = _stage_row(model, Stage(0, model.num_layers), settings,
                         measured.get(Stage(0, model.num_layers)))
    result_plans = []
    for num_stages, stages in plans.items():
        rows = [_stage_row(model, stage, settings, measured[stage]) for stage in stages]
        result_plans.append({
            "num_stages": num_stages, "splits": [s.num_new for s in stages], "stages": rows,
            "reduction": {
                "paper_model": _reduction(rows, vanilla, "predicted_paper", "model_state_bytes"),
                "full_model_state": _reduction(rows, vanilla, "predicted_full",
                                               "model_state_bytes"),
                "measured_model_state": _reduction(rows, vanilla, "measured",
                                                   "model_state_bytes"),
                "full_peak": _reduction(rows, vanilla, "predicted_full", "peak_bytes"),
                "measured_peak_increase": _reduction(rows, vanilla, "measured",
                                                     "peak_increase_bytes")}})
    ratios = [row["model_state_ratio"] for plan in result_plans for row in plan["stages"]]
    return {"benchmark": "memory", "model_name": model_name, "model": dataclasses.asdict(model),
            "device": args.device, "params_dtype": args.params_dtype,
            "fp8_frozen_storage": args.fp8_frozen_storage,
            "fp8_frozen_block_size": args.fp8_frozen_block_size,
            "lora_rank": args.lora_rank, "micro_batch_size": args.micro_batch_size,
            "isolated": not args.no_isolate, "plan": args.plan, "command": command,
            "vanilla": vanilla,
            "plans": result_plans,
            "max_model_state_error": max(abs(r - 1.0) for r in ratios)}


def to_markdown(result: dict[str, Any]) -> str:
    """Two tables: every stage (predicted vs measured), every plan (reductions vs vanilla)."""
    peak_name = ("CUDA max allocated increase" if result["device"] == "cuda"
                 else "peak RSS increase")
    storage = ""
    if result.get("fp8_frozen_storage"):
        block = result["fp8_frozen_block_size"]
        storage = (", frozen linears stored in FP8 (E4M3, one scale per "
                   f"{'output channel' if not block else f'{block} input elements'})")
    title = (f"#### Memory: {result['model_name']} ({result['model']['num_layers']} layers, "
             f"hidden {result['model']['hidden_size']}), {result['params_dtype']}{storage}, "
             f"sequence {result['model']['seq_length']}, micro-batch "
             f"{result['micro_batch_size']}, LoRA rank {result['lora_rank']}, measured on "
             f"{result['device']}")
    vanilla_note = ""
    if result["vanilla"]["measured"].get("planned"):
        vanilla_note = (" Vanilla (K=1) is too large to train on this machine: its row is the "
                        "full model's prediction, which equals the measured model state to "
                        "the byte wherever both exist (every stage above).")
    stage_rows = []
    for plan in result["plans"]:
        for index, row in enumerate(plan["stages"], start=1):
            measured = row["measured"]
            stage_rows.append([
                f"K={plan['num_stages']} stage {index}", f"{row['num_old']}+{row['num_new']}",
                common.mib(row["predicted_paper"]["model_state_bytes"]),
                common.mib(row["predicted_full"]["model_state_bytes"]),
                common.mib(measured["model_state_bytes"]),
                f"{100 * (row['model_state_ratio'] - 1):+.2f}%",
                common.mib(row["predicted_full"]["peak_bytes"]),
                common.mib(measured["peak_increase_bytes"])])
    stages = common.markdown_table(
        ["stage", "layers old+new", "paper model", "full model", "measured", "measured vs full",
         "full model peak", f"measured {peak_name}"], stage_rows)
    plan_rows = []
    for plan in result["plans"]:
        reduction = plan["reduction"]
        plan_rows.append([f"K={plan['num_stages']}", "+".join(map(str, plan["splits"])),
                          common.percent(reduction["paper_model"]),
                          common.percent(reduction["full_model_state"]),
                          common.percent(reduction["measured_model_state"]),
                          common.percent(reduction["full_peak"]),
                          common.percent(reduction["measured_peak_increase"])])
    plans = common.markdown_table(
        ["plan", "new layers per stage", "paper model", "full model (model state)",
         "measured model state", "full model (peak)", f"measured ({peak_name})"], plan_rows)
    return (f"{title}\n\n`{result['command']}`\n\nSplits: the optimal plan under the "
            f"{result['plan']} memory model. Per stage, MiB. Model state = weights + "
            f"gradient buffers + fp32 master weights + Adam states (megatron_step.metrics); the "
            f"paper model counts transformer layers only.\n\n{stages}\n\nReduction of the "
            f"largest stage vs vanilla (K=1).{vanilla_note} {PAPER_HEADLINE}\n\n{plans}\n\n"
            f"Largest "
            f"|measured / full-model prediction - 1| over all stages: "
            f"{100 * result['max_model_state_error']:.3f}%.\n")


def plot(result: dict[str, Any], path: Path) -> None:
    """One panel per plan: predicted and measured bytes of each stage, and vanilla."""
    plt = common.pyplot()
    plans = result["plans"]
    fig, axes = plt.subplots(1, len(plans), figsize=(4.5 * len(plans), 3.8), squeeze=False)
    series = [("paper model", "predicted_paper", "model_state_bytes"),
              ("full model", "predicted_full", "model_state_bytes"),
              ("measured model state", "measured", "model_state_bytes"),
              ("measured peak increase", "measured", "peak_increase_bytes")]
    for ax, plan in zip(axes[0], plans, strict=True):
        vanilla = [] if plan["num_stages"] == 1 else [result["vanilla"]]  # K=1 is vanilla
        rows = [*plan["stages"], *vanilla]
        labels = [f"stage {i}\n{r['num_old']}+{r['num_new']}"
                  for i, r in enumerate(plan["stages"], start=1)] + ["vanilla"] * len(vanilla)
        width = 0.8 / len(series)
        for offset, (name, group, key) in enumerate(series):
            values = [(row[group][key] or 0) / 2**20 for row in rows]
            ax.bar([i + (offset - 1.5) * width for i in range(len(rows))], values, width,
                   label=name)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(f"K={plan['num_stages']}", fontsize=10)
        ax.set_ylabel("MiB")
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(series), fontsize=8)
    fig.suptitle(f"{result['model_name']}: memory per stage ({result['device']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    common.save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> Any:
    parser = common.make_parser("memory.py", __doc__, "memory_MODEL", "full")
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS),
                        help="model preset (megatron_step.config; default: tiny)")
    parser.add_argument("--stages", type=positive_int, nargs="+", default=[1, 2, 3], metavar="K",
                        help="numbers of stages to plan and measure (default: 1 2 3)")
    parser.add_argument("--seq-length", type=positive_int,
                        help="override the preset's sequence length")
    parser.add_argument("--micro-batch-size", type=positive_int, default=1)
    parser.add_argument("--params-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--lora-rank", type=positive_int, default=8)
    parser.add_argument("--fp8-frozen-storage", action="store_true",
                        help="store the frozen layers' linears in FP8 (precision."
                        "fp8_frozen_storage); the planner predicts the same")
    parser.add_argument("--fp8-frozen-block-size", type=int, default=0, metavar="N",
                        help="FP8 storage: one scale per N input elements (default 0: per "
                        "output channel)")
    parser.add_argument("--planned-vanilla", action="store_true",
                        help="do not train vanilla (K=1); compare against the planner's "
                        "vanilla model state (for models too large for this machine)")
    parser.add_argument("--memory-limit", type=parse_size, default="20GiB",
                        help="address-space limit of each CPU measurement process "
                             "(default: 20GiB)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per measurement process (default: 1800)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="measure every stage in this process (fast; model-state bytes only, "
                             "no peak)")
    args = parser.parse_args(argv)
    if args.name == "memory_MODEL":
        args.name = f"memory_{args.model}{'_fp8' if args.fp8_frozen_storage else ''}"
    return parser, args


def run(argv: list[str]) -> int:
    """The benchmark (or, with --worker, one measurement); raises SystemExit on usage errors."""
    common.quiet_warnings()
    parser, args = _parse(argv)
    if args.worker:
        return common.serve_worker(args.worker, measure_stage)
    parser.echo(args)
    try:
        common.check_device(args.device, in_process=args.no_isolate)
        overrides = {"seq_length": args.seq_length} if args.seq_length else {}
        model = model_preset(args.model, **overrides)
        precision = _precision(vars(args))
        lora = LoraConfig(rank=args.lora_rank)
        settings = {kind: common.memory_settings(precision, lora, args.micro_batch_size, kind)
                    for kind in ("full", "paper")}
        plans = {k: common.stages_from_splits(common.plan_splits(model, k,
                                                                 settings[args.plan]))
                 for k in dict.fromkeys(args.stages)}
        paths = common.output_paths(args.out_dir, args.name, (".json", ".md", ".png"),
                                    args.overwrite)
    except ValueError as exc:  # BenchError, ConfigError
        common.usage_error(parser, exc, "--model/--stages")
    vanilla = [] if args.planned_vanilla else [Stage(0, model.num_layers)]
    todo = list(dict.fromkeys([*vanilla, *[s for stages in plans.values() for s in stages]]))
    measured = {}
    for stage in tqdm(todo, desc="stages", unit="stage"):
        spec = _spec(model, stage, args, isolated=not args.no_isolate)
        if args.no_isolate:
            measured[stage] = measure_stage(spec)
        else:
            measured[stage] = common.run_isolated(Path(__file__), spec, device=args.device,
                                                  memory_limit=args.memory_limit,
                                                  timeout=args.timeout)
        tqdm.write(f"stage {stage.label}: model state "
                   f"{common.mib(measured[stage]['model_state_bytes'])} MiB, peak "
                   f"{common.mib(measured[stage]['peak_bytes'])} MiB")
    result = assemble(args.model, model, args, plans, measured, settings,
                      common.command_line("memory.py", argv))
    readme_key = f"memory-{args.model}{'-fp8' if args.fp8_frozen_storage else ''}"
    common.write_results(paths, result, to_markdown(result), plot,
                         readme_key if args.update_readme else None)
    return 0


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for usage errors)."""
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
