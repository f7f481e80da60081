"""Text corpora: documents read from files, sentence splitting, tokenization, the embedded corpus.

A *document* is the unit that ends with an end-of-document token (EOD) in the indexed dataset:
- JSONL (files named `*.jsonl` or `*.json` whatever the format, every file with format
  "jsonl"): one document per line, the string under `json_key` ("text" by default); blank lines
  are ignored, records with whitespace-only text are skipped (and counted).
- plain text, format "blocks" (what "auto" means for them): documents are separated by blank
  (whitespace-only) lines.
- plain text, format "lines": every non-blank line is a document.
- plain text, format "wikitext": one document per WikiText article; an article starts at a
  top-level heading line ` = Title = ` and runs to the next one, section headings (` = = ... = = `)
  and blank lines included. Use it for WikiText-2/103, whose paragraphs are single lines and
  whose blank lines only surround headings ("blocks" would cut articles into sections).
Plain-text documents are exact slices of the file (newlines kept), so the concatenated documents
are the file minus separator lines. Files are read as UTF-8; errors name the file and line.

Sentence splitting (optional) uses nltk's Punkt: the installed `punkt_tab/english` model when
nltk finds it, otherwise a Punkt model trained on the first PUNKT_TRAIN_CHARS characters of the
corpus itself (nothing is ever downloaded). A document's sentences are cut at the sentence starts,
so they cover the document exactly: splitting changes sequence boundaries, never the text.

The embedded demo corpus is assembled from the Python standard library's `pydoc_data.topics`
(the English help texts behind `help('topics')`, about 460 KB in 79 topics on Python 3.11,
Python Software Foundation License): present in every CPython install, needs no network and no
../shared. Its content depends on the Python version; the dataset metadata records the
sha256 of the corpus file, so a changed corpus is re-tokenized rather than silently reused.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from megatron_step.data.tokenizer import Tokenizer

DocumentFormat = Literal["auto", "jsonl", "blocks", "lines", "wikitext"]
DOCUMENT_FORMATS: tuple[str, ...] = ("auto", "jsonl", "blocks", "lines", "wikitext")
JSONL_SUFFIXES = (".jsonl", ".json")
PUNKT_TRAIN_CHARS = 1_000_000
"""Characters of the corpus Punkt trains on when no installed model exists (~4 s on 2 cores)."""
_WIKITEXT_TITLE = re.compile(r" = [^=].* = ")


class CorpusError(ValueError):
    """An input file is unreadable, empty or malformed (the message names file and line)."""


@dataclass(frozen=True, slots=True)
class Document:
    """One document's text and the input bytes consumed since the previous document."""

    text: str
    nbytes: int


def resolve_format(path: Path, document_format: DocumentFormat) -> str:
    """The concrete format of `path`: *.jsonl/*.json files (and every file, for "jsonl") are
    JSONL; the other files use the given plain-text format, "auto" meaning "blocks"."""
    if document_format not in DOCUMENT_FORMATS:
        raise ValueError(f"document_format: must be one of {', '.join(DOCUMENT_FORMATS)}, "
                         f"got {document_format!r}")
    if document_format == "jsonl" or path.suffix.lower() in JSONL_SUFFIXES:
        return "jsonl"
    return "blocks" if document_format == "auto" else document_format


def _lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, decoded line, raw byte length) of a UTF-8 file."""
    try:
        stream = path.open("rb")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    with stream:
        for lineno, raw in enumerate(stream, 1):
            try:
                yield lineno, raw.decode("utf-8"), len(raw)
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte "
                                  f"{exc.start} of the line)") from None


def _jsonl(path: Path, json_key: str) -> Iterator[Document]:
    for lineno, line, nbytes in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                              ) from None
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if json_key not in record:
            raise CorpusError(f"{where}: no {json_key!r} key (keys: {', '.join(record)})")
        text = record[json_key]
        if not isinstance(text, str):
            raise CorpusError(f"{where}: {json_key!r} must be a string, got "
                              f"{type(text).__name__}")
        yield Document(text, nbytes)


def _plain(path: Path, text_format: str) -> Iterator[Document]:
    """Blank-line blocks, single lines or WikiText articles as exact slices of the file."""
    parts: list[str] = []
    consumed = 0
    for _, line, nbytes in _lines(path):
        blank = not line.strip()
        starts_new = (blank if text_format in ("blocks", "lines")
                      else bool(_WIKITEXT_TITLE.fullmatch(line.rstrip("\r\n"))))
        if starts_new:
            if "".join(parts).strip():
                yield Document("".join(parts), consumed)
                consumed = 0
            parts = []
        consumed += nbytes
        if text_format == "wikitext" or not blank:
            parts.append(line)
        if text_format == "lines" and not blank:
            yield Document("".join(parts), consumed)
            parts, consumed = [], 0
    if "".join(parts).strip():
        yield Document("".join(parts), consumed)


def read_documents(path: Path, *, document_format: DocumentFormat = "auto",
                   json_key: str = "text") -> Iterator[Document]:
    """Yield the documents of one input file (see the module docstring for the formats).

    Args:
        path: a plain-text or JSONL file.
        document_format: "auto", "jsonl", "blocks", "lines" or "wikitext" (plain-text
            files only; *.jsonl/*.json files are always JSONL).
        json_key: the JSONL field holding the text.

    Yields:
        Documents in file order (JSONL records with empty text included, for counting).

    Raises:
        CorpusError: unreadable file, not UTF-8, bad JSON line, missing key, or no document.
    """
    path = Path(path)
    fmt = resolve_format(path, document_format)
    documents = _jsonl(path, json_key) if fmt == "jsonl" else _plain(path, fmt)
    found = False
    for document in documents:
        found = found or bool(document.text.strip())
        yield document
    if not found:
        raise CorpusError(f"{path}: no documents (the file is empty or whitespace only)")


def texts(paths: Iterable[Path], *, document_format: DocumentFormat = "auto",
          json_key: str = "text") -> Iterator[str]:
    """The non-blank document texts of several files, in order (e.g. to train a tokenizer)."""
    for path in paths:
        for document in read_documents(path, document_format=document_format,
                                       json_key=json_key):
            if document.text.strip():
                yield document.text


# ---------------------------------------------------------------------------------------------
# Sentence splitting


class SentenceSplitter:
    """Punkt sentence boundaries; `source` says which Punkt model (for logs and metadata)."""

    def __init__(self, punkt: object, source: str) -> None:
        self.punkt, self.source = punkt, source

    def split(self, text: str) -> list[str]:
        """Pieces of `text` cut at sentence starts; `"".join(pieces) == text`."""
        starts = [start for start, _ in self.punkt.span_tokenize(text)][1:]
        bounds = [0, *starts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def sentence_splitter(corpus: Iterable[str]) -> SentenceSplitter:
    """The installed Punkt english model, or one trained on the start of `corpus`.

    Args:
        corpus: document texts; read (lazily, up to PUNKT_TRAIN_CHARS characters) only when no
            Punkt model is installed.
    """
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    try:
        from nltk.tokenize.punkt import PunktTokenizer

        return SentenceSplitter(PunktTokenizer("english"), "nltk punkt_tab/english (installed)")
    except (ImportError, LookupError):  # nltk < 3.9, or the model is not installed
        pass
    sample, size = [], 0
    for text in corpus:
        sample.append(text[:PUNKT_TRAIN_CHARS - size])
        size += len(sample[-1])
        if size >= PUNKT_TRAIN_CHARS:
            break
    trainer = PunktTrainer()
    trainer.train("\n\n".join(sample), finalize=True)
    return SentenceSplitter(PunktSentenceTokenizer(trainer.get_params()),
                            f"nltk Punkt trained on the first {size} characters of the corpus "
                            "(no installed punkt_tab/english)")


# ---------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes: everything here pickles)


class DocumentEncoder:
    """Document text -> (token ids, sequence lengths): one sequence per sentence, or one per
    document; EOD appended to the document's last sequence."""

    def __init__(self, tokenizer: Tokenizer, splitter: SentenceSplitter | None,
                 append_eod: bool, dtype: type[np.number]) -> None:
        self.tokenizer, self.splitter = tokenizer, splitter
        self.append_eod, self.dtype = append_eod, dtype

    def __call__(self, text: str) -> tuple[np.ndarray, list[int]]:
        pieces = self.splitter.split(text) if self.splitter is not None else [text]
        sequences = [ids for ids in map(self.tokenizer.encode, pieces) if ids]
        if self.append_eod:
            sequences[-1] = [*sequences[-1], self.tokenizer.eod]
        ids = np.concatenate([np.asarray(seq, dtype=self.dtype) for seq in sequences])
        return ids, [len(seq) for seq in sequences]


_worker_encoder: DocumentEncoder | None = None


def _start_worker(encoder: DocumentEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(document: Document) -> tuple[int, np.ndarray, list[int]]:
    return document.nbytes, *_worker_encoder(document.text)


def encode_documents(documents: Iterable[Document], encoder: DocumentEncoder, workers: int = 1
                     ) -> Iterator[tuple[int, np.ndarray, list[int]]]:
    """(input bytes, token ids, sequence lengths) per document, always in input order.

    With `workers` > 1 the documents are tokenized in that many spawned processes (spawn: safe
    after torch is imported, and the same on every OS); output order does not depend on it.
    """
    if workers <= 1:
        for document in documents:
            yield document.nbytes, *encoder(document.text)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(encoder,)) as pool:
        yield from pool.imap(_encode_in_worker, documents, chunksize=64)


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def embedded_documents() -> list[str]:
    """The demo corpus: one document per `pydoc_data.topics` entry, sorted by topic name.

    Raises:
        CorpusError: this Python install lacks `pydoc_data` (some distributions strip it).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise CorpusError(f"the embedded corpus needs the standard library's pydoc_data.topics, "
                          f"missing from this Python ({exc}); set data.path to a dataset made "
                          "by tools/preprocess_data.py") from None
    return [topics[name] for name in sorted(topics)]


def to_jsonl(documents: Iterable[str], json_key: str = "text") -> str:
    """Documents as JSONL text, one `{json_key: text}` object per line (what read_documents
    reads back as the same documents)."""
    return "".join(json.dumps({json_key: text}, ensure_ascii=False) + "\n" for text in documents)
