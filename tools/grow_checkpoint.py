"""Grow a STEP stage checkpoint to the next stage's depth, or re-shard/convert it (offline).

Inserts new transformer layers into a megatron_step checkpoint (torch_dist, saved at any TP/PP)
and writes DST as full, unsharded tensors: a layout-independent checkpoint that Megatron's
dist_checkpointing re-shards on load to any TP/PP. --tp/--pp name the layout DST will be loaded
at: they are checked against the grown model (heads divisible by TP, a layer for every pipeline
stage) and recorded in DST's metadata. New layers are recorded as born in the new stage, so the
trainer freezes exactly the old ones. With --num-new-layers 0 the tool only converts/re-shards.
Optimizer state is not carried (a new stage builds a new optimizer).

Operators: interpolation_mean (STEP's Interpolation-Mean: element-wise mean of the two
neighbours, every tensor), copy (the lower neighbour), random (Megatron's init, scaled output
projections), stack (G_stack: repeat the old block on top). Positions: upper (default; the gaps
between the top layers first), intermediate, lower, random (seeded), or comma-separated indices
of the new layers in the grown model. --zero-output zeroes the new layers' attention output and
MLP down projections, so the grown model computes exactly the old function (LLaMA-Pro).

SRC is only read. DST is written to a temporary directory and renamed into place; an existing DST
is replaced only with --overwrite. Checkpoints with unmerged LoRA adapters need --merge-adapters
(W += alpha/rank * B @ A). Runs in one process (the whole model in memory) or under torchrun,
which deals the grown layers round-robin over the ranks (same output, bit for bit).

Exit codes: 0 done (or --dry-run), 2 bad arguments or input (one-line message naming it).

Examples:
  python tools/grow_checkpoint.py ckpt/stage1 ckpt/stage2-init --num-new-layers 2 --tp 2 --pp 2
  python tools/grow_checkpoint.py SRC DST --plan plan.yaml --stage 2 --zero-output --dry-run
  python tools/grow_checkpoint.py SRC DST --num-new-layers 0 --overwrite      # convert only
  torchrun --nproc-per-node 8 tools/grow_checkpoint.py SRC DST --num-layers 32 --tp 8
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from megatron_step.cli import Parser, returns_exit_code

OPERATORS = ("interpolation_mean", "copy", "random", "stack")
POSITIONS = ("upper", "intermediate", "lower", "random")


def _position(text: str) -> str | tuple[int, ...]:
    """A named position or comma-separated layer indices."""
    if text in POSITIONS:
        return text
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(POSITIONS)} or indices "
                                         f"like 2,5, got {text!r}") from None


def build_parser() -> Parser:
    """The command line; flag names follow the config fields (kebab case)."""
    parser = Parser("grow_checkpoint.py", __doc__)
    parser.add_argument("src", metavar="SRC", help="source checkpoint directory (read only)")
    parser.add_argument("dst", metavar="DST", help="destination checkpoint directory")
    depth = parser.add_argument_group("target depth (exactly one)")
    target = depth.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-layers", type=int, metavar="M", help="depth of the grown model")
    target.add_argument("--num-new-layers", type=int, metavar="N",
                        help="layers to insert (0: convert/re-shard only)")
    target.add_argument("--plan", metavar="PLAN.yaml",
                        help="a plan file (tools/plan_stages.py --write-plan): its stage "
                             "--stage gives the depth and the growth settings")
    depth.add_argument("--stage", type=int, metavar="I",
                       help="1-based stage the grown model trains in (default: SRC's stage + 1)")
    growth = parser.add_argument_group("growth (default: the plan stage's, else "
                                       "interpolation_mean at upper)")
    growth.add_argument("--operator", choices=OPERATORS)
    growth.add_argument("--position", type=_position, metavar="POS",
                        help=f"{' | '.join(POSITIONS)} | i,j,...")
    growth.add_argument("--zero-output", action=argparse.BooleanOptionalAction,
                        help="function-preserving: zero the new layers' output projections")
    growth.add_argument("--seed", type=int, help="seed of random positions and random init")
    layout = parser.add_argument_group("layout DST will be loaded at")
    layout.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1, metavar="T")
    layout.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1,
                        metavar="P")
    run = parser.add_argument_group("run")
    run.add_argument("--merge-adapters", action="store_true",
                     help="fold unmerged LoRA adapters into the base weights first")
    run.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    run.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    growth = {name: getattr(args, name) for name in ("operator", "position", "zero_output", "seed")
              if getattr(args, name) is not None}
    return {"num_layers": args.num_layers, "num_new_layers": args.num_new_layers,
            "plan": args.plan, "stage": args.stage, "growth": growth,
            "tensor_model_parallel_size": args.tensor_model_parallel_size,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "merge_adapters": args.merge_adapters, "overwrite": args.overwrite}


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), grow SRC into DST; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_step.checkpoint import CheckpointError
    from megatron_step.growth_offline import describe_job, prepare_growth, run_growth
    from megatron_step.log import quiet_megatron_warnings
    from megatron_step.parallel import is_rank0, local_world

    quiet_megatron_warnings()
    with local_world():
        if is_rank0():
            parser.echo(args, file=sys.stdout)
        try:
            job = prepare_growth(args.src, args.dst, **_job_kwargs(args))
        except (CheckpointError, ValueError) as exc:
            return parser.fail(str(exc), 2)
        if is_rank0():
            print(describe_job(job), flush=True)
        if args.dry_run:
            if is_rank0():
                print("dry run: nothing written")
            return 0
        run_growth(job, progress=not args.no_progress)
        if is_rank0():
            print(f"wrote {job.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
