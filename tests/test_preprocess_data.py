"""tools/preprocess_data.py: a thin, safe command line over data.build_indexed_dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step.data.sources import read_documents
from megatron_step.data.tokenizer import load_tokenizer

from tools import load_tool

tool = load_tool("preprocess_data")


@pytest.fixture(scope="module")
def inputs(wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A WikiText-2 slice (4 articles, plain text) and 40 of its paragraphs as JSONL."""
    root = tmp_path_factory.mktemp("inputs")
    lines, articles = [], 0
    with (wikitext / "train.txt").open(encoding="utf-8") as stream:
        for line in stream:
            articles += line.startswith(" = ") and not line.startswith(" = = ")
            if articles > 4:
                break
            lines.append(line)
    (root / "wiki.txt").write_text("".join(lines))
    paragraphs = [line for line in lines if len(line) > 200][:40]
    (root / "para.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))
    return root / "wiki.txt", root / "para.jsonl"


def _tokens(prefix: Path | str) -> list[int]:
    dataset = IndexedDataset(str(prefix))
    return np.concatenate([dataset[i] for i in range(len(dataset))]).tolist()


def test_help_describes_the_tool(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` exits 0 and shows the module docstring (formats, tokenizers, exit codes).
    Guards against a broken parser and an undocumented command line."""
    assert tool.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--output-prefix PREFIX" in out and "--split-sentences" in out
    assert "Exit codes" in out and "wikitext" in out
    for flag in ("--text-column COLUMN", "--json-key KEY", "--output-shards K|input", "parquet",
                 ".zst"):
        assert flag in out, flag


def test_text_and_jsonl_inputs_become_one_dataset(inputs: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """WikiText articles (--format wikitext applies to the text file; the .jsonl is still read
    as JSONL by its key) are written in input order: the stored ids are the byte encoding of
    every document + EOD. The tool echoes its arguments and reports counts and throughput, and
    leaves no temporary files. Guards against dropped inputs and a silent tool."""
    wiki, jsonl = inputs
    prefix = tmp_path / "out" / "wiki"
    code = tool.main(["--input", str(wiki), str(jsonl), "--output-prefix", str(prefix),
                      "--format", "wikitext", "--json-key", "body"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"output_prefix: {prefix}" in out and "docs/s" in out and "MB/s" in out
    tok = load_tokenizer("byte")
    documents = [*read_documents(wiki, document_format="wikitext"),
                 *read_documents(jsonl, json_key="body")]
    assert len(documents) == 4 + 40
    assert _tokens(prefix) == [i for d in documents for i in (*tok.encode(d), tok.eod)]
    assert sorted(p.name for p in prefix.parent.iterdir()) == \
        ["wiki.bin", "wiki.idx", "wiki.meta.json"]


def test_parquet_shards_from_a_glob_become_one_dataset_each(
        inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A quoted glob over parquet shards (text in --text-column) with --workers 2 and
    --output-shards input writes one dataset per shard, in sorted shard order, each holding
    exactly its rows + EOD; the tool says which glob names them in data.blend. More shards than
    inputs is a usage error. Guards against unexpanded globs, the wrong column and shards
    swapping contents."""
    paragraphs = [json.loads(line)["body"] for line in inputs[1].read_text().splitlines()]
    shards = [paragraphs[:25], paragraphs[25:30], paragraphs[30:]]
    for i, rows in enumerate(shards):
        pq.write_table(pa.table({"content": rows}), tmp_path / f"train-{i:02d}.parquet")
    prefix = tmp_path / "out" / "fwe"
    args = ["--input", str(tmp_path / "train-*.parquet"), "--text-column", "content",
            "--output-prefix", str(prefix), "--workers", "2"]
    assert tool.main([*args, "--output-shards", "4"]) == 2
    assert "--output-shards: 4 is more than the 3 input file(s)" in capsys.readouterr().err
    assert tool.main([*args, "--output-shards", "input"]) == 0
    out = capsys.readouterr().out
    assert f"data.blend path '{prefix}-*'" in out and "3 input file(s) -> 3 dataset(s)" in out
    tok = load_tokenizer("byte")
    for i, rows in enumerate(shards):
        assert _tokens(f"{prefix}-{i:05d}-of-00003") == \
            [t for row in rows for t in (*tok.encode(row), tok.eod)]


def test_trained_bpe_and_sentence_splitting(inputs: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--train-bpe writes PREFIX.tokenizer.json and tokenizes with it (the metadata names it);
    --split-sentences with no installed Punkt model trains one on the corpus and stores more
    sequences than documents; --workers 2 is accepted. Guards against the BPE and the data
    disagreeing and against Punkt needing a download."""
    prefix = tmp_path / "bpe"
    code = tool.main(["--input", str(inputs[0]), "--output-prefix", str(prefix), "--format",
                      "wikitext", "--train-bpe", "600", "--split-sentences", "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Punkt trained on the first" in out
    tok = load_tokenizer(f"{prefix}.tokenizer.json")
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["tokenizer"] == dict(tok.unique_identifiers) and tok.vocab_size == 600
    assert meta["stats"]["documents"] == 4 and meta["stats"]["sequences"] > 40
    assert max(_tokens(prefix)) < 600


def test_refuses_to_overwrite_without_the_flag(inputs: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An existing dataset is left byte-identical unless --overwrite is given (exit 2 naming
    --output-prefix); with --overwrite it is replaced. A failing run with --overwrite keeps the
    old dataset: outputs are renamed into place only at the end. Guards against clobbering a
    dataset by accident or by a crash."""
    wiki, jsonl = inputs
    prefix = tmp_path / "data"
    assert tool.main(["--input", str(jsonl), "--json-key", "body", "--output-prefix",
                      str(prefix)]) == 0
    before = Path(f"{prefix}.bin").read_bytes()
    assert tool.main(["--input", str(wiki), "--output-prefix", str(prefix)]) == 2
    assert "--output-prefix:" in capsys.readouterr().err
    assert Path(f"{prefix}.bin").read_bytes() == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "fine"}\n{"body": broken\n')
    assert tool.main(["--input", str(jsonl), str(bad), "--json-key", "body",
                      "--output-prefix", str(prefix), "--overwrite"]) == 1
    assert Path(f"{prefix}.bin").read_bytes() == before
    assert IndexedDataset.exists(str(prefix)) and not list(tmp_path.glob(".*tmp*"))
    assert tool.main(["--input", str(wiki), "--output-prefix", str(prefix), "--overwrite"]) == 0
    assert Path(f"{prefix}.bin").read_bytes() != before


@pytest.mark.parametrize(("content", "args", "code", "message"), [
    (b"", [], 1, "--input: {path}: no documents"),
    (b'{"text": "a"}\n{"text": "b"}\n{"text": nope}\n', [], 1,
     "--input: {path}:3: not valid JSON"),
    (b'{"body": "a"}\n', [], 1, "--input: {path}:1: no 'text' key"),
    (b"\xff\xfe text\n", [], 1, "--input: {path}:1: not UTF-8 text"),
    (b"fine text\n", ["--tokenizer", "nonexistent.model"], 2,
     "--tokenizer: tokenizer 'nonexistent.model': no such file"),
    (b"fine text\n", ["--workers", "0"], 2, "--workers: must be >= 1"),
], ids=["empty", "bad-json-line", "missing-key", "not-utf8", "bad-tokenizer", "bad-workers"])
def test_bad_input_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     content: bytes, args: list[str], code: int,
                                     message: str) -> None:
    """Bad input exits 1 and bad arguments exit 2, each with one error line naming the argument
    and the file (and line), and nothing is written. Guards against tracebacks, exit code 0 on
    failure, and partial outputs."""
    path = tmp_path / ("in.jsonl" if content.startswith(b"{") else "in.txt")
    path.write_bytes(content)
    prefix = tmp_path / "out"
    assert tool.main(["--input", str(path), "--output-prefix", str(prefix), *args]) == code
    err = capsys.readouterr().err.strip()  # the progress bar may come first
    assert message.format(path=path) in err.splitlines()[-1] and "Traceback" not in err, err
    assert not list(tmp_path.glob("*out*")) and not list(tmp_path.glob(".*tmp*"))


def test_unreadable_input_names_the_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file or a directory given as input is reported (exit 1) before any work.
    Guards against an error only after tokenizing all earlier inputs."""
    for path, problem in ((tmp_path / "missing.txt", "no such file"),
                          (tmp_path, "not a regular file")):
        assert tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "o")]) == 1
        assert f"--input: {path}: {problem}" in capsys.readouterr().err
