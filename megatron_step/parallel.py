"""torch.distributed + Megatron model-parallel initialisation and teardown.

One entry point, `init_distributed`, covers every launch: `torchrun` (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT), SLURM with one task per GPU (SLURM_PROCID / SLURM_NTASKS
/ SLURM_LOCALID), an explicit world (tests pass rank, world size and a store), or nothing at all
(a single process). NCCL is used with CUDA, gloo on CPU; on CPU the compatibility layer
(`cpu_compat`) is switched on here, explicitly, before any Megatron object is built.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_step import cpu_compat
from megatron_step.config import ModelConfig, ParallelConfig
from megatron_step.layout import ParallelSizes, check_layout


@dataclass(frozen=True, slots=True)
class Layout:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    """Where this rank's model lives (collectives pick their own: `collectives`)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_model_parallel_size - 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def _start_process_group(rank: int | None, world_size: int | None,
                         store: dist.Store | None, timeout: datetime.timedelta) -> None:
    """Join (or create) the default process group from explicit values or the environment."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID")
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS")
    if torch.cuda.is_available():
        local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if rank is None or world_size is None:  # plain `python -m ...`: a world of one
        rank, world_size, store = 0, 1, store or dist.HashStore()
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"rank {rank} of {world_size}: MASTER_ADDR and MASTER_PORT must be set "
                           "(torchrun sets them; under SLURM, slurm/common.sh does)")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timeout)


def init_distributed(model: ModelConfig, num_layers: int, parallel: ParallelConfig, *,
                     seed: int = 1234, rank: int | None = None, world_size: int | None = None,
                     store: dist.Store | None = None,
                     timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> Layout:
    """Initialise torch.distributed and Megatron's TP/PP/DP groups, then seed Megatron's RNGs.

    Args:
        model: model dimensions, checked against the layout.
        num_layers: depth of the first model that will be built (stage 1's depth).
        parallel: requested TP and PP; DP is derived from the world size.
        seed: seed for Megatron's CPU/CUDA RNG trackers (same init on every TP layout).
        rank, world_size, store: an explicit world (tests); default from the environment.
        timeout: collective timeout.

    Returns:
        This process's Layout.

    Raises:
        ValueError: the layout cannot hold the model (names the setting and the values).
    """
    if not torch.cuda.is_available():
        cpu_compat.enable()
    if not dist.is_initialized():
        _start_process_group(rank, world_size, store, timeout)
    sizes = ParallelSizes(dist.get_world_size(), parallel.tensor_model_parallel_size,
                          parallel.pipeline_model_parallel_size)
    check_layout(model, num_layers, sizes)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)
    return Layout(
        rank=dist.get_rank(),
        world_size=sizes.world_size,
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        data_parallel_size=sizes.data_parallel_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=model_device(),
    )


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_world() -> Iterator[None]:
    """The process world of a tool that reads or writes checkpoints outside the trainer.

    Reuses an existing process group (the trainer's, a test world) and leaves it alone.
    Otherwise it joins torchrun's world when launched by torchrun with WORLD_SIZE > 1 (RANK,
    MASTER_ADDR and MASTER_PORT from the environment), else creates a world of one (also under
    `srun --ntasks=1`, which sets no rendezvous); either is destroyed on exit. The backend is
    gloo even on GPU nodes: tools move CPU tensors, which NCCL cannot carry.
    """
    if not torch.cuda.is_available():
        cpu_compat.enable()
    if dist.is_initialized():
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo", init_method="env://")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def model_device() -> torch.device:
    """Where this rank's model lives: its GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_rank0() -> bool:
    """True on global rank 0 (or without torch.distributed): the process that logs."""
    return not dist.is_initialized() or dist.get_rank() == 0
