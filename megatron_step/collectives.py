"""Every collective megatron_step issues, with its tensors where the group's backend takes them.

NCCL carries only CUDA tensors and gloo carries CPU ones (gloo's CUDA support is partial), and a
tensor built with a plain `torch.tensor([...])` lives on the CPU. Calling `torch.distributed`
directly with such a tensor works on every CPU test and crashes on the first GPU run ("No backend
type associated with device type cpu"), even at TP=PP=1, because Megatron's groups are NCCL there.
So no other module of the package calls a `torch.distributed` collective: they call these helpers,
which move their tensors to `collective_device(group)` (read from the group's own backend
configuration, not from `torch.cuda.is_available()`: tools use gloo on GPU nodes) and hand results
back on the caller's device. `tests/test_collectives.py` fails if a module bypasses them.

Groups of one process skip the communication altogether (nothing to exchange), and every helper
is a no-op without an initialised default process group, so single-process tools need no world.
Ranks (`src`, `dst`) are global ranks, as in `torch.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "max", "min", "mean"]
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "mean": dist.ReduceOp.SUM}  # gloo has no AVG: sum, then divide


def backend_device_type(backend_config: str) -> str:
    """'cpu' when a backend configuration serves CPU tensors, else 'cuda'.

    `torch.distributed.get_backend_config` reports `cpu:gloo,cuda:gloo` for gloo, `cuda:nccl`
    for NCCL and `cpu:gloo,cuda:nccl` for a mixed group; a bare name (older torch) is a backend
    that serves CPU tensors unless it is NCCL.
    """
    entries = [e.strip() for e in backend_config.lower().split(",") if e.strip()]
    if any(":" in e for e in entries):
        return "cpu" if any(e.startswith("cpu:") for e in entries) else "cuda"
    return "cuda" if entries == ["nccl"] else "cpu"


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors for a collective over `group` (default: the world) must live."""
    if not dist.is_initialized():
        return torch.device("cpu")
    if backend_device_type(dist.get_backend_config(group)) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():  # a CUDA-only group without a GPU: still say so
        return torch.device("cuda")
    return torch.device("cuda", torch.cuda.current_device())


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in `group` (1 without torch.distributed)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _communicates(group: dist.ProcessGroup | None) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(tensor: torch.Tensor, op: ReduceOp = "sum",
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce `tensor` over `group`; returns the result on `tensor`'s device (input untouched).

    `mean` sums and divides by the group size (floating-point tensors only).
    """
    if not _communicates(group):
        return tensor.clone()
    work = tensor.detach().to(collective_device(group), copy=True)
    dist.all_reduce(work, op=_OPS[op], group=group)
    if op == "mean":
        work /= dist.get_world_size(group)
    return work.to(tensor.device)


def all_reduce_values(values: Sequence[float | int], op: ReduceOp = "sum",
                      group: dist.ProcessGroup | None = None,
                      dtype: torch.dtype = torch.float64) -> list[Any]:
    """`all_reduce` of a list of Python numbers; returns Python numbers of the same kind."""
    result = all_reduce(torch.tensor(list(values), dtype=dtype), op, group)
    return result.tolist()


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None
              ) -> torch.Tensor:
    """`src`'s `tensor` on every rank of `group` (same shape and dtype everywhere), on the
    caller's device."""
    if not _communicates(group):
        return tensor
    work = tensor.detach().to(collective_device(group), copy=True)
    dist.broadcast(work, src=src, group=group)
    return work.to(tensor.device)


def broadcast_object(obj: Any, src: int, group: dist.ProcessGroup | None = None) -> Any:
    """`src`'s picklable `obj` on every rank of `group` (pickled through collective_device)."""
    if not _communicates(group):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=group, device=collective_device(group))
    return holder[0]


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable `obj`, in group rank order.

    torch pickles through the group's device type (under NCCL the *current* CUDA device, which
    `parallel.init_distributed` sets per local rank); it takes no device argument.
    """
    if not _communicates(group):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank of `group`."""
    if not _communicates(group):
        return
    if collective_device(group).type == "cuda":  # NCCL: name the device, or torch guesses it
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None = None) -> None:
    """Blocking point-to-point send of `tensor` to global rank `dst`."""
    dist.send(tensor.detach().to(collective_device(group)).contiguous(), dst, group=group)


def recv(like: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Receive a tensor shaped and typed like `like` from global rank `src`, on `like`'s
    device."""
    work = torch.empty(like.shape, dtype=like.dtype, device=collective_device(group))
    dist.recv(work, src, group=group)
    return work.to(like.device)
