"""Tokenize text, JSONL or parquet files into Megatron indexed datasets (PREFIX.bin + PREFIX.idx).

Inputs (--input, files or quoted globs such as 'fineweb-edu/data/*.parquet', read in order):
  *.parquet                  one document per row, the string column --text-column (default text;
                             FineWeb-Edu's); read with pyarrow in record batches, never a whole
                             file in memory
  *.jsonl, *.json            one JSON object per line, the text under --json-key (default text);
  (+ .gz, .zst)              any non-parquet file with --format jsonl
  other files (+ .gz, .zst)  plain text: one document per blank-line-separated block
                             (--format lines: one per line; --format wikitext: one per WikiText
                             article, for WikiText-2/103, whose blank lines only surround headings)
A malformed input stops the run with one line naming the file and line (or parquet row), and
nothing is written. Every document ends with the tokenizer's end-of-document token.
--split-sentences stores one sequence per sentence (nltk Punkt: the installed english model, else
one trained on the corpus).

Throughput: --workers N tokenizes in N processes; inputs are cut into chunks of whole documents
(about 1 MB, or 256 parquet rows), so one long file spreads over all workers too. The output is
byte-identical for every N.

Outputs: one dataset PREFIX, or with --output-shards K the inputs cut into K runs of consecutive
files of about equal size, written as PREFIX-00000-of-0000K ... (--output-shards input: one
dataset per input file). In a run config, name them all with a glob:
  data.blend: [{path: 'PREFIX-*', weight: 1.0}]
Also written per dataset: .meta.json (tokenizer identity, inputs with sha256, counts), checked by
the trainer. Outputs go to temporary names and are renamed into place only when all are complete;
existing outputs need --overwrite (which also removes shards of an earlier run of PREFIX).

Tokenizers: 'byte' (built in, 256 ids, no files), a Hugging Face tokenizer.json (or its
directory), a SentencePiece .model, or --train-bpe N to train an N-token byte-level BPE on the
inputs first (saved as PREFIX.tokenizer.json; use that path as data.tokenizer when training).

Exit codes: 0 done, 1 unreadable/empty/malformed input, 2 bad arguments or existing output.

Examples:
  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus
  python tools/preprocess_data.py --input 'fineweb-edu/sample/10BT/*.parquet' \\
      --tokenizer tokenizer.model --workers 32 --output-shards input --output-prefix data/fwe
  python tools/preprocess_data.py --input ../shared/data/wikitext-2/train.txt --format wikitext \\
      --train-bpe 8192 --output-prefix data/wikitext2-train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_step.cli import Parser, positive_int, returns_exit_code
from megatron_step.data.sources import DOCUMENT_FORMATS, CorpusError, expand_inputs, texts
from megatron_step.data.tokenizer import load_tokenizer, train_bpe


def output_shards(text: str) -> int | str:
    """argparse type: a count >= 1, or 'input' (one dataset per input file)."""
    return text if text == "input" else positive_int(text)


def build_parser() -> Parser:
    """The command line."""
    parser = Parser("preprocess_data.py", __doc__)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE|GLOB",
                        help="input files or quoted globs, read in order")
    parser.add_argument("--output-prefix", required=True, type=Path, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json (or shards)")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default="byte", metavar="byte|PATH",
                           help="'byte', a tokenizer.json (or its directory) or a SentencePiece "
                                ".model (default: byte)")
    tokenizer.add_argument("--train-bpe", type=positive_int, metavar="VOCAB_SIZE",
                           help="train a byte-level BPE with this many ids on the inputs and use "
                                "it (written to PREFIX.tokenizer.json)")
    parser.add_argument("--format", choices=DOCUMENT_FORMATS, default="auto",
                        help="format of plain-text inputs (auto = blocks); jsonl: read "
                             "every non-parquet input as JSONL (*.jsonl/*.json always are)")
    parser.add_argument("--json-key", default="text", metavar="KEY",
                        help="JSONL field holding the text (default: text)")
    parser.add_argument("--text-column", default="text", metavar="COLUMN",
                        help="parquet column holding the text (default: text)")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one sequence per sentence (nltk Punkt)")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="N",
                        help="tokenizer processes (same output for any N; default 1)")
    parser.add_argument("--output-shards", type=output_shards, default=1, metavar="K|input",
                        help="K datasets from K runs of consecutive input files, or one per "
                             "input file (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _run(parser: Parser, args: argparse.Namespace) -> int:
    from megatron_step.data.indexed import build_indexed_dataset

    for name, value in vars(args).items():
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name}: {shown}")
    inputs = expand_inputs(args.input)
    shards = len(inputs) if args.output_shards == "input" else args.output_shards
    if shards > len(inputs):
        parser.error(f"--output-shards: {shards} is more than the {len(inputs)} input file(s)")
    print(f"{len(inputs)} input file(s) -> {shards} dataset(s)")
    try:
        if args.train_bpe is not None:
            path = Path(f"{args.output_prefix}.tokenizer.json")
            print(f"training a {args.train_bpe}-id byte-level BPE on the inputs -> {path}")
            tokenizer = train_bpe(texts(inputs, document_format=args.format,
                                        json_key=args.json_key, text_column=args.text_column),
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
            inputs, args.output_prefix, tokenizer, json_key=args.json_key,
            text_column=args.text_column, document_format=args.format,
            split_sentences=args.split_sentences, workers=args.workers, output_shards=shards,
            overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(f"--output-prefix: {exc}")
    if stats.sentence_splitter:
        print(f"sentence splitter: {stats.sentence_splitter}")
    print(stats.summary())
    if len(stats.prefixes) == 1:
        print(f"wrote {args.output_prefix}.bin, {args.output_prefix}.idx, "
              f"{args.output_prefix}.meta.json")
    else:
        print(f"wrote {len(stats.prefixes)} datasets {stats.prefixes[0]} ... "
              f"{stats.prefixes[-1]} (.bin, .idx, .meta.json); use them all as "
              f"data.blend path '{args.output_prefix}-*'")
    return 0


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), write the dataset(s); return the exit code."""
    parser = build_parser()
    try:
        return _run(parser, parser.parse_args(argv))
    except CorpusError as exc:
        return parser.fail(f"--input: {exc}")


if __name__ == "__main__":
    sys.exit(main())
