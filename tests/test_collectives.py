"""Collectives go through `megatron_step.collectives`, which puts tensors where the backend wants.

The GPU crash these tests guard against: a CPU tensor handed to a collective over an NCCL group
("No backend type associated with device type cpu"), at every layout including TP=PP=1. NCCL is
not available here, so a backend registered for CUDA tensors only (gloo underneath) stands in for
it: it refuses CPU tensors exactly as NCCL does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_step import collectives
from megatron_step.collectives import backend_device_type

from dist import run_world

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_step"
# torch.distributed calls that move data between ranks (point-to-point included)
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier",
               "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "irecv", "isend", "monitored_barrier", "recv", "recv_object_list",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
               "scatter_object_list", "send", "send_object_list"}


def _direct_collective_calls(path: Path) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls and `from torch.distributed import X`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in aliases:
                found.append(f"{path.name}:{node.lineno} calls {ast.unparse(node.func)}")
    return found


def test_no_module_calls_a_collective_directly() -> None:
    """Every collective of the package goes through `collectives` (placement in one place)."""
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "collectives.py" for hit in _direct_collective_calls(path)]
    assert offenders == [], "use megatron_step.collectives instead:\n" + "\n".join(offenders)


def test_the_scanner_sees_direct_calls(tmp_path: Path) -> None:
    """The scan above is not vacuous: it flags each spelling of a direct collective."""
    source = tmp_path / "bad.py"
    source.write_text(textwrap.dedent("""
        import torch
        import torch.distributed as dist
        import torch.distributed as d2
        from torch.distributed import all_reduce
        dist.all_reduce(torch.zeros(1))
        d2.broadcast(torch.zeros(1), src=0)
        torch.distributed.barrier()
        dist.get_rank()
    """))
    hits = _direct_collective_calls(source)
    assert len(hits) == 4, hits
    assert not any("get_rank" in hit for hit in hits)


@pytest.mark.parametrize(("config", "device"), [
    ("cpu:gloo,cuda:gloo", "cpu"), ("cuda:nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cpu"),
    ("nccl", "cuda"), ("gloo", "cpu"), ("cuda:custom", "cuda")])
def test_backend_device_type(config: str, device: str) -> None:
    """NCCL-only groups get CUDA tensors, anything with a CPU backend gets CPU tensors."""
    assert backend_device_type(config) == device


_CUDA_ONLY_WORLD = """
import torch, torch.distributed as dist
from megatron_step import cpu_compat
cpu_compat.enable()
dist.Backend.register_backend(
    "cudaonly", lambda store, rank, size, timeout: dist.ProcessGroupGloo(store, rank, size,
                                                                         timeout),
    devices=["cuda"])
dist.init_process_group("cudaonly", store=dist.HashStore(), rank=0, world_size=1)
"""

_CUDA_ONLY_CHECKS = """
from megatron.core import parallel_state as ps
from megatron_step import collectives, lora
from megatron_step.config import LoraConfig, ParallelConfig, PrecisionConfig, model_preset
from megatron_step.forward import _reduce_to_all
from megatron_step.metrics import max_over_ranks
from megatron_step.model import build_model
from megatron_step.parallel import init_distributed
from megatron_step.train import StopFlag

# the failure mode itself: a CPU tensor on a CUDA-only group
try:
    dist.all_reduce(torch.zeros(1))
    raise SystemExit("a CUDA-only backend accepted a CPU tensor: the stand-in is broken")
except RuntimeError as exc:
    assert "device type cpu" in str(exc), exc
tiny = model_preset("tiny")
init_distributed(tiny, 4, ParallelConfig())
assert collectives.collective_device(ps.get_model_parallel_group()).type == "cuda"
gpt = build_model(tiny, 4, ParallelConfig(), PrecisionConfig(params_dtype="fp32"),
                  pre_process=True, post_process=True)
report = lora.freeze_and_adapt([gpt], {0, 1}, LoraConfig(rank=4), seed=1)
assert report.model.adapter > 0
assert max_over_ranks({"a": 3}) == {"a": 3}
assert _reduce_to_all(2.5) == 2.5
assert StopFlag().agreed() is False
collectives.barrier()
print("CUDA-ONLY WORLD OK")
"""


def test_trainer_collectives_run_on_a_cuda_only_world() -> None:
    """Stage setup (freeze_and_adapt's counts), metrics, loss reduction and the stop flag work in
    a world whose groups refuse CPU tensors, as NCCL's do at TP=PP=1 (today's first GPU crash)."""
    result = subprocess.run([sys.executable, "-c", _CUDA_ONLY_WORLD + _CUDA_ONLY_CHECKS],
                            capture_output=True, text=True, timeout=180)
    assert "CUDA-ONLY WORLD OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def _collective_round(tag: str) -> dict:
    """Each helper once over a 2-rank gloo world; returns what this rank saw."""
    rank = dist.get_rank()
    summed = collectives.all_reduce_values([rank + 1, 10], dtype=torch.int64)
    maximum = collectives.all_reduce(torch.tensor([float(rank)]), "max")
    mean = collectives.all_reduce(torch.tensor([float(rank)]), "mean")
    source = collectives.broadcast(torch.tensor([rank * 7.0]), src=1)
    obj = collectives.broadcast_object({"from": rank, "tag": tag} if rank == 0 else None, src=0)
    if rank == 0:
        collectives.send(torch.arange(3.0), dst=1)
        received = None
    else:
        received = collectives.recv(torch.empty(3), src=0).tolist()
    collectives.barrier()
    return {"sum": summed, "max": maximum.item(), "mean": mean.item(), "bcast": source.item(),
            "obj": obj, "recv": received, "device": str(collectives.collective_device())}


def test_helpers_over_gloo() -> None:
    """Sum/max/mean, broadcast (tensor and object), send/recv and barrier over 2 gloo ranks."""
    first, second = run_world(_collective_round, 2, "x", timeout=120)
    for seen in (first, second):
        assert seen["sum"] == [3, 20]
        assert seen["max"] == 1.0 and seen["mean"] == 0.5 and seen["bcast"] == 7.0
        assert seen["obj"] == {"from": 0, "tag": "x"} and seen["device"] == "cpu"
    assert second["recv"] == [0.0, 1.0, 2.0]


def test_helpers_without_a_world() -> None:
    """Without torch.distributed every helper is the identity (single-process tools)."""
    assert not dist.is_initialized()
    assert collectives.all_reduce_values([4, 5]) == [4.0, 5.0]
    assert collectives.broadcast_object("x", src=0) == "x"
    assert collectives.group_size() == 1
    collectives.barrier()
