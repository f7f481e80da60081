"""Show what a megatron_step checkpoint holds and verify that all of it is there.

Prints the kind, stage and steps, the model config, the layer provenance (the stage each layer
was born in, where it came from, trainable or frozen + LoRA in the saved stage), adapters, the
layout it was saved at and every tensor's shape, all read from metadata without loading tensor
data. It then says whether the checkpoint is complete: metadata files present and readable,
every shard file the index references present and long enough, every tensor the model needs
indexed with the right shape. --deep also reads all tensor data and rejects NaN/inf values.

Examples:
  python tools/inspect_checkpoint.py runs/tiny/checkpoints/stage2
  python tools/inspect_checkpoint.py ckpt --json | jq .layers

Exit codes: 0 complete; 1 incomplete or corrupt (each problem names the missing or damaged
file or tensor); 2 bad arguments.
"""

from __future__ import annotations

import json
import sys

from megatron_step.cli import Parser, returns_exit_code


def build_parser() -> Parser:
    parser = Parser("inspect_checkpoint.py", __doc__)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--deep", action="store_true",
                        help="also read every tensor (slow for big models)")
    return parser


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), inspect, print; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.echo(args)
    from megatron_step.inspection import describe_checkpoint, format_description
    from megatron_step.log import quiet_megatron_warnings
    from megatron_step.parallel import local_world

    quiet_megatron_warnings()
    with local_world():  # only the deep check reads tensors, through a process group
        description = describe_checkpoint(args.checkpoint, deep=args.deep)
    print(json.dumps(description, indent=2) if args.json else format_description(description))
    for problem in description["problems"]:
        parser.fail(problem)
    return 0 if description["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
