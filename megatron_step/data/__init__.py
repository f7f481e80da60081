"""Training data: text -> token ids -> Megatron indexed datasets -> GPTDataset samples -> batches.

Modules, in pipeline order:
- `tokenizer`: the tokenizers a `data.tokenizer` spec names (byte, tokenizer.json, SentencePiece).
- `sources`: input files (text, JSONL, .gz/.zst, parquet, globs) read as documents in chunks.
- `corpus`: sentence splitting, tokenization in worker processes, the embedded demo corpus.
- `indexed`: Megatron indexed datasets (`.bin/.idx`, optionally sharded) written from inputs.
- `datasets`: Megatron GPTDatasets (blended by weight) read from them, with clear errors.
- `accounting`: tokens and epochs each stage draws from each dataset.
- `batches`: the per-step micro-batches, and the DataLoader that prepares them ahead.

The names below are re-exported lazily (PEP 562): `sources`, `corpus` and `tokenizer` are what
spawned tokenizer worker processes import, and they must not pay for importing megatron-core and
torch (about 6 s per process), which `indexed` and `datasets` need.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sources": ("CorpusError", "expand_inputs", "read_documents", "texts"),
    "indexed": ("Stats", "build_indexed_dataset", "dataset_files", "read_dataset_meta"),
    "datasets": ("EMBEDDED", "Blend", "DataError", "build_datasets", "check_blend",
                 "prepare_embedded_dataset", "resolve_blend", "split_bounds"),
    "batches": ("BATCH_KEYS", "StepLoader", "sample_indices", "step_microbatches",
                "valid_microbatches"),
    "accounting": ("describe", "token_accounting"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
