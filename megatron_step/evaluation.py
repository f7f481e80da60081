"""Validation loss and perplexity of a checkpoint on held-out text, at any TP/PP.

Definition (what `evaluate_checkpoint` computes, and what an independent implementation must
reproduce to get the same number):
1. Token stream. A text or JSONL file is read as documents (`sources.read_documents`: JSONL
   records, blank-line blocks, lines or WikiText articles); each non-blank document is tokenized
   without special tokens and closed with the tokenizer's EOD, and the documents are
   concatenated in file order: exactly what `tools/preprocess_data.py` writes. An indexed
   dataset (`<prefix>.bin/.idx`) is read as its sequences concatenated in order (EODs are
   already in it).
2. Windows. With S = the model's seq_length, window i is stream[i*S : i*S + S + 1]: inputs are
   its first S tokens, labels the last S (non-overlapping, like GPTDataset samples). There are
   n = (len(stream) - 1) // S windows (at most `max_tokens` // S); the tail is not scored.
3. Loss = mean over all n * S predicted tokens of -log p(label | preceding tokens of the
   window), natural log; perplexity = exp(loss).

Execution: Megatron's forward-only schedule (`forward.evaluate`) over micro-batches of full
windows. `forward.evaluate` averages per-micro-batch means over micro-batches and DP ranks, which
is the token mean only when every micro-batch scores the same number of tokens; so the first
n - n mod (DP * mbs) windows are dealt to DP ranks in equal contiguous shares of full
micro-batches, and the few remaining windows are scored by every DP rank (micro-batch size 1)
and weighted by their token count. The result is the same on every rank and for every layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tqdm import tqdm

from megatron_step.checkpoint import load_checkpoint, model_config_from_meta
from megatron_step.config import LoraConfig, ParallelConfig, PrecisionConfig
from megatron_step.data.indexed import read_dataset_meta
from megatron_step.data.sources import DocumentFormat, read_documents
from megatron_step.data.tokenizer import Tokenizer
from megatron_step.forward import Batch, evaluate
from megatron_step.inspection import verify_checkpoint
from megatron_step.lora import freeze_and_adapt
from megatron_step.model import build_model
from megatron_step.parallel import init_distributed

MICROBATCHES_PER_CALL = 8
"""Micro-batches per forward-only schedule call (one progress-bar tick)."""


class EvaluationError(ValueError):
    """The data cannot be evaluated with this checkpoint (the message names the input)."""


def indexed_prefix(data: str | Path) -> str | None:
    """The dataset prefix when `data` names an indexed dataset (prefix, .bin or .idx)."""
    text = str(data)
    prefix = text[:-4] if text.endswith((".bin", ".idx")) else text
    return prefix if IndexedDataset.exists(prefix) else None


def _limited(chunks: Iterator[np.ndarray], limit: int | None) -> np.ndarray:
    """Concatenate token chunks, stopping once `limit` tokens are collected."""
    parts, total = [], 0
    for chunk in chunks:
        parts.append(chunk)
        total += len(chunk)
        if limit is not None and total >= limit:
            break
    return np.concatenate(parts)[:limit] if parts else np.zeros(0, dtype=np.int64)


def read_token_stream(data: str | Path, tokenizer: Tokenizer | None, *,
                      document_format: DocumentFormat = "auto", json_key: str = "text",
                      max_tokens: int | None = None) -> torch.Tensor:
    """The token stream of step 1 of the module docstring (int64, at most `max_tokens`).

    Raises:
        EvaluationError: text data without a tokenizer, or an indexed dataset made with another
            tokenizer than the one given.
        CorpusError: unreadable or malformed text file (names file and line).
    """
    prefix = indexed_prefix(data)
    if prefix is not None:
        meta = read_dataset_meta(prefix)
        if (tokenizer is not None and meta is not None
                and meta["tokenizer"] != dict(tokenizer.unique_identifiers)):
            raise EvaluationError(f"--data {str(data)!r} was tokenized with "
                                  f"{meta['tokenizer_description']}, not {tokenizer.describe()}")
        dataset = IndexedDataset(prefix)
        chunks = (dataset[i].astype(np.int64) for i in range(len(dataset)))
    else:
        if tokenizer is None:
            raise EvaluationError(f"--tokenizer: needed to read text data {str(data)!r} (the "
                                  "checkpoint records no data.tokenizer)")
        documents = read_documents(Path(data), document_format=document_format,
                                   json_key=json_key)
        chunks = (np.asarray([*tokenizer.encode(text), tokenizer.eod], dtype=np.int64)
                  for text in documents if text.strip())
    return torch.from_numpy(_limited(chunks, max_tokens))


def windows(stream: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[n, seq_length + 1] non-overlapping windows of step 2 of the module docstring."""
    count = (len(stream) - 1) // seq_length
    starts = torch.arange(count) * seq_length
    return stream[starts.unsqueeze(1) + torch.arange(seq_length + 1)]


def microbatch(rows: torch.Tensor) -> Batch:
    """A fully scored micro-batch from windows [b, seq_length + 1]."""
    tokens = rows[:, :-1].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return {"tokens": tokens, "labels": rows[:, 1:].contiguous(),
            "loss_mask": torch.ones(tokens.shape, dtype=torch.float32), "position_ids": positions}


def dp_share(num_windows: int, dp_size: int, dp_rank: int, micro_batch_size: int
             ) -> tuple[range, range]:
    """(this DP rank's equal share of full micro-batches, the remainder every rank scores)."""
    per_rank = num_windows // (dp_size * micro_batch_size) * micro_batch_size
    main = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    return main, range(dp_size * per_rank, num_windows)


def _weighted_loss(chunks: list[torch.nn.Module], rows: torch.Tensor, micro_batch_size: int,
                   tokens_per_call: int, progress: bool) -> float:
    """Sum over schedule calls of (DP-mean loss x tokens scored by all DP ranks)."""
    batches = [microbatch(rows[i:i + micro_batch_size])
               for i in range(0, len(rows), micro_batch_size)]
    total = 0.0
    calls = range(0, len(batches), MICROBATCHES_PER_CALL)
    for start in tqdm(calls, desc="evaluating", unit="call", disable=not progress):
        group = batches[start:start + MICROBATCHES_PER_CALL]
        total += evaluate(chunks, group) * tokens_per_call * len(group)
    return total


def evaluate_checkpoint(checkpoint: str | Path, stream: torch.Tensor, *,
                        parallel: ParallelConfig | None = None,
                        params_dtype: str = "fp32", micro_batch_size: int = 1,
                        progress: bool = True) -> dict[str, Any]:
    """Loss and perplexity of `checkpoint` on a token stream (module docstring), on every rank.

    Collective: every rank of the current world (or a new world of one) calls it. Unmerged
    adapters in the checkpoint are attached before loading, so they count.

    Args:
        checkpoint: megatron_step checkpoint directory (any saved layout).
        stream: the token stream (`read_token_stream`), identical on every rank.
        parallel: TP and PP to evaluate at (default 1 and 1); DP is the rest of the world.
        params_dtype: "fp32" or "bf16" weights for the forward pass.
        micro_batch_size: windows per micro-batch.

    Raises:
        CheckpointError: incomplete or corrupt checkpoint (names what is missing).
        EvaluationError: fewer than seq_length + 1 tokens, or ids outside the vocabulary.
    """
    meta = verify_checkpoint(checkpoint)
    model = model_config_from_meta(meta)
    rows = windows(stream, model.seq_length)
    if len(rows) == 0:
        raise EvaluationError(f"--data: {len(stream)} tokens, at least seq_length + 1 = "
                              f"{model.seq_length + 1} needed")
    if int(stream.max()) >= model.vocab_size or int(stream.min()) < 0:
        raise EvaluationError(f"--data: token ids reach {int(stream.max())}, the model's "
                              f"vocabulary has {model.vocab_size} (another tokenizer?)")
    parallel = parallel or ParallelConfig()
    layout = init_distributed(model, model.num_layers, parallel)
    gpt = build_model(model, model.num_layers, parallel,
                      PrecisionConfig(params_dtype=params_dtype),
                      pre_process=layout.is_first_stage, post_process=layout.is_last_stage)
    adapters = meta.get("adapters")
    if adapters:
        freeze_and_adapt([gpt], adapters["layers"],
                         LoraConfig(rank=adapters["rank"], alpha=adapters["alpha"],
                                    targets=tuple(adapters["targets"])), seed=0)
    load_checkpoint(checkpoint, [gpt])
    main, rest = dp_share(len(rows), layout.data_parallel_size, layout.dp_rank,
                          micro_batch_size)
    seq = model.seq_length
    total = _weighted_loss([gpt], rows[main.start:main.stop], micro_batch_size,
                           micro_batch_size * seq * layout.data_parallel_size, progress)
    total += _weighted_loss([gpt], rows[rest.start:rest.stop], 1, seq, progress=False)
    loss = total / (len(rows) * seq)
    return {"checkpoint": str(checkpoint), "loss": loss, "perplexity": math.exp(loss),
            "tokens": len(rows) * seq, "windows": len(rows), "seq_length": seq,
            "stream_tokens": len(stream), "stage": meta.get("stage"),
            "global_step": meta.get("global_step"), "params_dtype": params_dtype,
            "layout": {"tensor_model_parallel_size": layout.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": layout.pipeline_model_parallel_size,
                       "data_parallel_size": layout.data_parallel_size}}
