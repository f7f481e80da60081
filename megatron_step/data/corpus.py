"""Text corpora: sentence splitting, tokenization in worker processes, the embedded corpus.

Documents come from `sources` (file formats, chunks). Tokenization (`encode_chunks`) turns each
chunk into its documents' token ids and sequence lengths, in tokenizer processes when `workers`
> 1; results come back in input order whatever the number of workers, and at most 2 x workers
chunks are in flight, so memory stays bounded however large the input.

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
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from megatron_step.data.sources import Chunk, CorpusError, chunk_texts
from megatron_step.data.tokenizer import Tokenizer

PUNKT_TRAIN_CHARS = 1_000_000
"""Characters of the corpus Punkt trains on when no installed model exists (~4 s on 2 cores)."""


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

    def __call__(self, text: str) -> tuple[list[int], list[int]]:
        pieces = self.splitter.split(text) if self.splitter is not None else [text]
        sequences = [ids for ids in map(self.tokenizer.encode, pieces) if ids]
        if not sequences:  # e.g. only characters the tokenizer normalises away
            return [], []
        if self.append_eod:
            sequences[-1] = [*sequences[-1], self.tokenizer.eod]
        return [i for seq in sequences for i in seq], [len(seq) for seq in sequences]


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    """The tokenized documents of one chunk, ready for IndexedDatasetBuilder.add_document."""

    index: int
    """The input file's position (`Chunk.index`)."""
    ids: np.ndarray
    """Token ids of all documents, concatenated in order."""
    sequence_lengths: np.ndarray
    """Tokens per sequence, in order."""
    document_sequences: np.ndarray
    """Sequences per document, in order."""
    skipped: int
    """Documents whose text was whitespace only or encoded to no token (not written)."""
    text_bytes: int
    """UTF-8 bytes of the written documents' text."""
    input_bytes: int

    def documents(self) -> Iterator[tuple[np.ndarray, list[int]]]:
        """(ids, sequence lengths) per document."""
        token, sequence = 0, 0
        for count in self.document_sequences.tolist():
            lengths = self.sequence_lengths[sequence:sequence + count].tolist()
            yield self.ids[token:token + sum(lengths)], lengths
            token, sequence = token + sum(lengths), sequence + count


def encode_chunk(chunk: Chunk, encoder: DocumentEncoder) -> EncodedChunk:
    """Parse (JSONL) and tokenize the documents of one chunk, skipping whitespace-only ones."""
    ids: list[int] = []
    lengths: list[int] = []
    counts: list[int] = []
    skipped = text_bytes = 0
    for text in chunk_texts(chunk):
        if not text.strip():
            skipped += 1
            continue
        doc_ids, doc_lengths = encoder(text)
        if not doc_lengths:
            skipped += 1
            continue
        ids.extend(doc_ids)
        lengths.extend(doc_lengths)
        counts.append(len(doc_lengths))
        text_bytes += len(text.encode("utf-8"))
    return EncodedChunk(chunk.index, np.asarray(ids, dtype=encoder.dtype),
                        np.asarray(lengths, dtype=np.int64), np.asarray(counts, dtype=np.int64),
                        skipped, text_bytes, chunk.input_bytes)


_worker_encoder: DocumentEncoder | None = None


def _start_worker(encoder: DocumentEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return encode_chunk(chunk, _worker_encoder)


def encode_chunks(chunks: Iterable[Chunk], encoder: DocumentEncoder, workers: int = 1
                  ) -> Iterator[EncodedChunk]:
    """Encoded chunks, always in input order.

    With `workers` > 1 the chunks are tokenized in that many spawned processes (spawn: safe
    after torch is imported, and the same on every OS); at most 2 x workers chunks are queued
    or in flight (multiprocessing's imap would read the whole input ahead into memory). An
    error in a worker (e.g. a malformed JSONL line) is raised here, and the pool is stopped.
    """
    if workers <= 1:
        for chunk in chunks:
            yield encode_chunk(chunk, encoder)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


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
