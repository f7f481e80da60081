"""What a run reports: measured memory, the metrics stream, the summary and the plots.

Memory is measured, not estimated: `measure_model_state` adds up the bytes of the tensors a
training step keeps alive between steps (model weights, Megatron DDP gradient buffers, fp32 master
copies, Adam moments), deduplicated by storage, for this rank. On GPU the peak also comes from
`torch.cuda.max_memory_allocated`; on CPU from the process peak RSS. The stage planner predicts the
same `model_state_bytes` (memory.MemoryBreakdown), which is what benchmarks compare.

Only rank 0 writes files: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars
when the `tensorboard` package is installed, Weights & Biases when `logging.wandb` is set
(`wandb_logging`), `summary.json` and PNG plots.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_step import collectives, fp8_storage, te
from megatron_step.checkpoint import write_json_atomic
from megatron_step.config import WandbConfig
from megatron_step.log import logger
from megatron_step.optim import leaf_optimizers
from megatron_step.parallel import is_rank0
from megatron_step.wandb_logging import WandbRun, require_wandb


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (tensor.device.type, tensor.untyped_storage().data_ptr())


def _nbytes(tensor: torch.Tensor) -> int:
    return te.stored_nbytes(tensor)


def measure_model_state(chunks: Sequence[torch.nn.Module], optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds in model state, by component (the planner's categories).

    Args:
        chunks: the DDP-wrapped model chunks (their `buffers` hold the gradient buffers).
        optimizer: the Megatron optimizer built over them.

    Returns:
        `weights` (every parameter, frozen ones included), `grads` (DDP grad buffers),
        `master_weights` (fp32 copies distinct from the weights), `optimizer_states` (Adam
        exp_avg + exp_avg_sq) and their sum `model_state_bytes`; plus the local
        `trainable_params` / `frozen_params` element counts.
    """
    weights, seen = 0, set()
    trainable = frozen = 0
    for chunk in chunks:
        for param in chunk.parameters():
            key = _storage_key(param)
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
            weights += _nbytes(param)
            seen.add(key)
    grads = sum(_nbytes(buffer.grad_data) for chunk in chunks
                for buffer in getattr(chunk, "buffers", []) if buffer.grad_data is not None)
    master = states = 0
    for inner in (leaf.optimizer for leaf in leaf_optimizers(optimizer)):
        for group in inner.param_groups:
            for param in group["params"]:
                if _storage_key(param) not in seen:
                    master += _nbytes(param)
                    seen.add(_storage_key(param))
        for state in inner.state.values():
            states += sum(_nbytes(v) for k, v in state.items()
                          if k in ("exp_avg", "exp_avg_sq") and isinstance(v, torch.Tensor))
    weights += fp8_storage.stored_bytes(chunks)  # FP8 scales (the FP8 weights are parameters)
    return {"weights": weights, "grads": grads, "master_weights": master,
            "optimizer_states": states, "model_state_bytes": weights + grads + master + states,
            "trainable_params": trainable, "frozen_params": frozen}


def live_tensor_bytes() -> int:
    """Bytes of every tensor alive in this process right now (all ranks' model state included).

    On GPU the CUDA allocator's count. On CPU the storages of every tensor object the garbage
    collector tracks, each storage once, *before* any collection: memory held by unreachable
    cycles not yet collected counts, as it does in the CUDA allocator until those are collected.
    """
    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    storages.pop(0, None)  # empty tensors
    return sum(storages.values())


def peak_memory_bytes() -> int:
    """Peak device memory on GPU (max allocated), else the process peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def max_over_ranks(values: dict[str, int]) -> dict[str, int]:
    """Element-wise maximum of integer dicts over all ranks (the per-GPU worst case)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    maxima = collectives.all_reduce_values([values[k] for k in keys], op="max",
                                           dtype=torch.int64)
    return {k: int(v) for k, v in zip(keys, maxima, strict=True)}


class MetricsLog:
    """Rank-0 metrics stream: `metrics.jsonl` plus optional TensorBoard and W&B scalars.

    On resume the file is cut back to the resumed global step, so a restarted run never shows
    a step twice.
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool, resume_step: int = 0,
                 wandb: WandbConfig | None = None, run_config: dict[str, Any] | None = None
                 ) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = is_rank0()
        self._tb = None
        self._wandb = None
        if wandb is not None:
            require_wandb()  # on every rank: all fail alike when it is missing
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: TensorBoard scalars are off")
            else:
                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            self._wandb = WandbRun(wandb, out_dir, run_config or {})

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, values)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold `step`); numbers also go to TensorBoard and W&B."""
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._scalars(record["step"], {key: value for key, value in record.items()
                                       if key != "step" and isinstance(value, int | float)})

    def stage_start(self, stage: int, step: int, predicted: dict[str, int],
                    peak_bytes: int) -> None:
        """Mark a stage boundary (scalar `stage_start` = the stage, at the global step it starts
        after) with the planner's predicted per-GPU memory for the stage (`predicted/*`
        bytes)."""
        if self.enabled:
            self._scalars(step, {"stage_start": stage, "predicted/peak_bytes": peak_bytes,
                                 **{f"predicted/{key}": value for key, value in predicted.items()}})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (empty when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write `summary.json` atomically (rank 0)."""
    path = out_dir / "summary.json"
    write_json_atomic(path, summary)
    return path


def plot_loss(records: Iterable[dict[str, Any]], boundaries: Sequence[int], path: Path) -> None:
    """Training (and validation) loss against global step, stage boundaries as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", ms=3)
    for i, step in enumerate(boundaries):
        ax.axvline(step, color="grey", ls="--", lw=0.8,
                   label="stage boundary" if i == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(stages: Sequence[dict[str, Any]], vanilla_bytes: int, path: Path) -> None:
    """Per-stage model-state memory (predicted and measured) next to vanilla's prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"stage {s['stage']}\n({s['num_layers']} layers)" for s in stages] + ["vanilla"]
    predicted = [s["predicted"]["model_state_bytes"] / 2**20 for s in stages]
    measured = [s["measured"]["model_state_bytes"] / 2**20 for s in stages]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x][:-1], predicted, 0.4, label="planner (model state)")
    ax.bar([i + 0.2 for i in x][:-1], measured, 0.4, label="measured (model state)")
    ax.bar([len(stages)], [vanilla_bytes / 2**20], 0.4, color="grey",
           label="vanilla, planner")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MiB per GPU")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
