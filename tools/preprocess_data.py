"""Tokenize text or JSONL files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Inputs are read in order. JSONL files (*.jsonl, *.json; any name with --format jsonl) hold one
document per line under --json-key; other files are plain text with one document per
blank-line-separated block (--format lines: one per line; --format wikitext: one per WikiText
article, for WikiText-2/103, whose blank lines only surround headings).
Every document ends with the tokenizer's end-of-document token. --split-sentences stores one
sequence per sentence (nltk Punkt: the installed english model, else one trained on the corpus).

Tokenizers: 'byte' (built in, 256 ids, no files), a Hugging Face tokenizer.json (or its
directory), a SentencePiece .model, or --train-bpe N to train an N-token byte-level BPE on the
inputs first (saved as PREFIX.tokenizer.json; use that path as data.tokenizer when training).
Also written: PREFIX.meta.json (tokenizer identity, inputs, counts), checked by the trainer.
Outputs go to temporary names and are renamed into place; existing outputs need --overwrite.

Exit codes: 0 done, 1 unreadable/empty/malformed input, 2 bad arguments or existing output.

Examples:
  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus
  python tools/preprocess_data.py --input ../shared/data/wikitext-2/train.txt --format wikitext \\
      --train-bpe 8192 --output-prefix data/wikitext2-train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_step.cli import Parser, positive_int, returns_exit_code
from megatron_step.data.corpus import DOCUMENT_FORMATS, CorpusError, texts
from megatron_step.data.tokenizer import load_tokenizer, train_bpe


def build_parser() -> Parser:
    """The command line."""
    parser = Parser("preprocess_data.py", __doc__)
    parser.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                        help="text or JSONL files, read in order")
    parser.add_argument("--output-prefix", required=True, type=Path, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default="byte", metavar="byte|PATH",
                           help="'byte', a tokenizer.json (or its directory) or a SentencePiece "
                                ".model (default: byte)")
    tokenizer.add_argument("--train-bpe", type=positive_int, metavar="VOCAB_SIZE",
                           help="train a byte-level BPE with this many ids on the inputs and use "
                                "it (written to PREFIX.tokenizer.json)")
    parser.add_argument("--format", choices=DOCUMENT_FORMATS, default="auto",
                        help="format of plain-text inputs (auto = blocks); jsonl: read "
                             "every input as JSONL (*.jsonl/*.json always are)")
    parser.add_argument("--json-key", default="text", metavar="KEY",
                        help="JSONL field holding the text (default: text)")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one sequence per sentence (nltk Punkt)")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="tokenizer processes (same output for any N; default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _run(parser: Parser, args: argparse.Namespace) -> int:
    from megatron_step.data import build_indexed_dataset

    for name, value in vars(args).items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name}: {shown}")
    try:
        if args.train_bpe is not None:
            path = Path(f"{args.output_prefix}.tokenizer.json")
            print(f"training a {args.train_bpe}-id byte-level BPE on the inputs -> {path}")
            tokenizer = train_bpe(texts(args.input, document_format=args.format,
                                        json_key=args.json_key),
                                  args.train_bpe, path, overwrite=args.overwrite)
        else:
            tokenizer = load_tokenizer(args.tokenizer)
    except CorpusError:
        raise
    except ValueError as exc:  # TokenizerError, or a BPE size below 257
        parser.error(f"--{'train-bpe' if args.train_bpe else 'tokenizer'}: {exc}")
    except FileExistsError as exc:
        parser.error(f"--output-prefix: {exc}")
    print(f"using {tokenizer.describe()}")
    try:
        stats = build_indexed_dataset(
            args.input, args.output_prefix, tokenizer, json_key=args.json_key,
            document_format=args.format, split_sentences=args.split_sentences,
            workers=args.workers, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(f"--output-prefix: {exc}")
    if stats.sentence_splitter:
        print(f"sentence splitter: {stats.sentence_splitter}")
    print(stats.summary())
    print(f"wrote {args.output_prefix}.bin, {args.output_prefix}.idx, "
          f"{args.output_prefix}.meta.json")
    return 0


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), write the dataset; return the exit code."""
    parser = build_parser()
    try:
        return _run(parser, parser.parse_args(argv))
    except CorpusError as exc:
        return parser.fail(f"--input: {exc}")


if __name__ == "__main__":
    sys.exit(main())
