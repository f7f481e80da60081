"""Preprocessing throughput: tools/preprocess_data.py at 1 and 2 workers, 32k SentencePiece and 32k
byte-level BPE, side by side with Megatron-LM's own tools/preprocess_data.py on the same input.

Input: WikiText-2 train as JSONL, one article per line, repeated --repeat times (the only large
text on a machine without network; FineWeb-Edu documents are shorter on average, so per-document
overhead weighs a little more there). Tokenizers, trained once on the input and cached in
--work-dir: a 32,000-piece SentencePiece BPE (eos = end of document) and a 32,000-id byte-level
BPE tokenizer.json (megatron_step.data.tokenizer.train_bpe).

Each configuration runs as its own process, one after the other; reported are
- wall: the whole command, Python and megatron-core imports included (what a user waits for);
- MB/s and tokens/s over that wall time (MB = input JSONL bytes, as Megatron-LM counts them);
- build: our tool's own timer (reading, tokenizing, writing, hashing the inputs for the
  metadata), i.e. without the ~5 s of imports.
With --megatron-lm DIR (a Megatron-LM checkout, e.g. tag core_v0.16.1, the megatron-core version
installed here) and --megatron-python PY (an interpreter that can import its megatron.training:
it needs triton on top of torch, numpy, sentencepiece, transformers, nltk), Megatron-LM's tool
runs on the same JSONL with the same tokenizers (GPTSentencePieceTokenizer; HuggingFaceTokenizer
on a directory with the tokenizer.json), --append-eod, and the same worker counts; the table
also says whether its .bin/.idx are byte-identical to ours.

No timing is asserted anywhere (tests/test_bench.py runs --quick and checks the files). Numbers
from a shared machine vary with its load: the load average before and after each run is
recorded.

Examples:
  python bench/preprocess.py --megatron-lm /path/to/Megatron-LM --megatron-python /venv/bin/python
  python bench/preprocess.py --quick            # 300 KB, 1k-id tokenizers: a smoke test
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

from megatron_step.cli import Parser, positive_int, returns_exit_code

TOOL = common.REPO / "tools" / "preprocess_data.py"
WIKITEXT = common.REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"
SECTION = "preprocess"


def build_parser() -> Parser:
    parser = Parser("preprocess.py", __doc__)
    parser.add_argument("--wikitext", type=Path, default=WIKITEXT,
                        help="WikiText-2 train.txt (default: ../shared/data/wikitext-2)")
    parser.add_argument("--repeat", type=positive_int, default=2,
                        help="copies of WikiText-2 train in the input (default: 2, ~22 MB)")
    parser.add_argument("--vocab-size", type=positive_int, default=32000,
                        help="size of both tokenizers (default: 32000)")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2],
                        help="worker counts to run (default: 1 2)")
    parser.add_argument("--megatron-lm", type=Path, metavar="DIR",
                        help="Megatron-LM checkout whose tools/preprocess_data.py to run too")
    parser.add_argument("--megatron-python", default=sys.executable, metavar="PY",
                        help="interpreter for Megatron-LM's tool (default: this one)")
    parser.add_argument("--work-dir", type=Path, default=Path("bench_work") / "preprocess",
                        help="input, tokenizers and outputs (default: bench_work/preprocess)")
    parser.add_argument("--quick", action="store_true",
                        help="300 KB of input and 1,000-id tokenizers (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--name", default="preprocess")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--update-readme", action="store_true",
                        help="also copy the Markdown result into bench/README.md")
    return parser


def make_input(args: Any, work: Path) -> tuple[Path, list[str]]:
    """WikiText-2 train articles as JSONL, `repeat` times (cut to ~1 MB with --quick), and the
    articles of one copy."""
    from megatron_step.data.corpus import to_jsonl
    from megatron_step.data.sources import read_documents

    articles = list(read_documents(args.wikitext, document_format="wikitext"))
    text = to_jsonl(articles) * args.repeat
    if args.quick:
        text = text[:text.index("\n", 300_000) + 1]
        articles = [json.loads(line)["text"] for line in text.splitlines()]
    path = work / "input.jsonl"
    if not path.is_file() or path.read_text() != text:
        common.write_text_atomic(path, text)
    return path, articles


def make_tokenizers(articles: list[str], vocab: int, work: Path) -> dict[str, Path]:
    """A SentencePiece BPE model and a byte-level BPE tokenizer.json of `vocab` ids trained on
    `articles` (cached in `work`)."""
    import sentencepiece

    from megatron_step.data.tokenizer import train_bpe

    sp_prefix = work / f"sp{vocab}"
    if not Path(f"{sp_prefix}.model").is_file():
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(articles), model_prefix=str(sp_prefix), vocab_size=vocab,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            max_sentence_length=1 << 20, num_threads=os.cpu_count(), minloglevel=2)
    bpe_dir = work / f"bpe{vocab}"
    if not (bpe_dir / "tokenizer.json").is_file():
        train_bpe(articles, vocab, bpe_dir / "tokenizer.json")
    # Megatron-LM's HuggingFaceTokenizer loads the directory with AutoTokenizer
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return {"sentencepiece": Path(f"{sp_prefix}.model"), "byte-level BPE": bpe_dir}


def _load() -> float:
    return os.getloadavg()[0]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], env: dict[str, str] | None = None
           ) -> tuple[float, float, str]:
    """(wall s, CPU s of the command and the worker processes it waited for, stdout)."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    if done.returncode != 0:
        raise common.BenchError(f"{' '.join(command[:3])}... failed ({done.returncode}):\n"
                                f"{(done.stdout + done.stderr)[-3000:]}")
    return wall, cpu, done.stdout


def run_ours(data: Path, tokenizer: Path, workers: int, prefix: Path) -> dict[str, Any]:
    spec = str(tokenizer / "tokenizer.json") if tokenizer.is_dir() else str(tokenizer)
    before = _load()
    wall, cpu, _ = _timed([sys.executable, str(TOOL), "--input", str(data), "--tokenizer", spec,
                      "--workers", str(workers), "--output-prefix", str(prefix),
                      "--overwrite"])
    stats = json.loads(Path(f"{prefix}.meta.json").read_text())["stats"]
    return {"tool": "megatron_step", "workers": workers, "wall_s": wall, "cpu_s": cpu,
            "build_s": stats["seconds"], "tokens": stats["tokens"],
            "documents": stats["documents"], "load_before": before, "load_after": _load(),
            "bin": f"{prefix}.bin", "idx": f"{prefix}.idx"}


def run_megatron(args: Any, data: Path, kind: str, tokenizer: Path, workers: int,
                 prefix: Path) -> dict[str, Any]:
    tokenizer_args = (["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
                       str(tokenizer)] if kind == "sentencepiece" else
                      ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                       str(tokenizer)])
    env = {**os.environ, "PYTHONPATH": str(args.megatron_lm)}
    before = _load()
    wall, cpu, out = _timed([args.megatron_python, str(args.megatron_lm / "tools" /
                                                  "preprocess_data.py"),
                        "--input", str(data), "--output-prefix", str(prefix), "--workers",
                        str(workers), "--append-eod", "--json-keys", "text", *tokenizer_args],
                       env=env)
    startup = next((float(line.split()[-1]) for line in out.splitlines()
                    if line.startswith("Time to startup")), None)
    base = f"{prefix}_text_document"
    return {"tool": "Megatron-LM", "workers": workers, "wall_s": wall, "cpu_s": cpu,
            "build_s": None,
            "startup_s": startup, "load_before": before, "load_after": _load(),
            "bin": f"{base}.bin", "idx": f"{base}.idx"}


def _version(checkout: Path | None) -> str | None:
    """`<checkout> (megatron-core X.Y.Z)` from the checkout's package_info.py."""
    if checkout is None:
        return None
    info: dict[str, Any] = {}
    exec((checkout / "megatron" / "core" / "package_info.py").read_text(), info)
    return f"{checkout} (megatron-core {info['__version__']})"


def markdown(result: dict[str, Any], argv: list[str]) -> str:
    rows = []
    for run in result["runs"]:
        same = run.get("identical_to_ours")
        rows.append([run["tool"], run["tokenizer"], run["workers"], f"{run['wall_s']:.1f}",
                     f"{run['cpu_s']:.1f}", f"{result['input_mb'] / run['cpu_s']:.2f}",
                     f"{result['input_mb'] / run['wall_s']:.2f}",
                     f"{run['tokens_total'] / run['wall_s']:,.0f}",
                     "-" if run["build_s"] is None else f"{run['build_s']:.1f}",
                     "-" if run["build_s"] is None
                     else f"{result['input_mb'] / run['build_s']:.2f}",
                     "-" if same is None else ("yes" if same else "NO"),
                     f"{run['load_before']:.1f} / {run['load_after']:.1f}"])
    header = ["tool", "tokenizer", "workers", "wall s", "CPU s", "MB per CPU s", "MB/s (wall)",
              "tokens/s (wall)", "build s", "MB/s (build)", "same bytes as ours",
              "load avg before / after"]
    return (f"#### Preprocessing throughput: {result['input_mb']:.1f} MB of JSONL "
            f"({result['documents']:,} documents), {result['vocab_size']:,}-id tokenizers, "
            f"{result['cpus']} CPUs\n\n"
            f"`{common.command_line('preprocess.py', argv)}`\n\n"
            f"{common.markdown_table(header, rows)}\n\n"
            f"Machine: {result['machine']}; Megatron-LM: {result['megatron_lm'] or 'not run'}. "
            "Wall = the whole command with its imports; CPU = user + system seconds of the "
            "command and its worker processes (less sensitive to other jobs than wall time); "
            "build = our tool's own timer (read + tokenize + write + hash the inputs). Load "
            "average = 1-minute load of the machine before and after the run (other jobs share "
            "it).\n")


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not args.wikitext.is_file():
            raise common.BenchError(f"--wikitext: {args.wikitext} does not exist")
        if args.megatron_lm is not None and not (args.megatron_lm / "tools" /
                                                 "preprocess_data.py").is_file():
            raise common.BenchError(f"--megatron-lm: {args.megatron_lm} has no "
                                    "tools/preprocess_data.py")
        paths = common.output_paths(args.out_dir, args.name, (".json", ".md"), args.overwrite)
    except common.BenchError as exc:
        parser.error(str(exc))
    vocab = 1000 if args.quick else args.vocab_size
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data, articles = make_input(args, work)
    tokenizers = make_tokenizers(articles, vocab, work)
    runs = []
    for kind, tokenizer in tokenizers.items():
        for workers in args.workers:
            out = work / "out" / f"ours-{kind[:4]}-w{workers}"
            ours = run_ours(data, tokenizer, workers, out)
            runs.append({**ours, "tokenizer": kind, "tokens_total": ours["tokens"]})
            print(f"megatron_step {kind} workers={workers}: {ours['wall_s']:.1f} s")
            if args.megatron_lm is not None:
                theirs = run_megatron(args, data, kind, tokenizer, workers,
                                      work / "out" / f"mlm-{kind[:4]}-w{workers}")
                same = all(Path(theirs[k]).read_bytes() == Path(ours[k]).read_bytes()
                           for k in ("bin", "idx"))
                runs.append({**theirs, "tokenizer": kind, "tokens_total": ours["tokens"],
                             "identical_to_ours": same})
                print(f"Megatron-LM {kind} workers={workers}: {theirs['wall_s']:.1f} s, "
                      f"identical: {same}")
    result = {"input_mb": data.stat().st_size / 1e6, "documents": runs[0]["documents"],
              "vocab_size": vocab, "cpus": os.cpu_count(), "runs": runs,
              "machine": f"{platform.processor() or platform.machine()}, Python "
                         f"{platform.python_version()}",
              "megatron_lm": _version(args.megatron_lm)}
    text = markdown(result, argv)
    common.write_json(paths[".json"], result)
    common.write_text_atomic(paths[".md"], text)
    if args.update_readme:
        common.update_readme(SECTION, text)
    print(text)
    print(f"wrote {paths['.json']}, {paths['.md']}")
    shutil.rmtree(work / "out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
