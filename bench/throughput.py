"""Training throughput (tokens/s) of each STEP stage vs vanilla training of the final model.

All models live in one process and train on the same batch (same micro-batch size, sequence length
and number of micro-batches per step): vanilla = the final depth L, all layers trained; STEP stage
i = its N_i layers, the old ones frozen behind LoRA adapters (splits from the paper's planner by
default, as in bench/quality.py; --plan full for the full memory model). Steps are timed in
alternating pairs, vanilla then stage, then stage then vanilla, and so on, so that drift in machine
load (other jobs, clock changes) hits both sides alike; the speed-up of a stage is the median over
pairs of t_vanilla / t_stage, tokens/s come from median step times.

Why a stage is faster than vanilla at the same batch: it has fewer layers (N_i <= L), and a
frozen layer skips its weight-gradient GEMMs: Megatron's parallel linears run
`linear_with_frozen_weight` for weights with requires_grad=False (forward + input gradient, 4
FLOPs per weight and token, instead of 6), while its adapters add small rank-r GEMMs
(6 r (in + out) per linear and token) and no optimizer work on the frozen weights. The expected
speed-up printed next to the measured one is the ratio of GEMM FLOPs per step under that model
(attention scores and output layer included; element-wise work, optimizer and overheads not):
small models on CPUs are overhead-bound, so measured gains fall short of it there.

Writes OUT_DIR/NAME.json, NAME.md and NAME.png (measured vs expected speed-up per stage).

Examples:
  python bench/throughput.py                       # 8-layer hidden-256 LLaMA, K = 2 and 3, CPU
  python bench/throughput.py --model llama-368m --device cuda --params-dtype bf16 \\
      --micro-batch-size 8 --seq-length 1024
  python bench/throughput.py --quick               # tiny model, a few steps (smoke test)
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import common
import torch
from common import Stage
from tqdm import tqdm

from megatron_step.cli import positive_int, returns_exit_code
from megatron_step.config import MODEL_PRESETS, LoraConfig, ModelConfig, PrecisionConfig
from megatron_step.memory import lora_params_per_layer, params_per_layer

SMALL = "small-llama"
"""--model name of common.SMALL_LLAMA (the quality benchmark's model)."""


def step_flops(model: ModelConfig, stage: Stage, lora: LoraConfig, tokens: int) -> int:
    """GEMM FLOPs of one training step of `stage` over `tokens` tokens (module docstring).

    Per token: a trained layer 6 P_lin (forward, input gradient, weight gradient), a frozen one
    4 P_lin + 6 E (its adapters train); attention scores and weighted sum 12 s h per layer
    (forward + backward, the full s x s square as unfused attention computes it); the trained
    output layer 6 V h. Norms, embedding look-ups and the optimizer are left out.
    """
    linear = params_per_layer(model) - 2 * model.hidden_size
    adapter = lora_params_per_layer(model, lora.rank, lora.targets)
    attention = 12 * model.seq_length * model.num_attention_heads * model.head_dim
    per_token = (stage.num_new * 6 * linear + stage.num_old * (4 * linear + 6 * adapter)
                 + stage.num_layers * attention + 6 * model.vocab_size * model.hidden_size)
    return per_token * tokens


def _timed_step(entry: tuple[list[torch.nn.Module], Any], batches: list[dict]) -> float:
    from megatron_step.forward import train_step

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    train_step(*entry, batches)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model: ModelConfig, stages: Sequence[Stage], args: Any) -> dict[Stage, dict]:
    """Alternating timed pairs (vanilla, stage) for every stage; raw times per side."""
    precision = PrecisionConfig(params_dtype=args.params_dtype,
                                fp8_frozen_storage=args.fp8_frozen_storage)
    lora = LoraConfig(rank=args.lora_rank)
    vanilla = Stage(0, model.num_layers)
    common.start_world(model, model.num_layers)
    built = {stage: common.build_stage(model, stage, precision, lora)
             for stage in [vanilla, *stages]}
    batches = common.random_microbatches(model, args.micro_batch_size, args.num_microbatches)
    for entry in built.values():
        for _ in range(args.warmup):
            _timed_step(entry, batches)
    times = {}
    total = len(stages) * args.steps
    with tqdm(total=total, desc="timed pairs", unit="pair") as bar:
        for stage in stages:
            pairs = []
            for index in range(args.steps):
                order = (vanilla, stage) if index % 2 == 0 else (stage, vanilla)
                seconds = {side: _timed_step(built[side], batches) for side in order}
                pairs.append((seconds[vanilla], seconds[stage]))
                bar.update(1)
            times[stage] = pairs
    return times


def summarize(model: ModelConfig, plans: dict[int, list[Stage]],
              times: dict[Stage, list[tuple[float, float]]], args: Any, command: str
              ) -> dict[str, Any]:
    """JSON result: per stage tokens/s of both sides, measured and expected speed-up."""
    lora = LoraConfig(rank=args.lora_rank)
    tokens = args.micro_batch_size * args.num_microbatches * model.seq_length
    vanilla = Stage(0, model.num_layers)
    rows = []
    for num_stages, stages in plans.items():
        for index, stage in enumerate(stages, start=1):
            pairs = times[stage]
            vanilla_s = statistics.median(v for v, _ in pairs)
            stage_s = statistics.median(s for _, s in pairs)
            rows.append({
                "num_stages": num_stages, "stage": index, "num_old": stage.num_old,
                "num_new": stage.num_new, "pairs": len(pairs),
                "vanilla_tokens_per_s": tokens / vanilla_s,
                "stage_tokens_per_s": tokens / stage_s,
                "speedup": statistics.median(v / s for v, s in pairs),
                "expected_speedup": step_flops(model, vanilla, lora, tokens)
                / step_flops(model, stage, lora, tokens),
                "step_seconds": {"vanilla": [v for v, _ in pairs],
                                 "stage": [s for _, s in pairs]}})
    return {"benchmark": "throughput", "model_name": args.model,
            "model": dataclasses.asdict(model), "device": args.device,
            "params_dtype": args.params_dtype, "lora_rank": args.lora_rank,
            "fp8_frozen_storage": args.fp8_frozen_storage,
            "micro_batch_size": args.micro_batch_size,
            "num_microbatches": args.num_microbatches, "tokens_per_step": tokens,
            "plan": args.plan,
            "torch_threads": torch.get_num_threads(), "command": command, "stages": rows}


def to_markdown(result: dict[str, Any]) -> str:
    """Table of tokens/s and speed-ups, with what the expected number assumes."""
    model = result["model"]
    rows = [[f"K={r['num_stages']} stage {r['stage']}", f"{r['num_old']}+{r['num_new']}",
             f"{r['vanilla_tokens_per_s']:,.0f}", f"{r['stage_tokens_per_s']:,.0f}",
             f"{r['speedup']:.2f}x", f"{r['expected_speedup']:.2f}x", r["pairs"]]
            for r in result["stages"]]
    table = common.markdown_table(
        ["stage", "layers old+new", "vanilla tokens/s", "stage tokens/s", "measured speed-up",
         "expected (GEMM FLOPs)", "timed pairs"], rows)
    storage = (", frozen linears stored in FP8 (de-quantized per layer)"
               if result.get("fp8_frozen_storage") else "")
    return (f"#### Throughput: {result['model_name']} ({model['num_layers']} layers, hidden "
            f"{model['hidden_size']}), {result['params_dtype']}{storage}, "
            f"{result['tokens_per_step']} "
            f"tokens per step (micro-batch {result['micro_batch_size']} x "
            f"{result['num_microbatches']} x sequence {model['seq_length']}), LoRA rank "
            f"{result['lora_rank']}, measured on {result['device']} "
            f"({result['torch_threads']} threads)\n\n`{result['command']}`\n\n"
            f"Splits: the optimal plan under the {result['plan']} memory model. "
            f"Vanilla = all {model['num_layers']} layers trained; speed-up = median over "
            f"alternating pairs of t_vanilla / t_stage. Expected: GEMM FLOPs of vanilla / "
            f"stage, where a frozen layer skips its weight-gradient GEMMs (4 instead of 6 "
            f"FLOPs per weight and token) and its adapters add 6 r (in + out) per linear.\n\n"
            f"{table}\n")


def plot(result: dict[str, Any], path: Any) -> None:
    """Measured and expected speed-up of every stage over vanilla."""
    plt = common.pyplot()
    rows = result["stages"]
    labels = [f"K={r['num_stages']} s{r['stage']}\n{r['num_old']}+{r['num_new']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows)), 3.6))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["expected_speedup"] for r in rows], 0.4,
           label="expected (GEMM FLOPs)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("speed-up over vanilla (tokens/s)")
    ax.set_title(f"{result['model_name']}: STEP stage throughput ({result['device']})",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    common.save_figure(fig, path)


def _parse(argv: Sequence[str]) -> tuple[Any, Any]:
    parser = common.make_parser("throughput.py", __doc__, "throughput", "paper")
    parser.add_argument("--model", default=SMALL, choices=[SMALL, *sorted(MODEL_PRESETS)],
                        help=f"{SMALL} (8 layers, hidden 256) or a preset (default: {SMALL})")
    parser.add_argument("--stages", type=positive_int, nargs="+", default=[2, 3], metavar="K",
                        help="STEP plans whose stages are timed (default: 2 3)")
    parser.add_argument("--seq-length", type=positive_int,
                        help="override the model's sequence length")
    parser.add_argument("--micro-batch-size", type=positive_int, default=8)
    parser.add_argument("--num-microbatches", type=positive_int, default=1)
    parser.add_argument("--params-dtype", choices=("bf16", "fp32"), default="fp32",
                        help="fp32 by default: CPUs run bf16 matmuls slowly")
    parser.add_argument("--lora-rank", type=positive_int, default=8)
    parser.add_argument("--fp8-frozen-storage", action="store_true",
                        help="frozen linears stored in FP8, de-quantized per layer (the cost of "
                        "precision.fp8_frozen_storage)")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed pairs per stage")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, K=2, 2 pairs, 1 warm-up step")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.stages, args.steps, args.warmup = "tiny", [2], 2, 1
        args.micro_batch_size = min(args.micro_batch_size, 2)
    return parser, args


def run(argv: list[str]) -> int:
    """The benchmark; raises SystemExit on usage errors."""
    from megatron_step.parallel import destroy_distributed

    common.quiet_warnings()
    parser, args = _parse(argv)
    parser.echo(args)
    try:
        common.check_device(args.device, in_process=True)
        base = common.SMALL_LLAMA if args.model == SMALL else MODEL_PRESETS[args.model]
        model = dataclasses.replace(base, seq_length=args.seq_length or base.seq_length)
        model.validate("--model")
        precision = PrecisionConfig(params_dtype=args.params_dtype,
                                fp8_frozen_storage=args.fp8_frozen_storage)
        settings = common.memory_settings(precision, LoraConfig(rank=args.lora_rank),
                                          args.micro_batch_size, args.plan)
        plans = {k: common.stages_from_splits(common.plan_splits(model, k, settings))
                 for k in dict.fromkeys(args.stages)}
        paths = common.output_paths(args.out_dir, args.name, (".json", ".md", ".png"),
                                    args.overwrite)
    except ValueError as exc:  # BenchError, ConfigError
        common.usage_error(parser, exc, "--model/--stages")
    stages = list(dict.fromkeys(s for plan in plans.values() for s in plan))
    try:
        times = measure(model, stages, args)
    finally:
        destroy_distributed()
    result = summarize(model, plans, times, args, common.command_line("throughput.py", argv))
    common.write_results(paths, result, to_markdown(result), plot,
                         "throughput" if args.update_readme else None)
    return 0


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for usage errors)."""
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
