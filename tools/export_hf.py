"""Export a megatron_step checkpoint as a Hugging Face LlamaForCausalLM directory.

Reads SRC, saved at any TP/PP (verified first: an incomplete or corrupt checkpoint is refused,
naming what is missing), merges unmerged LoRA adapters into the base weights, and writes DST:
config.json (GQA, RoPE base, RMSNorm eps, vocabulary), safetensors weights (q/k/v split from
Megatron's fused, group-interleaved linear_qkv; gate/up from linear_fc1) and, with --tokenizer,
the tokenizer's files. DST appears only when complete; an existing DST needs --overwrite.
The result loads with transformers' LlamaForCausalLM.from_pretrained, lm-eval-harness and vLLM.

Examples:
  python tools/export_hf.py runs/tiny/checkpoints/final hf/tiny
  python tools/export_hf.py ckpt hf/model --dtype bf16 --tokenizer tokenizer.json --overwrite

Exit codes: 0 written; 1 SRC unreadable, incomplete or not convertible (DST untouched);
2 bad arguments or DST exists without --overwrite.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_step.cli import Parser, returns_exit_code


def build_parser() -> Parser:
    parser = Parser("export_hf.py", __doc__)
    parser.add_argument("src", metavar="SRC", help="megatron_step checkpoint directory")
    parser.add_argument("dst", metavar="DST", help="Hugging Face model directory to write")
    parser.add_argument("--dtype", choices=("bf16", "fp32"),
                        help="weight dtype (default: as stored in the checkpoint)")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="'byte', a tokenizer.json or a SentencePiece .model to ship along")
    parser.add_argument("--max-shard-size", default="5GiB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GiB, 500MB (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), export, return the exit code (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.echo(args, dtype=args.dtype or "as stored")
    from megatron_step.checkpoint import CheckpointError
    from megatron_step.hf import export_checkpoint
    from megatron_step.log import quiet_megatron_warnings
    from megatron_step.memory import parse_size
    from megatron_step.parallel import local_world

    quiet_megatron_warnings()
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as exc:
        parser.error(f"--max-shard-size: {exc}")
    if Path(args.dst).exists() and not args.overwrite:
        parser.error(f"DST {args.dst!r} exists; pass --overwrite to replace it")
    try:
        with local_world():
            dst = export_checkpoint(args.src, args.dst, dtype=args.dtype,
                                    tokenizer=args.tokenizer, overwrite=args.overwrite,
                                    max_shard_bytes=max_shard_bytes)
    except (CheckpointError, ValueError, OSError) as exc:
        return parser.fail(str(exc))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
