"""Training data on Megatron's datasets: GPTDataset splits of indexed datasets, batches.

Pipeline (step 1, writing indexed datasets from input files, is `indexed`):
2. `build_datasets`: Megatron's BlendedMegatronDatasetBuilder + GPTDataset: train/valid/test are
   contiguous ranges of sequences (`split` weights); each split's documents are shuffled and
   concatenated into windows of seq_length + 1 tokens, all from `seed`. Rank 0 builds the index
   caches in `cache_dir` first, the other ranks then load them (Megatron's barrier).
3. `step_microbatches`: the run consumes train samples in order; global step k uses samples
   [k * gbs, (k + 1) * gbs) (modulo the dataset length: epochs wrap). So `consumed_samples =
   step * global_batch_size` is the whole data state of a checkpoint: a resumed run gets the
   same batches. The DP split is Megatron's pretraining sampler's: micro-batch m of DP rank r
   holds samples start + (m * dp + r) * mbs + [0, mbs); all DP ranks together see the same
   global batch whatever the DP size.

The embedded demo corpus (`corpus.embedded_documents`) becomes a dataset through the same path
(`prepare_embedded_dataset`), cached per tokenizer under the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_step import collectives
from megatron_step.data.corpus import embedded_documents, to_jsonl
from megatron_step.data.indexed import build_indexed_dataset, read_dataset_meta
from megatron_step.data.tokenizer import Tokenizer, file_sha256
from megatron_step.forward import Batch

EMBEDDED = "embedded"
"""The `data.path` value that selects the embedded demo corpus."""
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


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


def split_sequence_counts(num_sequences: int, split: str) -> tuple[int, int, int]:
    """Sequences (documents, unless sentence-split) in each of train/valid/test.

    Mirrors BlendedMegatronDatasetBuilder: split weights -> contiguous bookends, rounded.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    counts = [0 if bounds is None else
              int(round(bounds[1] * num_sequences)) - int(round(bounds[0] * num_sequences))
              for bounds in matrix]
    return counts[0], counts[1], counts[2]


def _check_dataset(prefix: str, tokenizer: Tokenizer, split: str, want_valid: bool) -> None:
    """Clear errors for what Megatron would assert on, hang on, or silently train wrong."""
    if not IndexedDataset.exists(prefix):
        raise DataError(f"data.path {prefix!r}: no complete indexed dataset ({prefix}.bin and "
                        f"{prefix}.idx); make one with tools/preprocess_data.py")
    meta = read_dataset_meta(prefix)
    if meta is not None and meta["tokenizer"] != dict(tokenizer.unique_identifiers):
        raise DataError(f"data.path {prefix!r} was tokenized with "
                        f"{meta['tokenizer_description']}, but data.tokenizer is "
                        f"{tokenizer.describe()}")
    num_sequences = len(IndexedDataset(prefix).sequence_lengths)
    train, valid, _ = split_sequence_counts(num_sequences, split)
    # a split without sequences makes GPTDataset loop forever looking for tokens
    if train == 0:
        raise DataError(f"data.split {split!r}: the train split of {prefix!r} gets none of its "
                        f"{num_sequences} sequences")
    if want_valid and valid == 0:
        raise DataError(f"data.split {split!r}: the valid split of {prefix!r} gets none of its "
                        f"{num_sequences} sequences; raise its weight or use more data")


def build_datasets(prefix: str | Path, tokenizer: Tokenizer, *, seq_length: int,
                   split: str = "98,2,0", seed: int, num_train_samples: int,
                   num_valid_samples: int, cache_dir: str | Path
                   ) -> tuple[GPTDataset, GPTDataset | None]:
    """Megatron GPTDatasets for training and validation from one indexed dataset.

    Call on every rank (Megatron builds on rank 0 first, then a barrier, then the others load
    the cached indices). Same arguments -> same samples in the same order, on every rank and
    after a restart.

    Args:
        prefix: the dataset prefix (`<prefix>.bin/.idx`).
        tokenizer: the tokenizer the dataset was made with (checked against its metadata).
        seq_length: tokens per sample (labels are the next tokens; one extra token is read).
        split: train,valid,test weights (Megatron's format, e.g. "98,2,0").
        seed: shuffling seed.
        num_train_samples: train samples the run will consume (e.g. total steps * gbs); more
            than one epoch repeats the data in a new order.
        num_valid_samples: valid samples an evaluation reads (0: no validation set).
        cache_dir: where Megatron caches the index arrays.

    Returns:
        (train, valid); valid is None when the split gives it no weight or none is requested.

    Raises:
        DataError: no dataset at `prefix`, another tokenizer made it, or a split is empty.
    """
    prefix = str(prefix)
    want_valid = num_valid_samples > 0 and parse_and_normalize_split(split)[1] > 0
    _check_dataset(prefix, tokenizer, split, want_valid)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split=split,
        path_to_cache=str(cache_dir), mmap_bin_files=True, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)
    sizes = [num_train_samples, num_valid_samples if want_valid else None, None]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                    config).build()
    return train, valid if want_valid else None


def sample_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                   dp_rank: int, dp_size: int) -> list[list[int]]:
    """Sample numbers of each micro-batch of one DP rank in the global batch starting at
    `consumed_samples` (Megatron's pretraining-sampler order; not yet wrapped by epochs).

    Raises:
        ValueError: global_batch_size is not a multiple of micro_batch_size * dp_size.
    """
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"train.global_batch_size ({global_batch_size}) is not a multiple of "
                         f"micro_batch_size ({micro_batch_size}) x data-parallel size "
                         f"({dp_size})")
    num_microbatches = global_batch_size // (micro_batch_size * dp_size)
    return [[consumed_samples + (m * dp_size + dp_rank) * micro_batch_size + i
             for i in range(micro_batch_size)] for m in range(num_microbatches)]


def _collate(dataset: GPTDataset, indices: Sequence[int]) -> Batch:
    if len(dataset) == 0:
        raise DataError("the dataset has no samples")
    items = [dataset[index % len(dataset)] for index in indices]
    return {key: torch.stack([item[key] for item in items]) for key in BATCH_KEYS}


def step_microbatches(dataset: GPTDataset, *, consumed_samples: int, global_batch_size: int,
                      micro_batch_size: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """This DP rank's micro-batches for the optimizer step after `consumed_samples` samples.

    Args:
        dataset: the train GPTDataset.
        consumed_samples: samples used by all earlier steps (step * global_batch_size).
        global_batch_size: samples per step over all DP ranks.
        micro_batch_size: samples per micro-batch.
        dp_rank, dp_size: this rank's data-parallel coordinates.

    Returns:
        global_batch_size / (micro_batch_size * dp_size) batches with `tokens`, `labels`
        (int64), `loss_mask` (float32) and `position_ids` (int64), each [micro_batch_size,
        seq_length], on CPU.
    """
    return [_collate(dataset, indices) for indices in
            sample_indices(consumed_samples, global_batch_size, micro_batch_size, dp_rank,
                           dp_size)]


def valid_microbatches(dataset: GPTDataset, num_samples: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int) -> list[Batch]:
    """This DP rank's share of the first `num_samples` validation samples, every evaluation.

    The samples do not depend on the DP size (a multiple of micro_batch_size * dp_size is
    required), so validation losses compare across layouts.
    """
    return step_microbatches(dataset, consumed_samples=0, global_batch_size=num_samples,
                             micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                             dp_size=dp_size)
