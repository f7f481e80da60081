"""Opt-in shims that let megatron-core 0.16.1 run on CPU with gloo (no CUDA, no GPU).

megatron-core hard-codes CUDA in a few places that every training flow touches. On a machine
without CUDA, `enable()` maps those calls to the CPU, once per process, before any model, DDP
wrapper or optimizer is built. It is never applied on import and never on a machine where
`torch.cuda.is_available()`: there nothing is patched. `torch.cuda.is_available()` itself stays
False on purpose, because Transformer Engine import guards and the checkpoint strategies rely on it.

Patched symbols, each found necessary by removing it from a TP2xPP2 DistributedOptimizer run
(see ../shared/docs/megatron_notes.md, section 1):

1. `torch.cuda.current_device` -> `torch.device("cpu")`: DDP grad buffers, pipeline p2p buffers,
   RoPE `inv_freq`, `GlobalMemoryBuffer` all allocate on "the current CUDA device".
2. `torch.cuda.synchronize` -> no-op: pipeline send/recv and checkpoint preloading synchronise.
3. `torch.cuda.get_rng_state / set_rng_state / manual_seed` -> the CPU default generator:
   `model_parallel_cuda_manual_seed` and the RNG tracker seed "the CUDA generator". (Not
   `torch.manual_seed`, which calls `torch.cuda.manual_seed_all` and would recurse.)
4. `megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state` -> CPU RNG:
   the tracker's `fork()` indexes `torch.cuda.default_generators` directly.
5. `device="cuda"` in tensor factories (`torch.zeros`, `torch.tensor`, ...) -> "cpu": the causal
   mask, the optimizer's `found_inf` / overflow buffers, grad clipping, token counting.
6. `Tensor.type()` without arguments reports `torch.cuda.*Tensor` for CPU tensors: the optimizers
   and grad clipping assert on these type strings.
7. `Tensor.cuda` -> identity and `Tensor.to("cuda")` -> CPU: broadcast of data, optimizer restore,
   checkpoint exchange utilities (not hit in tested flows; cheap insurance).
8. The torch_dist checkpoint writer's results queue becomes a plain `queue.Queue`: megatron
   creates a spawn-context `Manager().Queue()` on the first save (4-11 s on 2 cores, and the
   spawn re-imports `__main__`). A plain queue is correct for synchronous saves, the only kind
   megatron_step makes on CPU.
9. The "CPU RNG state changed within GPU RNG context" warning is silenced: with shim 3 the CUDA
   tracker swaps the CPU generator, which is exactly what we want.
10. `torch.utils._device._device_constructors()` is called before shim 5 wraps the factories:
   `with torch.device(...)` (transformers' from_pretrained uses it) recognises factories by
   identity in a set cached on first use. Cached after wrapping, the set would hold the wrappers
   while the device mode sees the original functions, so the context device would be ignored.
"""

from __future__ import annotations

import functools
import logging
import queue
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._device import _device_constructors

_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
              "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "linspace", "eye",
              "randperm", "empty_strided")

_enabled = False


def is_enabled() -> bool:
    """Whether `enable()` has patched this process."""
    return _enabled


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_device_kwarg(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_methods() -> None:
    original_type = torch.Tensor.type
    original_to = torch.Tensor.to

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and result.startswith("torch.") and ".cuda." not in result:
            return "torch.cuda." + result[len("torch."):]
        return result

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    logging.getLogger(tp_random.__name__).setLevel(logging.ERROR)


def enable() -> bool:
    """Patch this process for megatron-core on CPU; idempotent.

    Call once per process, before building models, DDP wrappers and optimizers. Does nothing and
    returns False when CUDA is available (GPU runs are never patched).

    Returns:
        True when the shims are active after the call.
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _device_constructors()  # shim 10: cache the original factories before wrapping them
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device_kwarg(getattr(torch, name)))
    _patch_tensor_methods()
    _patch_rng()

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()
    _enabled = True
    return True
