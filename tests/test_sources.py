"""Inputs as they come (parquet, JSONL .gz/.zst, text, globs) and the indexed datasets made from
them: same documents whatever the format, byte-identical output for any number of workers,
sharded outputs, and malformed shards that name file and row and leave nothing behind."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step.data import sources
from megatron_step.data.corpus import to_jsonl
from megatron_step.data.indexed import build_indexed_dataset, group_inputs, read_dataset_meta
from megatron_step.data.sources import CorpusError, expand_inputs, read_documents
from megatron_step.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def documents(wikitext: Path) -> list[str]:
    """45 WikiText-2 articles (valid split), non-ASCII text included."""
    texts = list(read_documents(wikitext / "valid.txt", document_format="wikitext"))[:45]
    return [*texts[:44], texts[44] + "Gr\u00fc\u00dfe \u6226\u5834 \U0001f642\n"]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of ~8 KB / 4 parquet rows, so a few articles spread over all workers."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 8_000)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 4)


def _parquet(path: Path, texts: list[str], column: str = "text", row_group_size: int = 5
             ) -> Path:
    table = pa.table({"id": [f"doc-{i}" for i in range(len(texts))], column: texts,
                      "score": [float(i) for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _zst(path: Path, data: bytes, frames: int = 1) -> Path:
    """zstd file of `frames` concatenated frames (as `zstd` writes for appended files)."""
    step = -(-len(data) // frames)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(data[i:i + step])
                              for i in range(0, len(data), step)))
    return path


def _gz(path: Path, data: bytes, members: int = 1) -> Path:
    step = -(-len(data) // members)
    path.write_bytes(b"".join(gzip.compress(data[i:i + step]) for i in range(0, len(data), step)))
    return path


def _jsonl(texts: list[str], key: str = "text") -> bytes:
    return to_jsonl(texts, key).encode()


def _stored(prefix: str | Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [np.concatenate([dataset[i] for i in range(a, b)]).tolist()
            for a, b in zip(dataset.document_indices[:-1], dataset.document_indices[1:],
                            strict=True)]


def test_every_input_format_reads_the_same_documents(documents: list[str], tmp_path: Path,
                                                      small_chunks: None) -> None:
    """Parquet (text in a column named by text_column, other columns ignored, several row
    groups and record batches), JSONL plain / gzip (several members) / zstd (several frames),
    and blank-line text gzip-compressed all read back as exactly the written documents, in
    order. Globs expand sorted. Guards against lost rows at batch, frame or member boundaries
    and against a format reading another column or key."""
    blocks = [line for text in documents[:5] for line in text.splitlines(keepends=True)
              if len(line) > 80]
    files = {
        "a.parquet": (_parquet(tmp_path / "a.parquet", documents, column="content"),
                      {"text_column": "content"}),
        "b.jsonl": ((tmp_path / "b.jsonl"), {}),
        "c.jsonl.gz": (_gz(tmp_path / "c.jsonl.gz", _jsonl(documents), members=3), {}),
        "d.jsonl.zst": (_zst(tmp_path / "d.jsonl.zst", _jsonl(documents, "body"), frames=3),
                        {"json_key": "body"}),
    }
    files["b.jsonl"][0].write_bytes(_jsonl(documents))
    for name, (path, options) in files.items():
        assert list(read_documents(path, **options)) == documents, name
    text = _gz(tmp_path / "e.txt.gz", "\n".join(blocks).encode())
    assert list(read_documents(text)) == blocks
    assert expand_inputs([str(tmp_path / "*.json*"), tmp_path / "a.parquet"]) == [
        tmp_path / "b.jsonl", tmp_path / "c.jsonl.gz", tmp_path / "d.jsonl.zst",
        tmp_path / "a.parquet"]


def test_output_is_byte_identical_for_any_number_of_workers(
        documents: list[str], tmp_path: Path, small_chunks: None) -> None:
    """A parquet + .jsonl.gz + .jsonl.zst corpus cut into ~30 chunks gives the same .bin and
    .idx bytes as one plain JSONL of the same documents, with 1, 2 or 3 tokenizer processes
    (chunks of one file spread over all workers); the counts add up. Guards against worker
    scheduling changing document order and against chunk boundaries dropping documents."""
    thirds = [documents[:15], documents[15:30], documents[30:]]
    inputs = [_parquet(tmp_path / "a.parquet", thirds[0]),
              _gz(tmp_path / "b.jsonl.gz", _jsonl(thirds[1])),
              _zst(tmp_path / "c.jsonl.zst", _jsonl(thirds[2]))]
    (tmp_path / "all.jsonl").write_bytes(_jsonl(documents))
    tok = load_tokenizer("byte")
    reference = build_indexed_dataset([tmp_path / "all.jsonl"], tmp_path / "ref", tok,
                                      progress=False)
    for workers in (1, 2, 3):
        stats = build_indexed_dataset(inputs, tmp_path / f"w{workers}", tok, workers=workers,
                                      progress=False)
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"w{workers}{suffix}").read_bytes() == \
                (tmp_path / f"ref{suffix}").read_bytes(), (workers, suffix)
        assert (stats.documents, stats.tokens, stats.text_bytes) == \
            (reference.documents, reference.tokens, reference.text_bytes)
        assert stats.input_bytes == sum(path.stat().st_size for path in inputs)
    assert reference.text_bytes == sum(len(text.encode()) for text in documents)
    assert not list(tmp_path.glob(".*tmp*"))


def test_output_shards_follow_the_inputs(documents: list[str], tmp_path: Path) -> None:
    """output_shards = number of inputs writes one dataset per input (its documents only, its
    own metadata); K < inputs groups consecutive files by size. Existing shards are refused
    without overwrite; with it, shards of the earlier run that the new one does not write are
    removed (a `prefix-*` glob must not pick up stale data). Guards against shards mixing
    inputs and against a blend glob silently training on a previous run's shards."""
    assert group_inputs([10, 10, 10], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert group_inputs([100, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert group_inputs([1, 1, 1, 1, 1, 1], 2) == [range(0, 3), range(3, 6)]
    with pytest.raises(ValueError, match=r"output shards: must be in \[1, 2\]"):
        group_inputs([1, 1], 3)
    parts = [documents[:10], documents[10:12], documents[12:30]]
    inputs = [tmp_path / f"in{i}.jsonl" for i in range(3)]
    for path, texts in zip(inputs, parts, strict=True):
        path.write_bytes(_jsonl(texts))
    tok = load_tokenizer("byte")
    prefix = tmp_path / "out" / "corpus"
    stats = build_indexed_dataset(inputs, prefix, tok, output_shards=3, progress=False)
    assert stats.prefixes == tuple(f"{prefix}-{i:05d}-of-00003" for i in range(3))
    for shard, texts, path in zip(stats.prefixes, parts, inputs, strict=True):
        assert _stored(shard) == [[*tok.encode(text), tok.eod] for text in texts]
        meta = read_dataset_meta(shard)
        assert meta["shard"] == {"index": stats.prefixes.index(shard), "count": 3}
        assert [item["path"] for item in meta["inputs"]] == [str(path)]
    with pytest.raises(FileExistsError, match="corpus-00000-of-00003.bin"):
        build_indexed_dataset(inputs, prefix, tok, output_shards=2, progress=False)
    two = build_indexed_dataset(inputs, prefix, tok, output_shards=2, progress=False,
                                overwrite=True)
    assert sorted(p.name for p in prefix.parent.iterdir()) == sorted(
        f"corpus-{i:05d}-of-00002{suffix}" for i in range(2)
        for suffix in (".bin", ".idx", ".meta.json"))
    groups = group_inputs([path.stat().st_size for path in inputs], 2)
    assert [sum(map(_stored, two.prefixes), [])] == [[[*tok.encode(text), tok.eod]
                                                      for text in documents[:30]]]
    assert [len(_stored(shard)) for shard in two.prefixes] == \
        [sum(len(parts[i]) for i in group) for group in groups]
    with pytest.raises(CorpusError, match="is also an output"):
        build_indexed_dataset([Path(two.prefixes[0] + ".bin")], prefix, tok, overwrite=True)


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-20])
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_malformed_shard_names_file_and_row_and_writes_nothing(
        documents: list[str], tmp_path: Path, small_chunks: None, workers: int) -> None:
    """Each bad shard, placed last after good ones and written as its own output shard, stops
    the build with a CorpusError naming the file and the line or row (null parquet value in a
    later record batch, missing or non-string column, not parquet at all, bad JSON line inside
    a .zst, truncated .gz / .zst); no output or temporary file is left, and an existing dataset
    at the prefix stays byte-identical. With 2 workers the JSONL error is raised in a worker.
    Guards against half-written shard sets and errors that do not say where."""
    tok = load_tokenizer("byte")
    good = tmp_path / "good.jsonl"
    good.write_bytes(_jsonl(documents[:5]))
    prefix = tmp_path / "out" / "data"
    build_indexed_dataset([good], prefix, tok, progress=False)
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    nulls = [*documents[:13], None, *documents[14:20]]
    lines = _jsonl(documents[:30]).splitlines(keepends=True)
    lines[26] = b'{"text": "unterminated}\n'
    cases = {
        "nulls.parquet": (_parquet(tmp_path / "nulls.parquet", nulls), "row 14: 'text' is null"),
        "other.parquet": (_parquet(tmp_path / "other.parquet", documents[:3], column="body"),
                          "no column 'text' (columns: id, body, score)"),
        "numbers.parquet": (pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
                            or tmp_path / "n.parquet", "column 'text' holds int64, not strings"),
        "garbage.parquet": (tmp_path / "garbage.parquet", "not a readable parquet file"),
        "bad.jsonl.zst": (_zst(tmp_path / "bad.jsonl.zst", b"".join(lines), frames=2),
                          "bad.jsonl.zst:27: not valid JSON"),
        "cut.jsonl.zst": (_truncated(_zst(tmp_path / "cut.jsonl.zst", _jsonl(documents))),
                          "truncated zst file"),
        "cut.jsonl.gz": (_truncated(_gz(tmp_path / "cut.jsonl.gz", _jsonl(documents))),
                         "truncated gz file"),
    }
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 but not really" * 10)
    for name, (path, message) in cases.items():
        with pytest.raises(CorpusError, match=re.escape(message)) as info:
            build_indexed_dataset([good, path], prefix, tok, workers=workers, output_shards=2,
                                  overwrite=True, progress=False)
        assert str(path) in str(info.value), name
        assert {p.name: p.read_bytes() for p in prefix.parent.iterdir()} == before, name
    with pytest.raises(CorpusError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.missing")])
    with pytest.raises(CorpusError, match="given more than once"):
        expand_inputs([good, str(tmp_path / "good.*")])
    assert json.loads((prefix.parent / "data.meta.json").read_text())["inputs"][0]["path"] == \
        str(good)
