"""Checkpoints and worlds shared by the growth tests (module-level: `run_world` pickles them).

The source model is the tiny 4-layer LLaMA saved as a stage-1 checkpoint whose metadata describes
an 8-layer target model (`model.num_layers: 8`), as a STEP trainer writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from megatron_step.checkpoint import save_checkpoint
from megatron_step.config import ModelConfig, OptimizerConfig, ParallelConfig, model_preset
from megatron_step.forward import train_step
from megatron_step.growth_offline import prepare_growth, run_growth
from megatron_step.optim import wrap_and_optimize
from megatron_step.parallel import local_world

from builders import FP32, build_world_model, load_at_layout, microbatches, random_tokens

SOURCE_DEPTH = 4
GROWN_DEPTH = 6


def target_model() -> ModelConfig:
    """The run's target model: the tiny preset at 8 layers (the source holds 4 of them)."""
    return model_preset("tiny", num_layers=8)


def source_meta() -> dict[str, Any]:
    """Metadata of a stage-1 checkpoint written by a trainer (no `layers`: all born in 1)."""
    return {"model": dataclasses.asdict(target_model()), "num_layers": SOURCE_DEPTH, "stage": 1,
            "kind": "train", "global_step": 10}


def parallel(tp: int, pp: int) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def save_source(path: Path) -> None:
    """Build the 4-layer model at this world's layout (TP=PP=1), take one Adam step and save
    model and optimizer state with metadata, like a trainer's mid-stage checkpoint."""
    model = target_model()
    _, gpt = build_world_model(model, SOURCE_DEPTH, ParallelConfig())
    chunks, optimizer = wrap_and_optimize([gpt], ParallelConfig(), FP32, OptimizerConfig(),
                                          lr=1e-3)
    train_step(chunks, optimizer, microbatches(random_tokens(model)))
    save_checkpoint(path, [gpt], source_meta(), optimizer=optimizer)


def reshard_source(src: Path, dst: Path, tp: int, pp: int) -> None:
    """Load `src` at (tp, pp) and save it again from there (same weights, other shards)."""
    _, gpt = load_at_layout(target_model(), SOURCE_DEPTH, parallel(tp, pp), src)
    save_checkpoint(dst, [gpt], source_meta())


def grow_offline(src: Path, dst: Path, **request: Any) -> Path:
    """The offline tool's library path, in the current world (or a world of one)."""
    with local_world():
        return run_growth(prepare_growth(src, dst, **request), progress=False)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """{relative path: (size, mtime_ns, sha256)} of every file under `root` ({} if absent)."""
    if not root.exists():
        return {}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in files}


def unequal_params(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of parameters that are not bit-identical between two same-layout chunks."""
    b_params = dict(b.named_parameters())
    return [name for name, p in a.named_parameters() if not torch.equal(p, b_params[name])]
