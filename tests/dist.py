"""Run a function in N real gloo processes from pytest.

`run_world(fn, world_size, *args)` starts `world_size` processes, joins them to one gloo process
group over a `FileStore`, calls `fn(*args)` in each and returns the per-rank results (rank order).
The first child failure is re-raised in the test with its rank and traceback; a world that does
not finish within `timeout` seconds is killed and reported, so a hang never stalls CI. Groups are
always destroyed in the children.

Children come from a `forkserver` that has torch and megatron-core imported already, so a world
starts in about a second instead of paying the imports in every process. CUDA is hidden from the
forkserver: multi-process tests run on CPU/gloo even on a GPU node (one GPU cannot host several
NCCL ranks), which keeps them identical everywhere.

`fn` must be a module-level function of an importable module (it is pickled by reference).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.forkserver
import os
import pickle
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt",
            "megatron.core.distributed", "megatron.core.optimizer",
            "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel"]


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the forkserver when it starts
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return ctx


def _worker(fn: Callable[..., Any], rank: int, world_size: int, store_path: str,
            args: tuple, kwargs: dict, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from megatron_step.parallel import destroy_distributed

    torch.set_num_threads(1)  # several ranks share 2 cores
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        payload = pickle.dumps(fn(*args, **kwargs))
        results.put((rank, True, payload))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300,
              **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return results in rank order.

    Raises:
        RuntimeError: a rank raised (message has its rank and traceback) or the world timed out.
    """
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="run_world-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, name=f"rank{rank}",
                             args=(fn, rank, world_size, store_path, args, kwargs, results))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise RuntimeError(f"run_world({fn.__name__}): ranks {missing} did not "
                                       f"finish within {timeout:.0f} s") from None
                outcomes[rank] = (ok, payload)
                if not ok:  # fail fast: the other ranks may be blocked in a collective
                    raise RuntimeError(f"run_world({fn.__name__}): rank {rank} failed:\n"
                                       f"{payload}")
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]
