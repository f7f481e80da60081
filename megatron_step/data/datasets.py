"""Megatron GPTDatasets from indexed datasets: one prefix, or weighted blends, per split.

1. `resolve_blend`: `data.path` (one prefix, cut into train/valid/test by `data.split`) or
   `data.blend` (weighted prefixes or globs of them; either one distribution cut by `split`, or
   separate train/valid/test lists) -> `Blend`, every prefix checked to exist. A glob's datasets
   share their entry's weight in proportion to their tokens.
2. `build_datasets`: Megatron's BlendedMegatronDatasetBuilder builds GPTDatasets (each split's
   documents shuffled and concatenated into windows of seq_length + 1 tokens, from `seed`) and,
   for several prefixes, the BlendedDataset that draws from them by weight. Blending is
   Megatron's, not re-implemented here. Before that, `check_blend` turns what Megatron would
   assert on, loop forever on, or silently train wrong with into `DataError`s that name the
   config field: a missing or empty dataset, another tokenizer's dataset, a split with no
   sequence or fewer tokens than one sample. Rank 0 builds the index caches in `cache_dir`
   first, the other ranks then load them (Megatron's barrier).

Blends need torch.distributed initialised (the trainer always has it): megatron-core 0.16.1's
BlendedDataset calls `torch.distributed.get_rank()` unguarded when it writes its cache
(blended_dataset.py:153).

The embedded demo corpus (`corpus.embedded_documents`) becomes a dataset through
`prepare_embedded_dataset`, cached per tokenizer under the run directory.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step import collectives
from megatron_step.config import BlendEntry, DataConfig, SplitBlends
from megatron_step.data.corpus import embedded_documents, to_jsonl
from megatron_step.data.indexed import SHARD_GLOB, build_indexed_dataset, read_dataset_meta
from megatron_step.data.tokenizer import Tokenizer, file_sha256

EMBEDDED = "embedded"
"""The `data.path` value that selects the embedded demo corpus."""
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A dataset is missing, inconsistent with the tokenizer, or too small for the request."""


def _build_embedded(directory: Path, prefix: Path, tokenizer: Tokenizer, progress: bool) -> None:
    """Write the corpus JSONL and tokenize it, unless both are current."""
    corpus = to_jsonl(embedded_documents()).encode("utf-8")
    digest = hashlib.sha256(corpus).hexdigest()
    jsonl = directory / "embedded_corpus.jsonl"
    if not jsonl.is_file() or file_sha256(jsonl) != digest:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = jsonl.with_name(f".{jsonl.name}.tmp-{os.getpid()}")
        tmp.write_bytes(corpus)
        os.replace(tmp, jsonl)
    meta = read_dataset_meta(prefix)
    fresh = (meta is not None and IndexedDataset.exists(str(prefix))
             and [item["sha256"] for item in meta["inputs"]] == [digest]
             and meta["tokenizer"] == dict(tokenizer.unique_identifiers))
    if not fresh:
        build_indexed_dataset([jsonl], prefix, tokenizer, progress=progress, overwrite=True)


def prepare_embedded_dataset(directory: str | Path, tokenizer: Tokenizer, *,
                             progress: bool = True) -> str:
    """The embedded demo corpus as an indexed dataset under `directory`; returns its prefix.

    Writes `embedded_corpus.jsonl` and `embedded-<tokenizer hash>.{bin,idx,meta.json}`, and
    reuses them when the corpus text and the tokenizer are unchanged. Under torch.distributed
    every rank calls it: rank 0 builds while the others wait for its outcome (shared
    filesystem); a failure on rank 0 is raised on every rank instead of leaving them waiting.

    Raises:
        DataError: (ranks > 0) rank 0 failed; rank 0 raises the original error.
    """
    directory = Path(directory)
    identity = json.dumps(dict(tokenizer.unique_identifiers), sort_keys=True)
    prefix = directory / f"embedded-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            _build_embedded(directory, prefix, tokenizer, progress)
        except Exception as exc:  # tell the waiting ranks, then fail here with the original
            collectives.broadcast_object(f"{type(exc).__name__}: {exc}", src=0)
            raise
    failure = collectives.broadcast_object(None, src=0)
    if failure is not None:
        raise DataError(f"rank 0 could not build the embedded dataset: {failure}")
    return str(prefix)


def split_bounds(num_sequences: int, split: str) -> list[tuple[int, int] | None]:
    """[begin, end) sequence range of train/valid/test in a dataset cut by `split` (None for a
    split without weight), exactly as BlendedMegatronDatasetBuilder rounds them."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if bounds is None else (int(round(bounds[0] * num_sequences)),
                                         int(round(bounds[1] * num_sequences)))
            for bounds in matrix]


@dataclass(frozen=True, slots=True)
class Source:
    """One blend entry resolved to its indexed datasets."""

    field: str
    """The config field it comes from, e.g. `data.blend[1]` (for messages)."""
    path: str
    """The prefix or glob as configured."""
    weight: float
    prefixes: tuple[str, ...]
    tokens: tuple[int, ...]
    """Tokens of each prefix (all splits)."""


@dataclass(frozen=True, slots=True)
class Blend:
    """The datasets of each split, in Megatron's terms."""

    sources: tuple[tuple[Source, ...], tuple[Source, ...], tuple[Source, ...]]
    """Train, valid and test sources; the same ones thrice when `split` cuts one distribution,
    an empty tuple for a split without data."""
    split: str | None
    """The train/valid/test weights of a shared distribution; None for separate ones."""

    def megatron(self, index: int) -> tuple[list[str], list[float] | None] | None:
        """Megatron's (prefixes, weights) of split `index`: a glob's prefixes share their
        entry's weight in proportion to their tokens; weights None for a single prefix (a
        plain GPTDataset, no BlendedDataset)."""
        sources = self.sources[index]
        if not sources:
            return None
        prefixes = [p for source in sources for p in source.prefixes]
        weights = [source.weight * tokens / sum(source.tokens) for source in sources
                   for tokens in source.tokens]
        return prefixes, (weights if len(prefixes) > 1 else None)

    def built(self, index: int) -> bool:
        """Whether Megatron builds split `index` (has data, and weight in a shared split)."""
        if self.split is not None:
            return parse_and_normalize_split(self.split)[index] > 0
        return bool(self.sources[index])

    @classmethod
    def single(cls, prefix: str | Path, split: str, field: str = "data.path") -> Blend:
        """One dataset cut into train/valid/test by `split`."""
        sources = (_resolve(BlendEntry(path=str(prefix)), field),)
        return cls((sources, sources, sources), split)


def _sequence_lengths(prefix: str) -> np.ndarray:
    """A dataset's sequence lengths, copied: the index is a memory map that closes (and its
    arrays become invalid) when the IndexedDataset object is garbage collected."""
    if Path(prefix + ".bin").stat().st_size == 0:  # no tokens; numpy cannot map it
        return np.zeros(0, dtype=np.int64)
    dataset = IndexedDataset(prefix)
    return np.array(dataset.sequence_lengths, dtype=np.int64)


def _tokens(prefix: str) -> int:
    return int(_sequence_lengths(prefix).sum())


def _resolve(entry: BlendEntry, field: str) -> Source:
    """Expand a glob entry to the complete datasets it matches; check each exists and holds
    tokens."""
    if any(char in entry.path for char in "*?["):
        prefixes = sorted(p[:-len(".idx")] for p in glob.glob(entry.path + ".idx")
                          if IndexedDataset.exists(p[:-len(".idx")]))
        if not prefixes:
            raise DataError(f"{field}.path {entry.path!r}: matches no complete indexed dataset "
                            f"(no {entry.path}.idx with its .bin)")
    else:
        if not IndexedDataset.exists(entry.path):
            shards = sorted(glob.glob(glob.escape(entry.path) + SHARD_GLOB + ".idx"))
            hint = (f"; it was written in shards ({shards[0][:-4]}, ...): use "
                    f"'{entry.path}-*'" if shards else "")
            name = field if field == "data.path" else f"{field}.path"
            raise DataError(f"{name} {entry.path!r}: no complete indexed dataset "
                            f"({entry.path}.bin and {entry.path}.idx); make one with "
                            f"tools/preprocess_data.py{hint}")
        prefixes = [entry.path]
    tokens = tuple(_tokens(p) for p in prefixes)
    for prefix, count in zip(prefixes, tokens, strict=True):
        if count == 0:
            name = field if field == "data.path" else f"{field}.path"
            raise DataError(f"{name} {prefix!r}: the dataset is empty (no tokens)")
    return Source(field, entry.path, entry.weight, tuple(prefixes), tokens)


def resolve_blend(config: DataConfig, embedded_prefix: str | None = None) -> Blend:
    """The datasets `config` names (`data.path`, `data.blend`, or the embedded corpus).

    Args:
        config: the run's data settings.
        embedded_prefix: the embedded corpus's dataset, used when neither path nor blend is
            set, or path is 'embedded'.

    Raises:
        DataError: a prefix names no complete dataset, or a glob matches none.
    """
    if config.blend is None:
        prefix = embedded_prefix if config.path in (None, EMBEDDED) else config.path
        return Blend.single(str(prefix), config.split)
    if isinstance(config.blend, SplitBlends):
        per_split = [tuple(_resolve(entry, f"data.blend.{name}[{i}]")
                           for i, entry in enumerate(getattr(config.blend, name)))
                     for name in SPLITS]
        for sources in per_split:
            _check_unique(sources)
        return Blend((per_split[0], per_split[1], per_split[2]), None)
    shared = tuple(_resolve(entry, f"data.blend[{i}]") for i, entry in enumerate(config.blend))
    _check_unique(shared)
    return Blend((shared, shared, shared), config.split)


def _check_unique(sources: Sequence[Source]) -> None:
    """A dataset named by two entries would be counted twice (and weighted oddly)."""
    owner: dict[str, str] = {}
    for source in sources:
        for prefix in source.prefixes:
            if prefix in owner:
                raise DataError(f"{source.field}.path: dataset {prefix!r} is already in "
                                f"{owner[prefix]}")
            owner[prefix] = source.field


def check_blend(blend: Blend, tokenizer: Tokenizer, seq_length: int, *,
                want_valid: bool = True) -> None:
    """Clear errors for what Megatron would assert on, hang on, or silently train wrong.

    Every dataset of every split Megatron builds must be made with `tokenizer` (when its
    metadata says). In the train split, and in the valid split when `want_valid`, each must
    hold at least seq_length + 1 tokens (one sample). Other built splits of a weighted blend
    must hold a sequence: Megatron builds them with 0 samples, and an empty one makes
    GPTDataset count epochs forever.

    Raises:
        DataError: naming the config field, the dataset and the split.
    """
    if not blend.built(0):
        raise DataError(f"data.split {blend.split!r}: gives the train split no weight")
    checked: set[str] = set()
    for index, name in enumerate(SPLITS):
        if not blend.built(index):
            continue
        megatron = blend.megatron(index)
        need = (seq_length + 1 if index == 0 or (index == 1 and want_valid)
                else int(megatron is not None and megatron[1] is not None))
        for source in blend.sources[index]:
            for prefix in source.prefixes:
                label = source.field if source.field == "data.path" else f"{source.field}.path"
                if prefix not in checked:
                    checked.add(prefix)
                    meta = read_dataset_meta(prefix)
                    if meta is not None and meta["tokenizer"] != dict(
                            tokenizer.unique_identifiers):
                        raise DataError(f"{label} {prefix!r} was tokenized with "
                                        f"{meta['tokenizer_description']}, but data.tokenizer "
                                        f"is {tokenizer.describe()}")
                if not need:
                    continue
                lengths = _sequence_lengths(prefix)
                begin, end = (split_bounds(len(lengths), blend.split)[index]
                              if blend.split is not None else (0, len(lengths)))
                if end == begin:
                    raise DataError(
                        f"data.split {blend.split!r}: the {name} split of {prefix!r} gets none "
                        f"of its {len(lengths)} sequences"
                        + ("; raise its weight or use more data" if name == "valid" else ""))
                tokens = int(lengths[begin:end].sum())
                if tokens < need:
                    raise DataError(f"{label} {prefix!r}: its {name} split holds {tokens} "
                                    f"tokens, too few for one sample of model.seq_length + 1 "
                                    f"= {seq_length + 1}; use more data")


def build_datasets(source: str | Path | Blend, tokenizer: Tokenizer, *, seq_length: int,
                   split: str = "98,2,0", seed: int, num_train_samples: int,
                   num_valid_samples: int, cache_dir: str | Path) -> tuple[Any, Any]:
    """Megatron datasets for training and validation.

    Call on every rank (Megatron builds on rank 0 first, then a barrier, then the others load
    the cached indices). Same arguments -> same samples in the same order, on every rank and
    after a restart.

    Args:
        source: a dataset prefix (`<prefix>.bin/.idx`, cut by `split`), or a resolved `Blend`.
        tokenizer: the tokenizer the datasets were made with (checked against their metadata).
        seq_length: tokens per sample (labels are the next tokens; one extra token is read).
        split: train,valid,test weights (Megatron's format, e.g. "98,2,0") for a prefix.
        seed: shuffling seed.
        num_train_samples: train samples the run will consume (e.g. total steps * gbs); more
            than one epoch of a dataset repeats it in a new order.
        num_valid_samples: valid samples an evaluation reads (0: no validation set).
        cache_dir: where Megatron caches the index arrays.

    Returns:
        (train, valid): a GPTDataset, or a BlendedDataset over several; valid is None when it
        has no data or none is requested.

    Raises:
        DataError: see `resolve_blend` and `check_blend`.
    """
    blend = source if isinstance(source, Blend) else Blend.single(str(source), split)
    want_valid = num_valid_samples > 0 and blend.built(1)
    check_blend(blend, tokenizer, seq_length, want_valid=want_valid)
    per_split = [blend.megatron(i) if blend.built(i) else None for i in range(3)]
    blends = ({"blend": per_split[0], "split": blend.split} if blend.split is not None
              else {"blend_per_split": per_split})
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, path_to_cache=str(cache_dir),
        mmap_bin_files=True, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, **blends)
    # Megatron wants a size for every split of a weighted blend (0: no samples beyond one
    # pass), also for splits it does not build
    unsized = [0 if (megatron := blend.megatron(i)) is not None and megatron[1] is not None
               else None for i in range(3)]
    sizes = [num_train_samples, num_valid_samples if want_valid else unsized[1], unsized[2]]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                    config).build()
    return train, valid if want_valid else None
