"""The LLaMA model under Megatron's TP and PP: same function in every layout, training works."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_step.config import OptimizerConfig, ParallelConfig, model_preset
from megatron_step.forward import compute_logits, evaluate, train_step
from megatron_step.optim import wrap_and_optimize
from megatron_step.parallel import init_distributed

from builders import (
    FP32,
    build_world_model,
    load_at_layout,
    microbatches,
    random_tokens,
    save_reference,
)
from dist import run_world

LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def _reference(path: Path) -> tuple[torch.Tensor, float]:
    tiny = model_preset("tiny")
    save_reference(tiny, 4, path)
    _, gpt = load_at_layout(tiny, 4, ParallelConfig(), path)
    tokens = random_tokens(tiny)
    return compute_logits([gpt], tokens), evaluate([gpt], microbatches(tokens, 2))


def _logits_and_loss(tp: int, pp: int, path: Path) -> tuple[torch.Tensor, float]:
    tiny = model_preset("tiny")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _, gpt = load_at_layout(tiny, 4, parallel, path)
    tokens = random_tokens(tiny)
    return compute_logits([gpt], tokens), evaluate([gpt], microbatches(tokens, 2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, float]:
    path = tmp_path_factory.mktemp("reference") / "ckpt"
    logits, loss = run_world(_reference, 1, path)[0]
    return path, logits, loss


@pytest.mark.parametrize(("tp", "pp"), LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_layout_matches_single_process_logits_and_loss(reference, tp: int, pp: int) -> None:
    """TP/PP sharding must not change the function: same weights -> same logits and loss.

    The weights are built once (TP=PP=1), saved as a distributed checkpoint and loaded into each
    layout; the loss goes through Megatron's pipeline schedule (1F1B when PP > 1).
    """
    path, ref_logits, ref_loss = reference
    results = run_world(_logits_and_loss, tp * pp, tp, pp, path)
    for rank, (logits, loss) in enumerate(results):
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")
        assert loss == pytest.approx(ref_loss, abs=1e-5), f"rank {rank}: {loss} vs {ref_loss}"


def _fresh_logits(tp: int, pp: int) -> torch.Tensor:
    tiny = model_preset("tiny")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _, gpt = build_world_model(tiny, 4, parallel, seed=7)
    return compute_logits([gpt], random_tokens(tiny))


def test_fresh_initialisation_does_not_depend_on_the_layout() -> None:
    """Same seed -> same initial model at any TP x PP (layers are seeded by global index), so
    runs at different layouts start from the same weights."""
    reference = run_world(_fresh_logits, 1, 1, 1)[0]
    for tp, pp in LAYOUTS:
        logits = run_world(_fresh_logits, tp * pp, tp, pp)[0]
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0,
                                   msg=lambda m, t=tp, p=pp: f"TP={t} PP={p}: {m}")


def _train_losses(tp: int, distributed_optimizer: bool, steps: int = 4) -> list[float]:
    tiny = model_preset("tiny")
    parallel = ParallelConfig(tensor_model_parallel_size=tp,
                              use_distributed_optimizer=distributed_optimizer)
    _, gpt = build_world_model(tiny, 4, parallel)
    chunks, optimizer = wrap_and_optimize([gpt], parallel, FP32, OptimizerConfig(), lr=3e-3)
    batches = microbatches(random_tokens(tiny), 2)
    return [train_step(chunks, optimizer, batches)["loss"] for _ in range(steps)]


def _train_both_optimizers(tp: int) -> dict[bool, list[float]]:
    return {distopt: _train_losses(tp, distopt) for distopt in (False, True)}


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_optimizer_steps_reduce_loss(tp: int) -> None:
    """Megatron DDP + Adam (plain and DistributedOptimizer) lowers the loss on a fixed batch,
    and both optimizers take identical steps (sharding Adam states must not change the math)."""
    results = run_world(_train_both_optimizers, tp, tp)
    for distopt, losses in results[0].items():
        assert losses[-1] < losses[0] - 0.05, f"distributed_optimizer={distopt}: {losses}"
    assert results[0][False] == pytest.approx(results[0][True], abs=1e-5)
    assert results[-1] == results[0], "TP ranks disagree on the loss"


def test_init_distributed_rejects_impossible_layouts(world1: None) -> None:
    """A world of one process cannot host TP=2: the error names the setting and the numbers."""
    tiny = model_preset("tiny")
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by "
                                         r"tensor_model_parallel_size \(2\)"):
        init_distributed(tiny, 4, ParallelConfig(tensor_model_parallel_size=2))
