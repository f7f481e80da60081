"""Import a Hugging Face LLaMA (LlamaForCausalLM directory) as a megatron_step checkpoint.

SRC is a directory with config.json and safetensors weights (single file or sharded with an
index), e.g. from save_pretrained. DST becomes a checkpoint that loads at any TP/PP and counts
as a finished stage 1 (kind "imported", every layer born in stage 1): point a STEP run at it to
grow an existing small model. Weights keep their dtype (fp32 or bf16; fp16 becomes fp32), so
export_hf.py gives back the same tensors bit for bit. Only plain LLaMA is accepted: SiLU MLP,
no biases, RoPE without scaling, head_dim = hidden_size / heads; anything else is refused,
naming the config.json field.

Examples:
  python tools/import_hf.py hf/SmolLM-135M ckpt/smollm --seq-length 2048
  python tools/import_hf.py hf/tiny ckpt/tiny --overwrite

Exit codes: 0 written; 1 SRC unreadable or not a supported LLaMA (DST untouched);
2 bad arguments or DST exists without --overwrite.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_step.cli import Parser, returns_exit_code


def build_parser() -> Parser:
    parser = Parser("import_hf.py", __doc__)
    parser.add_argument("src", metavar="SRC", help="Hugging Face LlamaForCausalLM directory")
    parser.add_argument("dst", metavar="DST", help="megatron_step checkpoint directory to write")
    parser.add_argument("--seq-length", type=int, metavar="N",
                        help="training sequence length (default: max_position_embeddings)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), import, return the exit code (see --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.echo(args)
    if Path(args.dst).exists() and not args.overwrite:
        parser.error(f"DST {args.dst!r} exists; pass --overwrite to replace it")
    from megatron_step.hf import import_checkpoint
    from megatron_step.log import quiet_megatron_warnings
    from megatron_step.parallel import local_world

    quiet_megatron_warnings()
    try:
        with local_world():
            dst, model = import_checkpoint(args.src, args.dst, seq_length=args.seq_length,
                                           overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        return parser.fail(str(exc))
    print(f"wrote {dst}: {model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_attention_heads} heads ({model.query_groups} query groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
