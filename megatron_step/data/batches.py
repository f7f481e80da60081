"""Micro-batches of the train and validation samples, in Megatron's pretraining-sampler order.

The run consumes train samples in order: global step k uses samples [k * gbs, (k + 1) * gbs)
(modulo the dataset length: epochs wrap). So `consumed_samples = step * global_batch_size` is
the whole data state of a checkpoint, and a resumed run gets the same batches. The DP split is
Megatron's MegatronPretrainingSampler's: micro-batch m of DP rank r holds samples
start + (m * dp + r) * mbs + [0, mbs); all DP ranks together see the same global batch whatever
the DP size.

`step_microbatches` is that definition as a pure function. `StepLoader` serves the same
micro-batches the way Megatron-LM's trainer does (`build_pretraining_data_loader`): a torch
DataLoader whose workers read and stack the next micro-batches while the model computes, into
pinned memory when CUDA is available (so host-to-device copies can be asynchronous), instead of
reading them from the memory-mapped dataset in the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_step.forward import Batch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
PREFETCH_FACTOR = 2
"""Micro-batches each DataLoader worker prepares ahead (PyTorch's and Megatron's default)."""


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


def _stack(items: Sequence[dict[str, torch.Tensor]]) -> Batch:
    """A micro-batch from samples (a BlendedDataset's extra `dataset_id` is dropped)."""
    return {key: torch.stack([item[key] for item in items]) for key in BATCH_KEYS}


class _Wrapped(Dataset):
    """A dataset indexed modulo its length (epochs wrap)."""

    def __init__(self, dataset: Any) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset has no samples")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.dataset[index % len(self.dataset)]


def step_microbatches(dataset: Any, *, consumed_samples: int, global_batch_size: int,
                      micro_batch_size: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """This DP rank's micro-batches for the optimizer step after `consumed_samples` samples.

    Args:
        dataset: the train dataset (GPTDataset or BlendedDataset).
        consumed_samples: samples used by all earlier steps (step * global_batch_size).
        global_batch_size: samples per step over all DP ranks.
        micro_batch_size: samples per micro-batch.
        dp_rank, dp_size: this rank's data-parallel coordinates.

    Returns:
        global_batch_size / (micro_batch_size * dp_size) batches with `tokens`, `labels`
        (int64), `loss_mask` (float32) and `position_ids` (int64), each [micro_batch_size,
        seq_length], on CPU.
    """
    wrapped = _Wrapped(dataset)
    return [_stack([wrapped[i] for i in indices]) for indices in
            sample_indices(consumed_samples, global_batch_size, micro_batch_size, dp_rank,
                           dp_size)]


def valid_microbatches(dataset: Any, num_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[Batch]:
    """This DP rank's share of the first `num_samples` validation samples, every evaluation.

    The samples do not depend on the DP size (a multiple of micro_batch_size * dp_size is
    required), so validation losses compare across layouts.
    """
    return step_microbatches(dataset, consumed_samples=0, global_batch_size=num_samples,
                             micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                             dp_size=dp_size)


class _MicroBatchSampler(Sampler[list[int]]):
    """Endless `sample_indices` micro-batches of one DP rank from `start` on."""

    def __init__(self, start: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.start, self.gbs, self.mbs = start, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        sample_indices(start, global_batch_size, micro_batch_size, dp_rank, dp_size)  # check

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start
        while True:
            yield from sample_indices(consumed, self.gbs, self.mbs, self.dp_rank, self.dp_size)
            consumed += self.gbs


class StepLoader:
    """`step_microbatches` served by a DataLoader that prepares the next ones ahead.

    `microbatches(consumed_samples)` returns exactly `step_microbatches(dataset,
    consumed_samples=...)`; called for consecutive steps it takes them from the running
    DataLoader, any other `consumed_samples` (a resume, a jump) restarts it there.
    """

    def __init__(self, dataset: Any, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int,
                 pin_memory: bool | None = None) -> None:
        """Args: as `step_microbatches`; `num_workers` DataLoader processes (0: read in this
        process); `pin_memory` defaults to whether CUDA is available."""
        self.dataset = _Wrapped(dataset)
        self.gbs, self.mbs, self.dp_rank, self.dp_size = (global_batch_size, micro_batch_size,
                                                          dp_rank, dp_size)
        self.num_microbatches = len(sample_indices(0, global_batch_size, micro_batch_size,
                                                   dp_rank, dp_size))
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._batches: Iterator[Batch] | None = None
        self._next = -1

    def microbatches(self, consumed_samples: int) -> list[Batch]:
        """This DP rank's micro-batches of the step after `consumed_samples` samples."""
        if self._batches is None or consumed_samples != self._next:
            self.close()
            sampler = _MicroBatchSampler(consumed_samples, self.gbs, self.mbs, self.dp_rank,
                                         self.dp_size)
            loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_stack,
                                num_workers=self.num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=PREFETCH_FACTOR if self.num_workers else None)
            self._batches = iter(loader)
        batches = [next(self._batches) for _ in range(self.num_microbatches)]
        self._next = consumed_samples + self.gbs
        return batches

    def close(self) -> None:
        """Stop the DataLoader workers (a later call starts new ones)."""
        self._batches = None

