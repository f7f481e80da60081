"""Input files as they come: plain text, JSONL (plain, .gz or .zst), parquet, named by globs.

A *document* is the unit that ends with an end-of-document token (EOD) in the indexed dataset.
The format of a file follows its name (a trailing `.gz` or `.zst`/`.zstd` means compressed):
- `*.parquet`: one document per row, the string column `text_column` ("text" by default, as in
  FineWeb-Edu). Read with pyarrow in record batches of PARQUET_BATCH_ROWS rows and only that
  column, never a whole file in memory. A null value is an error.
- `*.jsonl`, `*.json` (`.gz`, `.zst` too), and every non-parquet file with format "jsonl": one
  JSON object per line with the text under `json_key` ("text" by default); blank lines are
  ignored, records whose text is whitespace only are skipped (and counted).
- other files (`.gz`, `.zst` too): plain text, format "blocks" (what "auto" means for them):
  documents separated by blank lines; "lines": every non-blank line; "wikitext": one document
  per WikiText article (a top-level heading line ` = Title = ` starts one; use it for
  WikiText-2/103, whose blank lines only surround headings). Plain-text documents are exact
  slices of the file (newlines kept).
Text is UTF-8. Errors are `CorpusError`s naming the file and the line or row (counted from 1).
Compressed streams are checked to their end: a truncated .gz or .zst file is an error, never a
silently shorter corpus.

Chunks. `read_chunks` cuts a file into chunks of whole documents of about CHUNK_BYTES input
bytes, the unit of work of tokenizer processes (`corpus.encode_chunks`). JSONL chunks carry raw
lines (workers parse them, so the reading process only splits lines); text and parquet chunks
carry document texts. Chunking never changes what is written: documents keep input order.
"""

from __future__ import annotations

import glob
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

DocumentFormat = Literal["auto", "jsonl", "blocks", "lines", "wikitext"]
DOCUMENT_FORMATS: tuple[str, ...] = ("auto", "jsonl", "blocks", "lines", "wikitext")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"
COMPRESSION_SUFFIXES = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
CHUNK_BYTES = 1 << 20
"""Input bytes per chunk of line-based files (whole lines or documents; at least one)."""
PARQUET_BATCH_ROWS = 256
"""Rows per pyarrow record batch, i.e. per parquet chunk (FineWeb-Edu: ~1 MB of text)."""
READ_BLOCK = 1 << 20
_WIKITEXT_TITLE = re.compile(r" = [^=].* = ")


class CorpusError(ValueError):
    """An input file is unreadable, empty or malformed (the message names file and line/row)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive documents of one input file: the unit of work of a tokenizer process."""

    path: str
    index: int
    """Position of the file among the inputs (chooses the output shard)."""
    kind: Literal["jsonl", "text"]
    """"jsonl": `items` are raw lines (bytes), parsed by `chunk_texts`; "text": document
    texts."""
    first: int
    """Line (JSONL) or row (parquet) number of the first item, counted from 1."""
    items: list[Any]
    input_bytes: int
    """Bytes of the file on disk this chunk stands for (compressed bytes when compressed;
    parquet: the chunk's share of the file by rows); they add up to the file size."""
    json_key: str = "text"


def _missing(package: str, what: str) -> CorpusError:
    return CorpusError(f"{what} needs the `{package}` package, which is not installed: "
                       f"pip install {package} (or pip install -e '.[data]')")


def input_format(path: Path, document_format: DocumentFormat = "auto"
                 ) -> tuple[str, str | None]:
    """(format, compression) of `path`: format is "parquet", "jsonl", "blocks", "lines" or
    "wikitext"; compression is None, "gz" or "zst" (see the module docstring)."""
    if document_format not in DOCUMENT_FORMATS:
        raise ValueError(f"document_format: must be one of {', '.join(DOCUMENT_FORMATS)}, "
                         f"got {document_format!r}")
    compression = COMPRESSION_SUFFIXES.get(path.suffix.lower())
    inner = (path.with_suffix("") if compression else path).suffix.lower()
    if inner == PARQUET_SUFFIX:
        if compression:
            raise CorpusError(f"{path}: parquet files are compressed inside; remove the outer "
                              f".{compression} compression")
        return "parquet", None
    if document_format == "jsonl" or inner in JSONL_SUFFIXES:
        return "jsonl", compression
    return ("blocks" if document_format == "auto" else document_format), compression


def expand_inputs(specs: Iterable[str | Path]) -> list[Path]:
    """Input paths from paths and globs (`*`, `?`, `[...]`, `**` recursive), in the order given;
    a glob's matches in sorted order.

    Raises:
        CorpusError: a glob matches no file, or a file is named twice.
    """
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        if any(char in text for char in "*?["):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise CorpusError(f"{text}: no file matches this pattern")
            paths.extend(map(Path, matches))
        else:
            paths.append(Path(text))
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise CorpusError(f"{path}: given more than once (check overlapping globs)")
        seen.add(path.resolve())
    return paths


# ---------------------------------------------------------------------------------------------
# Line-based files (text and JSONL, plain or compressed)


def _decompressor(compression: str | None) -> Any:
    """A fresh zlib/zstd decompression object with `decompress`, `eof`, `unused_data`."""
    if compression == "gz":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        import zstandard
    except ImportError:
        raise _missing("zstandard", "reading .zst files") from None
    return zstandard.ZstdDecompressor().decompressobj()


def _blocks(raw: BinaryIO, path: Path, compression: str | None) -> Iterator[bytes]:
    """Decompressed blocks of a file; multi-member gzip and multi-frame zstd streams are read
    to their end, and a stream that stops inside a member or frame is an error."""
    if compression is None:
        yield from iter(lambda: raw.read(READ_BLOCK), b"")
        return
    decoder, block, fresh = _decompressor(compression), raw.read(READ_BLOCK), True
    while block:
        try:
            yield decoder.decompress(block)
        except Exception as exc:  # zlib.error, zstandard.ZstdError
            raise CorpusError(f"{path}: corrupt {compression} data near compressed byte "
                              f"{raw.tell()} ({exc})") from None
        if decoder.eof:  # a member/frame ended; the next one (if any) needs a new decoder
            block = decoder.unused_data or raw.read(READ_BLOCK)
            decoder, fresh = _decompressor(compression), True
        else:
            block, fresh = raw.read(READ_BLOCK), False
    if not fresh:
        raise CorpusError(f"{path}: truncated {compression} file (the compressed stream ends "
                          "inside a member or frame); the file is incomplete")


def _raw_lines(path: Path, compression: str | None) -> Iterator[tuple[bytes, int]]:
    """(line with its newline, input bytes consumed since the previous yield) of a file."""
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    with raw:
        rest, position = b"", 0
        for block in _blocks(raw, path, compression):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            consumed = raw.tell() - position
            position += consumed
            for part in parts:
                yield part + b"\n", consumed
                consumed = 0
            if consumed:
                yield b"", consumed
        yield rest, raw.tell() - position


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start} "
                          "of the line)") from None


def parse_jsonl_line(raw: bytes, path: str, lineno: int, json_key: str) -> str:
    """The text of one JSONL record; errors name `path:lineno`."""
    where = f"{path}:{lineno}"
    try:
        record = json.loads(_decode(raw, path, lineno))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if json_key not in record:
        raise CorpusError(f"{where}: no {json_key!r} key (keys: {', '.join(record)}); "
                          "choose the field with --json-key")
    text = record[json_key]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: {json_key!r} must be a string, got {type(text).__name__}")
    return text


def _jsonl_chunks(path: Path, index: int, compression: str | None, json_key: str,
                  chunk_bytes: int) -> Iterator[Chunk]:
    lines: list[bytes] = []
    first, lineno, size, consumed = 1, 0, 0, 0
    for raw, nbytes in _raw_lines(path, compression):
        consumed += nbytes
        if raw:
            lineno += 1
            lines.append(raw)
            size += len(raw)
        if size >= chunk_bytes:
            yield Chunk(str(path), index, "jsonl", first, lines, consumed, json_key)
            lines, first, size, consumed = [], lineno + 1, 0, 0
    if lines or consumed:
        yield Chunk(str(path), index, "jsonl", first, lines, consumed, json_key)


def _plain_documents(path: Path, compression: str | None, text_format: str
                     ) -> Iterator[tuple[str, int, int]]:
    """(document, its first line number, input bytes since the previous one) of a text file:
    blank-line blocks, single lines or WikiText articles as exact slices of the file."""
    parts: list[str] = []
    consumed, lineno, start = 0, 0, 1
    for raw, nbytes in _raw_lines(path, compression):
        consumed += nbytes
        if not raw:
            continue
        lineno += 1
        line = _decode(raw, str(path), lineno)
        blank = not line.strip()
        starts_new = (blank if text_format in ("blocks", "lines")
                      else bool(_WIKITEXT_TITLE.fullmatch(line.rstrip("\r\n"))))
        if starts_new:
            if "".join(parts).strip():
                yield "".join(parts), start, consumed - nbytes
                consumed = nbytes
            parts = []
        if text_format == "wikitext" or not blank:
            if not parts:
                start = lineno
            parts.append(line)
        if text_format == "lines" and not blank:
            yield "".join(parts), start, consumed
            parts, consumed = [], 0
    if "".join(parts).strip() or consumed:
        yield "".join(parts), start, consumed


def _text_chunks(path: Path, index: int, compression: str | None, text_format: str,
                 chunk_bytes: int) -> Iterator[Chunk]:
    texts: list[str] = []
    first, size, consumed = 1, 0, 0
    for text, lineno, nbytes in _plain_documents(path, compression, text_format):
        if not texts:
            first = lineno
        if text.strip():
            texts.append(text)
        size += len(text)
        consumed += nbytes
        if size >= chunk_bytes:
            yield Chunk(str(path), index, "text", first, texts, consumed)
            texts, size, consumed = [], 0, 0
    if texts or consumed:
        yield Chunk(str(path), index, "text", first, texts, consumed)


# ---------------------------------------------------------------------------------------------
# Parquet


def _parquet_chunks(path: Path, index: int, text_column: str, batch_rows: int
                    ) -> Iterator[Chunk]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", "reading parquet files") from None
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise CorpusError(f"{path}: no column {text_column!r} (columns: "
                          f"{', '.join(schema.names)}); choose one with --text-column")
    kind = schema.field(text_column).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise CorpusError(f"{path}: column {text_column!r} holds {kind}, not strings")
    size, rows = path.stat().st_size, parquet.metadata.num_rows
    done, consumed = 0, 0
    batches = parquet.iter_batches(batch_size=batch_rows, columns=[text_column],
                                   use_threads=False)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, OSError) as exc:
            raise CorpusError(f"{path}: row {done + 1}: cannot read the row group holding it "
                              f"({exc})") from None
        column = batch.column(0)
        if column.null_count:
            null = pc.index(column.is_null(), True).as_py()
            raise CorpusError(f"{path}: row {done + null + 1}: {text_column!r} is null")
        nbytes = size * (done + len(column)) // max(rows, 1) - consumed
        yield Chunk(str(path), index, "text", done + 1, column.to_pylist(), nbytes)
        done += len(column)
        consumed += nbytes
    if consumed < size:
        yield Chunk(str(path), index, "text", done + 1, [], size - consumed)


# ---------------------------------------------------------------------------------------------
# Reading


def read_chunks(path: Path, *, index: int = 0, document_format: DocumentFormat = "auto",
                json_key: str = "text", text_column: str = "text") -> Iterator[Chunk]:
    """Chunks of one input file, in order (see the module docstring): about CHUNK_BYTES
    input bytes, or PARQUET_BATCH_ROWS rows, each.

    Raises:
        CorpusError: unreadable, corrupt or truncated file, not UTF-8, a missing or non-string
            parquet column, a null value. JSONL records are checked by `chunk_texts`.
    """
    fmt, compression = input_format(path, document_format)
    if fmt == "parquet":
        return _parquet_chunks(path, index, text_column, PARQUET_BATCH_ROWS)
    if fmt == "jsonl":
        return _jsonl_chunks(path, index, compression, json_key, CHUNK_BYTES)
    return _text_chunks(path, index, compression, fmt, CHUNK_BYTES)


def chunk_texts(chunk: Chunk) -> Iterator[str]:
    """Document texts of a chunk, whitespace-only ones included (callers count them).

    Raises:
        CorpusError: a JSONL line is not UTF-8, not a JSON object, or lacks a string under the
            key (names file and line).
    """
    if chunk.kind == "text":
        yield from chunk.items
        return
    for offset, raw in enumerate(chunk.items):
        if raw.strip():
            yield parse_jsonl_line(raw, chunk.path, chunk.first + offset, chunk.json_key)


def read_documents(path: Path, *, document_format: DocumentFormat = "auto",
                   json_key: str = "text", text_column: str = "text") -> Iterator[str]:
    """Document texts of one input file, in order (JSONL records with empty text included).

    Raises:
        CorpusError: as `read_chunks` and `chunk_texts`, or the file has no non-blank document.
    """
    path = Path(path)
    found = False
    for chunk in read_chunks(path, document_format=document_format, json_key=json_key,
                             text_column=text_column):
        for text in chunk_texts(chunk):
            found = found or bool(text.strip())
            yield text
    if not found:
        raise no_documents(path)


def no_documents(path: Path | str) -> CorpusError:
    """The error for an input without a single non-blank document."""
    return CorpusError(f"{path}: no documents (the file is empty or whitespace only)")


def texts(paths: Sequence[Path], *, document_format: DocumentFormat = "auto",
          json_key: str = "text", text_column: str = "text") -> Iterator[str]:
    """The non-blank document texts of several files, in order (e.g. to train a tokenizer)."""
    for path in paths:
        for text in read_documents(path, document_format=document_format, json_key=json_key,
                                   text_column=text_column):
            if text.strip():
                yield text
