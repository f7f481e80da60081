"""Token accounting: what each stage will draw from each dataset, and how many epochs that is.

Exact, not estimated: the train dataset Megatron built assigns every sample number to one
dataset (a BlendedDataset's `dataset_index`; a lone GPTDataset owns them all), and stage i trains
on samples [sum of earlier stages' steps, + its own steps) x global_batch_size. So the counts
below are what the run will read, and the shares match the blend weights up to Megatron's
rounding (its blending indices keep every prefix of the sample sequence within a sample of the
weights).

Tokens = samples x seq_length (the tokens a sample trains on). An epoch of a dataset is its
train split's samples, (split tokens - 1) // seq_length. More than one epoch over the run means
repetition: Megatron then shuffles the samples of all epochs together, so repeated documents
can appear in any stage that reads the dataset, and `warnings` names every stage that ends
beyond one epoch of a source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_step.data.datasets import Blend, Source


def _dataset_counts(dataset: Any, start: int, stop: int) -> list[int]:
    """Samples [start, stop) of a dataset, counted per mid-level dataset (wrapping epochs)."""
    if not hasattr(dataset, "dataset_index"):
        return [stop - start]
    index = np.asarray(dataset.dataset_index)
    positions = np.arange(start, stop) % len(index)
    return np.bincount(index[positions], minlength=len(dataset.datasets)).tolist()


def _mid_level(dataset: Any) -> list[Any]:
    return list(dataset.datasets) if hasattr(dataset, "dataset_index") else [dataset]


def _split_tokens(dataset: Any) -> int:
    """Tokens in a GPTDataset's split (its sequences `indices` of the indexed dataset)."""
    return int(dataset.dataset.sequence_lengths[dataset.indices].sum(dtype=np.int64))


def _per_source(sources: Sequence[Source], datasets: Sequence[Any], counts: Sequence[int]
                ) -> list[tuple[Source, int, int]]:
    """(source, samples, split tokens) per source, summing the datasets of its prefixes."""
    by_prefix = {str(ds.dataset_path): (n, _split_tokens(ds))
                 for ds, n in zip(datasets, counts, strict=True)}
    rows = []
    for source in sources:
        samples = sum(by_prefix[p][0] for p in source.prefixes)
        tokens = sum(by_prefix[p][1] for p in source.prefixes)
        rows.append((source, samples, tokens))
    return rows


def token_accounting(train: Any, valid: Any, blend: Blend, *, stage_samples: Sequence[int],
                     seq_length: int, valid_samples: int) -> dict[str, Any]:
    """Samples, tokens and epochs per stage and per source of the built datasets.

    Args:
        train, valid: the datasets `datasets.build_datasets` returned (valid may be None).
        blend: the blend they were built from (names the sources).
        stage_samples: train samples each stage consumes (its steps x global batch size).
        seq_length: tokens per sample.
        valid_samples: samples one evaluation reads.

    Returns:
        A JSON-able dict: `sources` (per train source: weight share, split tokens, samples per
        epoch), `stages` (per stage: samples, tokens and per source samples, tokens, share,
        epochs, cumulative epochs), `valid` (per source samples and epochs of one evaluation,
        or None) and `warnings` (sentences).
    """
    train_sets = _mid_level(train)
    total_weight = sum(source.weight for source in blend.sources[0])
    whole = _per_source(blend.sources[0], train_sets, [0] * len(train_sets))
    per_epoch = {source.field: max((tokens - 1) // seq_length, 1) for source, _, tokens in whole}
    result: dict[str, Any] = {
        "seq_length": seq_length,
        "sources": [{"field": source.field, "path": source.path, "datasets": len(source.prefixes),
                     "weight": source.weight / total_weight, "train_split_tokens": tokens,
                     "samples_per_epoch": per_epoch[source.field]}
                    for source, _, tokens in whole],
        "stages": [], "valid": None, "warnings": []}
    start = 0
    drawn = dict.fromkeys(per_epoch, 0)
    for stage, samples in enumerate(stage_samples, 1):
        rows = []
        counts = _dataset_counts(train, start, start + samples)
        for source, count, _ in _per_source(blend.sources[0], train_sets, counts):
            drawn[source.field] += count
            epochs = drawn[source.field] / per_epoch[source.field]
            rows.append({"path": source.path, "samples": count, "tokens": count * seq_length,
                         "share": count / max(samples, 1),
                         "epochs": count / per_epoch[source.field],
                         "cumulative_epochs": epochs})
            if epochs > 1:
                result["warnings"].append(
                    f"stage {stage} would repeat data: {source.path} reaches {epochs:.2f} "
                    f"epochs of its train split ({per_epoch[source.field]} samples) by the end "
                    f"of the stage")
        result["stages"].append({"stage": stage, "samples": samples,
                                 "tokens": samples * seq_length, "sources": rows})
        start += samples
    if valid is not None:
        valid_sets = _mid_level(valid)
        counts = _dataset_counts(valid, 0, valid_samples)
        rows = []
        for source, count, tokens in _per_source(blend.sources[1], valid_sets, counts):
            epoch = max((tokens - 1) // seq_length, 1)
            rows.append({"path": source.path, "samples": count, "epochs": count / epoch})
            if count > epoch:
                result["warnings"].append(
                    f"validation reads {count} samples of {source.path}, whose valid split "
                    f"holds {epoch}: validation repeats samples")
        result["valid"] = {"samples": valid_samples, "sources": rows}
    return result


def describe(accounting: dict[str, Any]) -> list[str]:
    """Log lines: one per stage with each source's tokens, share and epochs."""
    lines = []
    for stage in accounting["stages"]:
        parts = [f"{row['path']} {row['tokens']:,} tokens ({row['share']:.1%}, "
                 f"{row['epochs']:.3f} epochs, {row['cumulative_epochs']:.3f} so far)"
                 for row in stage["sources"]]
        lines.append(f"data: stage {stage['stage']} draws {stage['samples']:,} samples = "
                     f"{stage['tokens']:,} tokens: " + "; ".join(parts))
    if accounting["valid"] is not None:
        parts = [f"{row['path']} {row['samples']} samples ({row['epochs']:.3f} epochs)"
                 for row in accounting["valid"]["sources"]]
        lines.append(f"data: each evaluation reads {accounting['valid']['samples']} samples: "
                     + "; ".join(parts))
    return lines
