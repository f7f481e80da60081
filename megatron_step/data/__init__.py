"""Training data: text -> token ids -> Megatron indexed datasets -> GPTDataset samples -> batches.

Modules, in pipeline order:
- `tokenizer`: the tokenizers a `data.tokenizer` spec names (byte, tokenizer.json, SentencePiece).
- `corpus`: documents read from input files, sentence splitting, tokenization workers, the
  embedded demo corpus.
- `datasets`: indexed datasets written from documents; Megatron GPTDatasets read from them;
  the per-step micro-batches.

The names below are re-exported lazily (PEP 562): `corpus` and `tokenizer` are what spawned
tokenizer worker processes import, and they must not pay for importing megatron-core and torch
(about 6 s per process), which `datasets` needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "datasets": ("BATCH_KEYS", "EMBEDDED", "DataError", "Stats", "build_datasets",
                 "build_indexed_dataset", "dataset_files", "prepare_embedded_dataset",
                 "read_dataset_meta", "sample_indices", "split_sequence_counts",
                 "step_microbatches", "valid_microbatches"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
