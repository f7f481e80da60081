"""Megatron indexed datasets written from input files: one, or one per group of input shards.

`build_indexed_dataset` reads the inputs (`sources`: text, JSONL, .gz/.zst, parquet), tokenizes
them (`corpus.encode_chunks`, in `workers` processes) and writes `<prefix>.bin` + `<prefix>.idx`
with megatron.core's IndexedDatasetBuilder (token dtype uint16 below 65500 ids, else int32:
Megatron's DType.optimal_dtype): one sequence per document (or per sentence), EOD closing each
document, documents in input order. Also written: `<prefix>.meta.json` (tokenizer identity,
inputs with size and sha256, settings, counts), which the trainer checks against
`data.tokenizer`.

Output shards. With `output_shards` K > 1 the inputs are cut into K groups of consecutive files
of about equal size, and group i becomes `<prefix>-{i:05d}-of-{K:05d}`; K = the number of
inputs gives one dataset per input file. A `data.blend` entry names them all with a glob
(`<prefix>-*`). The output never depends on the number of workers or on chunking.

All or nothing. Every output is written under a temporary name and renamed into place only
after all of them are complete (for each prefix its `.idx` last, so a prefix whose `.idx` exists
is complete). On any error, e.g. a malformed line in the last shard, nothing is left behind and
existing outputs are untouched; `overwrite` replaces them and removes shards of an earlier run of
the same prefix that the new run does not write.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_step.checkpoint import write_json_atomic
from megatron_step.data.corpus import DocumentEncoder, encode_chunks, sentence_splitter
from megatron_step.data.sources import (
    CorpusError,
    DocumentFormat,
    no_documents,
    read_chunks,
    texts,
)
from megatron_step.data.tokenizer import Tokenizer, file_sha256

META_SUFFIX = ".meta.json"
META_FORMAT = "megatron_step.indexed_dataset"
SHARD_GLOB = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
"""What follows the prefix in the name of an output shard (glob)."""


@dataclass(frozen=True, slots=True)
class Stats:
    """What `build_indexed_dataset` wrote (over all shards) and how fast."""

    prefixes: tuple[str, ...]
    files: int
    documents: int
    skipped_documents: int
    """Records whose text was empty or whitespace only."""
    sequences: int
    tokens: int
    input_bytes: int
    """Bytes of the input files on disk (compressed, for compressed inputs)."""
    text_bytes: int
    """UTF-8 bytes of the documents' text (what a tokenizer reads)."""
    seconds: float
    """Wall time of the whole build, hashing the inputs for the metadata included."""
    workers: int
    sentence_splitter: str | None

    @property
    def documents_per_second(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def megabytes_per_second(self) -> float:
        """Input megabytes (on disk) per second."""
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line: counts and throughput."""
        skipped = f" ({self.skipped_documents} empty skipped)" if self.skipped_documents else ""
        shards = f" into {len(self.prefixes)} datasets" if len(self.prefixes) > 1 else ""
        return (f"{self.documents} documents{skipped}, {self.sequences} sequences, "
                f"{self.tokens} tokens from {self.input_bytes / 1e6:.2f} MB in {self.files} "
                f"file(s) ({self.text_bytes / 1e6:.2f} MB of text){shards} in "
                f"{self.seconds:.1f} s with {self.workers} worker(s): "
                f"{self.documents_per_second:.0f} docs/s, {self.megabytes_per_second:.2f} MB/s, "
                f"{self.tokens_per_second:.0f} tokens/s")


def dataset_files(prefix: str | Path) -> tuple[Path, Path, Path]:
    """The `.bin`, `.idx` and `.meta.json` paths of a dataset prefix."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + META_SUFFIX)


def read_dataset_meta(prefix: str | Path) -> dict[str, Any] | None:
    """The metadata written with a dataset, or None (e.g. made by Megatron-LM's own tool)."""
    meta = dataset_files(prefix)[2]
    return json.loads(meta.read_text()) if meta.is_file() else None


def shard_prefixes(prefix: str | Path, num_shards: int) -> list[str]:
    """Output prefixes: `prefix` itself for one shard, else `prefix-00000-of-0000K`, ..."""
    if num_shards == 1:
        return [str(prefix)]
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def group_inputs(sizes: Sequence[int], num_groups: int) -> list[range]:
    """Cut inputs into `num_groups` non-empty runs of consecutive files of about equal total
    size: each run takes files while it stays nearest to an equal share of what is left.

    Raises:
        ValueError: more groups than inputs, or fewer than one.
    """
    if not 1 <= num_groups <= len(sizes):
        raise ValueError(f"output shards: must be in [1, {len(sizes)}] (the number of input "
                         f"files), got {num_groups}")
    groups, start, left = [], 0, sum(sizes)
    for g in range(num_groups):
        remaining = num_groups - g
        end, total = start + 1, sizes[start]
        target = left / remaining
        while end <= len(sizes) - remaining and (remaining == 1
                                                  or total + sizes[end] / 2 <= target):
            total += sizes[end]
            end += 1
        groups.append(range(start, end))
        start, left = end, left - total
    return groups


def _existing_outputs(prefix: str | Path) -> list[Path]:
    """Files of a dataset `prefix` or of shards of it (any count) that exist now."""
    escaped = glob.escape(str(prefix))
    names = [*dataset_files(prefix), *(Path(p) for suffix in (".bin", ".idx", META_SUFFIX)
                                       for p in glob.glob(escaped + SHARD_GLOB + suffix))]
    return sorted({path for path in names if path.exists()})


def _check_inputs(inputs: Sequence[Path], prefix: str | Path) -> None:
    """Fail before any work: every input is a readable file and none is an output."""
    if not inputs:
        raise CorpusError("no input files given")
    outputs = {path.resolve() for path in dataset_files(prefix)}
    shard_pattern = glob.escape(str(Path(str(prefix)).resolve())) + SHARD_GLOB + ".*"
    for path in inputs:
        if not path.exists():
            raise CorpusError(f"{path}: no such file")
        if not path.is_file():
            raise CorpusError(f"{path}: not a regular file")
        if not os.access(path, os.R_OK):
            raise CorpusError(f"{path}: cannot read (permission denied)")
        if path.resolve() in outputs or fnmatch.fnmatchcase(str(path.resolve()), shard_pattern):
            raise CorpusError(f"{path}: is also an output of the dataset prefix {prefix}")


@dataclass
class _Shard:
    """One output under construction: its builder, temporary files and counts."""

    prefix: str
    inputs: list[Path]
    builder: IndexedDatasetBuilder
    tmp_bin: Path
    tmp_idx: Path
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(
        ("documents", "skipped", "sequences", "tokens", "text_bytes"), 0))

    @classmethod
    def open(cls, prefix: str, inputs: list[Path], dtype: type[np.number]) -> _Shard:
        bin_path, idx_path, _ = dataset_files(prefix)
        tmp_bin, tmp_idx = (path.with_name(f".{path.name}.tmp-{os.getpid()}")
                            for path in (bin_path, idx_path))
        return cls(prefix, inputs, IndexedDatasetBuilder(str(tmp_bin), dtype=dtype), tmp_bin,
                   tmp_idx)

    def metadata(self, tokenizer: Tokenizer, settings: dict[str, Any]) -> dict[str, Any]:
        """`<prefix>.meta.json`: what made the dataset, so users of it can check."""
        counts = self.counts
        return {"format": META_FORMAT, "version": 2,
                "tokenizer": dict(tokenizer.unique_identifiers),
                "tokenizer_description": tokenizer.describe(),
                "inputs": [{"path": str(path), "bytes": path.stat().st_size,
                            "sha256": file_sha256(path)} for path in self.inputs],
                **settings,
                "stats": {"documents": counts["documents"],
                          "skipped_documents": counts["skipped"],
                          "sequences": counts["sequences"], "tokens": counts["tokens"],
                          "text_bytes": counts["text_bytes"],
                          "input_bytes": sum(path.stat().st_size for path in self.inputs)}}

    def discard(self) -> None:
        self.builder.data_file.close()
        self.tmp_bin.unlink(missing_ok=True)
        self.tmp_idx.unlink(missing_ok=True)


def build_indexed_dataset(inputs: Sequence[str | Path], output_prefix: str | Path,
                          tokenizer: Tokenizer, *, json_key: str = "text",
                          text_column: str = "text", document_format: DocumentFormat = "auto",
                          split_sentences: bool = False, append_eod: bool = True,
                          workers: int = 1, output_shards: int = 1, progress: bool = True,
                          overwrite: bool = False) -> Stats:
    """Tokenize input files into Megatron indexed dataset(s) (see the module docstring).

    Args:
        inputs: input files, read in order (formats: `sources` module docstring).
        output_prefix: path prefix of the dataset (parent directories are created).
        tokenizer: the tokenizer; its identity is recorded in `<prefix>.meta.json`.
        json_key: the JSONL field with the text.
        text_column: the parquet column with the text.
        document_format: format of the plain-text inputs, "auto" (= "blocks"), "blocks",
            "lines" or "wikitext"; or "jsonl" for all non-parquet inputs.
        split_sentences: one sequence per sentence (nltk Punkt) instead of per document.
        append_eod: close every document with the tokenizer's EOD id.
        workers: tokenizer processes (the output does not depend on it).
        output_shards: number of output datasets, at most the number of inputs.
        progress: show a progress bar (stderr).
        overwrite: replace an existing dataset (or shards) at `output_prefix`.

    Returns:
        Counts and throughput over all outputs; `prefixes` lists the outputs.

    Raises:
        CorpusError: an input is missing, unreadable, empty or malformed (names the file and
            line or row).
        FileExistsError: the dataset exists and `overwrite` is false.
        ValueError: `output_shards` outside [1, number of inputs].
    """
    start = time.perf_counter()
    inputs = [Path(path) for path in inputs]
    existing = _existing_outputs(output_prefix)
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(map(str, existing))} exist(s); pass overwrite to "
                              "replace")
    _check_inputs(inputs, output_prefix)
    sizes = [path.stat().st_size for path in inputs]
    groups = group_inputs(sizes, output_shards)
    splitter = None
    if split_sentences:
        splitter = sentence_splitter(texts(inputs, document_format=document_format,
                                           json_key=json_key, text_column=text_column))
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    encoder = DocumentEncoder(tokenizer, splitter, append_eod, dtype)
    chunks = (chunk for index, path in enumerate(inputs)
              for chunk in read_chunks(path, index=index, document_format=document_format,
                                       json_key=json_key, text_column=text_column))
    shard_of = {index: g for g, group in enumerate(groups) for index in group}
    documents_per_input = [0] * len(inputs)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    shards: list[_Shard] = []
    try:
        for prefix, group in zip(shard_prefixes(output_prefix, output_shards), groups,
                                 strict=True):
            shards.append(_Shard.open(prefix, [inputs[i] for i in group], dtype))
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing",
                  disable=not progress, dynamic_ncols=True) as bar:
            documents = 0
            for encoded in encode_chunks(chunks, encoder, workers):
                shard = shards[shard_of[encoded.index]]
                for ids, lengths in encoded.documents():
                    shard.builder.add_document(ids, lengths)
                written = len(encoded.document_sequences)
                documents += written
                documents_per_input[encoded.index] += written
                for key, value in (("documents", written), ("skipped", encoded.skipped),
                                   ("sequences", len(encoded.sequence_lengths)),
                                   ("tokens", len(encoded.ids)),
                                   ("text_bytes", encoded.text_bytes)):
                    shard.counts[key] += value
                rate = documents / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{documents} docs, {rate:.0f} docs/s", refresh=False)
                bar.update(encoded.input_bytes)
        for path, count in zip(inputs, documents_per_input, strict=True):
            if count == 0:
                raise no_documents(path)
        for shard in shards:
            shard.builder.finalize(str(shard.tmp_idx))
        settings = {"document_format": document_format, "json_key": json_key,
                    "text_column": text_column, "append_eod": append_eod,
                    "dtype": np.dtype(dtype).name}
        metas = [shard.metadata(tokenizer, {**settings, "shard": {
            "index": i, "count": output_shards} if output_shards > 1 else None})
            for i, shard in enumerate(shards)]
        seconds = time.perf_counter() - start  # hashing the inputs included
        for shard, meta in zip(shards, metas, strict=True):
            bin_path, idx_path, meta_path = dataset_files(shard.prefix)
            idx_path.unlink(missing_ok=True)  # the .idx goes last: with it the prefix is done
            meta["stats"]["seconds"] = seconds
            write_json_atomic(meta_path, meta)
            os.replace(shard.tmp_bin, bin_path)
            os.replace(shard.tmp_idx, idx_path)
    finally:
        for shard in shards:
            shard.discard()
    written = {path for shard in shards for path in dataset_files(shard.prefix)}
    for stale in existing:
        if stale not in written:
            stale.unlink(missing_ok=True)
    total = {key: sum(shard.counts[key] for shard in shards) for key in shards[0].counts}
    return Stats(prefixes=tuple(shard.prefix for shard in shards), files=len(inputs),
                 documents=total["documents"], skipped_documents=total["skipped"],
                 sequences=total["sequences"], tokens=total["tokens"],
                 input_bytes=sum(sizes), text_bytes=total["text_bytes"],
                 seconds=seconds, workers=workers,
                 sentence_splitter=splitter.source if splitter else None)
