"""Validation loss and perplexity of a megatron_step checkpoint on held-out text, as JSON.

DATA is a text file, a JSONL file or an indexed dataset (`<prefix>.bin/.idx` from
tools/preprocess_data.py; give the prefix). Documents are tokenized and closed with EOD, joined,
cut into non-overlapping windows of the model's seq_length + 1 tokens and every label token is
scored; loss is the mean negative log-likelihood per token (nats), perplexity = exp(loss).
The exact definition is in megatron_step/evaluation.py. Unmerged LoRA adapters count.

Runs in one process by default; under torchrun it evaluates at --tp x --pp (the rest of the
world is data parallel) with the same result. Output: one JSON object on stdout (rank 0)
with loss, perplexity, tokens, checkpoint, data, tokenizer and layout; --output also writes it
to a file.

Examples:
  python tools/evaluate.py runs/tiny/checkpoints/final --data valid.jsonl --tokenizer byte
  torchrun --nproc_per_node 4 tools/evaluate.py ckpt --data data/valid --tp 2 --pp 2

Exit codes: 0 done; 1 bad checkpoint or data (message names it); 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megatron_step.cli import Parser, positive_int, returns_exit_code

FORMATS = ("auto", "jsonl", "blocks", "lines", "wikitext")


def build_parser() -> Parser:
    parser = Parser("evaluate.py", __doc__)
    parser.add_argument("checkpoint", metavar="CKPT", help="megatron_step checkpoint directory")
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="text or JSONL file, or an indexed dataset prefix")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="'byte', a tokenizer.json or a SentencePiece .model (default: the "
                             "checkpoint's data.tokenizer; not needed for indexed datasets)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="how text files split into documents (default: by suffix)")
    parser.add_argument("--json-key", default="text", help="JSONL field with the text")
    parser.add_argument("--max-tokens", type=positive_int, metavar="N",
                        help="read at most N tokens of DATA")
    parser.add_argument("--micro-batch-size", type=positive_int, default=1, metavar="N")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=positive_int, default=1,
                        metavar="N")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=positive_int, default=1,
                        metavar="N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights for the forward pass (default %(default)s)")
    parser.add_argument("--output", metavar="FILE.json", help="also write the JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output's file")
    return parser


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), evaluate, print JSON; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output!r} exists; pass --overwrite to replace it")
    from megatron_step.checkpoint import CheckpointError, read_meta, write_json_atomic
    from megatron_step.config import ConfigError, ParallelConfig
    from megatron_step.data.tokenizer import load_tokenizer
    from megatron_step.evaluation import evaluate_checkpoint, indexed_prefix, read_token_stream
    from megatron_step.log import quiet_megatron_warnings
    from megatron_step.parallel import destroy_distributed, is_rank0

    quiet_megatron_warnings()
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    try:
        spec = args.tokenizer
        if spec is None and indexed_prefix(args.data) is None:  # text: the training tokenizer
            spec = read_meta(args.checkpoint).get("run_config", {}).get("data", {}).get(
                "tokenizer")
        if os.environ.get("RANK", "0") == "0":  # before the world exists
            parser.echo(args, tokenizer=spec)
        tokenizer = load_tokenizer(spec) if spec else None
        stream = read_token_stream(args.data, tokenizer, document_format=args.format,
                                   json_key=args.json_key, max_tokens=args.max_tokens)
        result = evaluate_checkpoint(args.checkpoint, stream, parallel=parallel,
                                     params_dtype=args.dtype,
                                     micro_batch_size=args.micro_batch_size,
                                     progress=is_rank0())
        rank0 = is_rank0()
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        return parser.fail(str(exc))
    finally:
        destroy_distributed()
    result = {**result, "data": str(args.data),
              "tokenizer": tokenizer.describe() if tokenizer else None}
    if rank0:
        print(json.dumps(result, indent=2))
        if args.output:
            write_json_atomic(Path(args.output), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
