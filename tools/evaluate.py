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

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

FORMATS = ("auto", "jsonl", "blocks", "lines", "wikitext")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evaluate.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="megatron_step checkpoint directory")
    parser.add_argument("--data", required=True, metavar="DATA",
                        help="text or JSONL file, or an indexed dataset prefix")
    parser.add_argument("--tokenizer", metavar="SPEC",
                        help="'byte', a tokenizer.json or a SentencePiece .model (default: the "
                             "checkpoint's data.tokenizer; not needed for indexed datasets)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="how text files split into documents (default: by suffix)")
    parser.add_argument("--json-key", default="text", help="JSONL field with the text")
    parser.add_argument("--max-tokens", type=_positive, metavar="N",
                        help="read at most N tokens of DATA")
    parser.add_argument("--micro-batch-size", type=_positive, default=1, metavar="N")
    parser.add_argument("--tensor-model-parallel-size", "--tp", type=_positive, default=1,
                        metavar="N")
    parser.add_argument("--pipeline-model-parallel-size", "--pp", type=_positive, default=1,
                        metavar="N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights for the forward pass (default %(default)s)")
    parser.add_argument("--output", metavar="FILE.json", help="also write the JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace --output's file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), evaluate, print JSON; return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: report the code instead of exiting
        return exc.code if isinstance(exc.code, int) else 1
    if args.output and Path(args.output).exists() and not args.overwrite:
        return _error(f"--output {args.output!r} exists; pass --overwrite to replace it", 2)
    with warnings.catch_warnings():  # megatron-core's import-time notices (no TE/apex on CPU)
        warnings.simplefilter("ignore")
        from megatron_step.checkpoint import CheckpointError, read_meta, write_json_atomic
        from megatron_step.config import ConfigError, ParallelConfig
        from megatron_step.evaluation import (
            evaluate_checkpoint,
            indexed_prefix,
            read_token_stream,
        )
        from megatron_step.log import quiet_megatron_warnings
        from megatron_step.parallel import destroy_distributed, is_rank0
        from megatron_step.tokenizer import load_tokenizer
    quiet_megatron_warnings()
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    try:
        spec = args.tokenizer
        if spec is None and indexed_prefix(args.data) is None:  # text: the training tokenizer
            spec = read_meta(args.checkpoint).get("run_config", {}).get("data", {}).get(
                "tokenizer")
        if os.environ.get("RANK", "0") == "0":  # before the world exists
            print(f"evaluate: checkpoint={args.checkpoint} data={args.data} tokenizer={spec} "
                  f"format={args.format} max_tokens={args.max_tokens} "
                  f"micro_batch_size={args.micro_batch_size} tp={args.tensor_model_parallel_size}"
                  f" pp={args.pipeline_model_parallel_size} dtype={args.dtype}", file=sys.stderr)
        tokenizer = load_tokenizer(spec) if spec else None
        stream = read_token_stream(args.data, tokenizer, document_format=args.format,
                                   json_key=args.json_key, max_tokens=args.max_tokens)
        result = evaluate_checkpoint(args.checkpoint, stream, parallel=parallel,
                                     params_dtype=args.dtype,
                                     micro_batch_size=args.micro_batch_size,
                                     progress=is_rank0())
        rank0 = is_rank0()
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:
        return _error(str(exc), 1)
    finally:
        destroy_distributed()
    result = {**result, "data": str(args.data),
              "tokenizer": tokenizer.describe() if tokenizer else None}
    if rank0:
        print(json.dumps(result, indent=2))
        if args.output:
            write_json_atomic(Path(args.output), result)
    return 0


def _error(message: str, code: int) -> int:
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
