"""Staged training: one YAML runs every STEP stage (train, grow, freeze + adapt, continue).

    python -m megatron_step.train CONFIG.yaml [--set key=value ...]
    torchrun --nproc-per-node N -m megatron_step.train CONFIG.yaml

The loop, per stage i (a one-stage config is vanilla pre-training through the same code):
1. stage 1 builds the model; a later stage merges the previous adapters and grows the live model
   in memory (growth_online.grow_model);
2. layers born before stage i are frozen and get LoRA adapters (lora.freeze_and_adapt), then a
   fresh Megatron DDP + optimizer is built over the trainable parameters only;
3. the stage trains for `grow_at_fraction * train_steps` steps (its whole planned schedule if it
   is the last stage), with evaluation every `eval_interval` steps and ReLoRA restarts if set;
4. the adapters are merged and a stage-end checkpoint is written; the last one is the final model.

Resume: the same command with the same `out_dir` continues from the newest complete checkpoint
(mid-stage or stage end) with the same data order (samples are indexed by global step) and the
same RNG states. SIGTERM / SIGUSR1 (SLURM pre-emption) save a checkpoint, write
`<out_dir>/PREEMPTED` and exit with code 75; a non-finite loss stops the run with code 3 and keeps
the last good checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_step import collectives, data, fp8_storage, lora, relora, te
from megatron_step.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_config_from_meta,
    read_meta,
    save_checkpoint,
    write_json_atomic,
)
from megatron_step.config import ConfigError, RunConfig, dump_config, load_config
from megatron_step.data.tokenizer import TokenizerError, load_tokenizer
from megatron_step.forward import evaluate, train_step
from megatron_step.growth import default_provenance, provenance_from_meta
from megatron_step.growth_online import grow_model
from megatron_step.log import describe_backend, logger, setup_logging
from megatron_step.memory import run_settings, stage_cost
from megatron_step.metrics import (
    MetricsLog,
    live_tensor_bytes,
    max_over_ranks,
    measure_model_state,
    peak_memory_bytes,
    plot_loss,
    plot_memory,
    read_metrics,
    write_summary,
)
from megatron_step.model import build_model
from megatron_step.optim import learning_rate, release, set_learning_rate, wrap_and_optimize
from megatron_step.parallel import (
    Layout,
    destroy_distributed,
    init_distributed,
    is_rank0,
)

EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
PREEMPTED_MARKER = "PREEMPTED"


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written."""


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Schedule: how many steps each stage runs


def stage_steps(config: RunConfig) -> list[int]:
    """Optimizer steps each stage runs: `grow_at_fraction` of its plan, all of it if last."""
    return [stage.run_steps if i < len(config.stages) - 1 else stage.train_steps
            for i, stage in enumerate(config.stages)]


# ---------------------------------------------------------------------------------------------
# Signals: a flag every rank agrees on at step boundaries


class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; `agreed()` makes all ranks stop at the same step."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def agreed(self) -> bool:
        return bool(collectives.all_reduce_values([int(self.raised)], op="max",
                                                  dtype=torch.int64)[0])


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Run:
    """Everything a stage needs besides its model: config, layout, data, outputs, progress."""

    config: RunConfig
    layout: Layout
    out_dir: Path
    train_data: data.StepLoader
    valid_data: Any
    metrics: MetricsLog
    stop: StopFlag
    data_accounting: dict[str, Any]
    global_step: int = 0
    stage_summaries: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.model.seq_length


def _rank_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rank_state(state: dict[str, Any] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _meta(run: Run, stage: int, stage_step: int, kind: str,
          provenance: list[dict[str, Any]], adapters: dict[str, Any] | None) -> dict[str, Any]:
    return {"kind": kind, "stage": stage, "stage_step": stage_step,
            "global_step": run.global_step,
            "consumed_samples": run.global_step * run.config.train.global_batch_size,
            "model": dataclasses.asdict(run.config.model), "num_layers": len(provenance),
            "layers": provenance, "adapters": adapters,
            "precision": run.config.precision.params_dtype,
            "run_config": json.loads(json.dumps(dataclasses.asdict(run.config))),
            "stage_summaries": run.stage_summaries}


def _save(run: Run, name: str, chunks: Sequence[torch.nn.Module], meta: dict[str, Any],
          optimizer: Any = None) -> Path:
    path = save_checkpoint(run.checkpoint_dir / name, chunks, meta, optimizer=optimizer,
                           rank_state=_rank_state())
    logger.info("saved checkpoint %s (stage %d, global step %d)", path, meta["stage"],
                meta["global_step"])
    return path


def _prune_checkpoints(run: Run) -> None:
    """Keep the newest `keep_last` mid-stage checkpoints; stage-end ones are always kept."""
    if not is_rank0():
        return
    mid = [p for p in list_checkpoints(run.checkpoint_dir) if "-step" in p.name]
    for path in mid[:-run.config.checkpoint.keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _evaluate(run: Run, ddp: Sequence[torch.nn.Module]) -> float | None:
    if run.valid_data is None:
        return None
    train = run.config.train
    batches = data.valid_microbatches(run.valid_data, train.eval_iters * train.global_batch_size,
                                      train.micro_batch_size, run.layout.dp_rank,
                                      run.layout.data_parallel_size)
    return evaluate(ddp, batches)


def _stage_prediction(run: Run, index: int) -> tuple[dict[str, int], int]:
    """Planner prediction (heaviest pipeline rank) for a stage, and its peak bytes."""
    stages = run.config.stages
    old = stages[index - 2].num_layers if index > 1 else 0
    stage = stages[index - 1]
    settings = run_settings(run.config, stage, run.layout.data_parallel_size)
    cost = stage_cost(run.config.model, stage.num_layers - old, old, settings)
    return cost.memory.as_dict(), cost.peak_bytes


def train_stage(run: Run, index: int, chunks: list[torch.nn.Module],
                provenance: list[dict[str, Any]], resume: dict[str, Any] | None) -> None:
    """Freeze + adapt, build DDP and optimizer, train one stage, merge, save its end state."""
    config = run.config
    stage = config.stages[index - 1]
    steps = stage_steps(config)[index - 1]
    frozen = {i for i, entry in enumerate(provenance) if entry["born_stage"] < index}
    precision = config.precision
    report = lora.freeze_and_adapt(
        chunks, frozen, stage.lora, seed=config.train.seed + index,
        freeze_embeddings=index > 1 and config.freeze_embeddings_after_stage1,
        fp8_block_size=precision.fp8_frozen_block_size if precision.fp8_frozen_storage else None)
    ddp, optimizer = wrap_and_optimize(chunks, config.parallel, config.precision,
                                       config.optimizer, stage.lr)
    adapters = lora.adapter_meta(stage.lora, frozen)
    start = 0
    if resume is not None:
        meta = load_checkpoint(resume["path"], chunks, optimizer)
        _restore_rank_state(meta.get("rank_state"))
        start = meta["stage_step"]
    # everything this stage allocates before its first step; the previous stage's must be gone
    live_at_start = max_over_ranks({"live_bytes_at_start": live_tensor_bytes()})
    logger.info("stage %d/%d: %d layers (%d frozen + adapters rank %d, %d new), steps %d..%d; "
                "params trainable %s, frozen %s, adapters %s", index, len(config.stages),
                len(provenance), len(frozen), stage.lora.rank if frozen else 0,
                len(provenance) - len(frozen), start, steps, f"{report.model.trainable:,}",
                f"{report.model.frozen:,}", f"{report.model.adapter:,}")
    run.metrics.stage_start(index, run.global_step, *_stage_prediction(run, index))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train = config.train
    bar = tqdm(total=steps, initial=start, desc=f"stage {index}/{len(config.stages)}",
               disable=not (is_rank0() and config.logging.progress_bar and sys.stderr.isatty()),
               dynamic_ncols=True)
    wall_start = window_start = time.perf_counter()
    window_steps = 0
    valid_loss = None
    for step in range(start, steps):
        step_start = time.perf_counter()
        set_learning_rate(optimizer, learning_rate(stage, step,
                                                   relora.last_reset_step(stage.relora, step)))
        batches = run.train_data.microbatches(run.global_step * train.global_batch_size)
        result = train_step(ddp, optimizer, batches)
        if not math.isfinite(result["loss"]):
            raise Diverged(f"non-finite loss {result['loss']} at stage {index} step {step + 1} "
                           f"(global step {run.global_step + 1}); the last good checkpoint is "
                           f"{latest_checkpoint(run.checkpoint_dir)}")
        run.global_step += 1
        window_steps += 1
        done = step + 1
        if relora.is_reset_step(stage.relora, done) and done < steps:
            relora.relora_reset(chunks, optimizer, stage.relora,
                                seed=config.train.seed + index, step=done)
        record: dict[str, Any] = {
            "step": run.global_step, "stage": index, "stage_step": done,
            "loss": result["loss"], "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": result["grad_norm"], "tokens": run.global_step * run.tokens_per_step,
            "tokens_per_s": run.tokens_per_step / max(time.perf_counter() - step_start, 1e-9),
            "memory_bytes": peak_memory_bytes()}
        if done % train.eval_interval == 0 or done == steps:
            valid_loss = _evaluate(run, ddp)
            if valid_loss is not None:
                record["valid_loss"] = valid_loss
                record["valid_ppl"] = math.exp(min(valid_loss, 50.0))
        run.metrics.write(record)
        if done % train.log_interval == 0 or done == steps or "valid_loss" in record:
            elapsed = time.perf_counter() - window_start
            rate = window_steps * run.tokens_per_step / max(elapsed, 1e-9)
            eta = (steps - done) * elapsed / window_steps
            logger.info("stage %d/%d step %d/%d | loss %.4f%s | lr %.3g | %.0f tok/s | ETA %s",
                        index, len(config.stages), done, steps, result["loss"],
                        f" | valid {valid_loss:.4f}" if "valid_loss" in record else "",
                        record["lr"], rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
            window_start, window_steps = time.perf_counter(), 0
        bar.update(1)
        bar.set_postfix(loss=f"{result['loss']:.3f}", lr=f"{record['lr']:.2e}")
        interval = config.checkpoint.save_interval
        stopping = run.stop.agreed()
        if stopping or (interval and done % interval == 0 and done < steps):
            _save(run, f"stage{index}-step{run.global_step:07d}", chunks,
                  _meta(run, index, done, "train", provenance, adapters), optimizer)
            _prune_checkpoints(run)
        if stopping:
            bar.close()
            raise Preempted(f"stop signal: checkpoint at stage {index} step {done}")
    bar.close()
    wall = time.perf_counter() - wall_start
    predicted, predicted_peak = _stage_prediction(run, index)
    measured = {**max_over_ranks({**measure_model_state(ddp, optimizer),
                                  "peak_bytes": peak_memory_bytes()}), **live_at_start}
    if valid_loss is None:
        valid_loss = _evaluate(run, ddp)
    run.stage_summaries.append({
        "stage": index, "num_layers": len(provenance),
        "num_new_layers": len(provenance) - len(frozen), "frozen_layers": sorted(frozen),
        "trainable_params": report.model.trainable - report.model.adapter,
        "frozen_params": report.model.frozen, "adapter_params": report.model.adapter,
        "predicted": {**predicted, "peak_bytes": predicted_peak}, "measured": measured,
        "valid_loss": valid_loss,
        "valid_ppl": math.exp(min(valid_loss, 50.0)) if valid_loss is not None else None,
        "steps": steps - start, "tokens": (steps - start) * run.tokens_per_step,
        "tokens_per_s": (steps - start) * run.tokens_per_step / max(wall, 1e-9),
        "wall_s": wall})
    release(ddp, optimizer)  # before the next stage grows the model (see optim.release)
    lora.merge_adapters(chunks)  # into the full-precision masters of FP8-stored weights
    fp8_storage.restore(chunks)  # growth and the next stage start from full precision
    _save(run, f"stage{index}-end", chunks, _meta(run, index, steps, "stage_end", provenance,
                                                  None))


def _prepare_data(config: RunConfig, layout: Layout, out_dir: Path
                  ) -> tuple[data.StepLoader, Any, dict[str, Any]]:
    """The train micro-batch loader, the validation dataset and the token accounting."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {config.model.vocab_size} is smaller than the "
                          f"vocabulary of data.tokenizer ({tokenizer.describe()}: "
                          f"{tokenizer.vocab_size})")
    embedded = None
    if config.data.blend is None and config.data.path in (None, data.EMBEDDED):
        embedded = data.prepare_embedded_dataset(out_dir / "data", tokenizer,
                                                 progress=is_rank0())
    blend = data.resolve_blend(config.data, embedded)
    train = config.train
    stage_samples = [steps * train.global_batch_size for steps in stage_steps(config)]
    valid_samples = train.eval_iters * train.global_batch_size
    train_set, valid_set = data.build_datasets(
        blend, tokenizer, seq_length=config.model.seq_length, seed=train.seed,
        num_train_samples=sum(stage_samples), num_valid_samples=valid_samples,
        cache_dir=out_dir / "data" / "cache")
    accounting = data.token_accounting(train_set, valid_set, blend, stage_samples=stage_samples,
                                       seq_length=config.model.seq_length,
                                       valid_samples=valid_samples)
    if is_rank0():
        for line in data.describe(accounting):
            logger.info("%s", line)
        for warning in accounting["warnings"]:
            logger.warning("data: %s", warning)
    loader = data.StepLoader(train_set, global_batch_size=train.global_batch_size,
                             micro_batch_size=train.micro_batch_size, dp_rank=layout.dp_rank,
                             dp_size=layout.data_parallel_size,
                             num_workers=config.data.num_workers)
    return loader, valid_set, accounting


def _write_run_files(config: RunConfig, out_dir: Path) -> None:
    if not is_rank0():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_config.yaml").write_text(dump_config(config))
    plan = {"stages": [{"stage": i + 1, "num_layers": s.num_layers, "steps": n}
                       for i, (s, n) in enumerate(zip(config.stages, stage_steps(config),
                                                      strict=True))]}
    write_json_atomic(out_dir / "plan.json", plan)


def _finish(run: Run, last: int) -> dict[str, Any]:
    """Summary, plots and the final model pointer (rank 0 writes), after stage `last`."""
    config = run.config
    final = run.checkpoint_dir / f"stage{last}-end"
    settings = run_settings(config, config.stages[-1], run.layout.data_parallel_size)
    vanilla = stage_cost(config.model, config.model.num_layers, 0, settings)
    summary = {"out_dir": str(run.out_dir), "final_checkpoint": str(final),
               "complete": last == len(config.stages),
               "global_steps": run.global_step,
               "tokens": run.global_step * run.tokens_per_step,
               "stages": run.stage_summaries,
               "vanilla_predicted": {**vanilla.memory.as_dict(),
                                     "peak_bytes": vanilla.peak_bytes},
               "peak_bytes_predicted": max(s["predicted"]["peak_bytes"]
                                           for s in run.stage_summaries),
               "final_valid_loss": run.stage_summaries[-1]["valid_loss"],
               "final_valid_ppl": run.stage_summaries[-1]["valid_ppl"],
               "data": run.data_accounting}
    if is_rank0():
        write_summary(run.out_dir, summary)
        if config.logging.plots:
            boundaries, total = [], 0
            for steps in stage_steps(config)[:last - 1]:
                total += steps
                boundaries.append(total)
            plot_loss(read_metrics(run.metrics.path), boundaries, run.out_dir / "loss.png")
            plot_memory(run.stage_summaries, vanilla.memory.model_state_bytes,
                        run.out_dir / "memory.png")
    return summary


def _starting_point(config: RunConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a run continues from: the newest complete one under `out_dir`, else the
    configured `init_checkpoint` (a model that stands for the end of stage 1), else none."""
    path = latest_checkpoint(Path(config.out_dir) / "checkpoints")
    if path is None and config.init_checkpoint:
        path = Path(config.init_checkpoint)
        meta = read_meta(path)
        if meta["num_layers"] != config.stages[0].num_layers:
            raise ConfigError(f"init_checkpoint: {path} holds {meta['num_layers']} layers, but "
                              f"stages[0].num_layers is {config.stages[0].num_layers}")
        theirs = dataclasses.asdict(model_config_from_meta(meta))
        ours = dataclasses.asdict(config.model)
        differ = [f"model.{k} {ours[k]} vs {theirs[k]}" for k in ours
                  if k != "num_layers" and ours[k] != theirs[k]]
        if differ:
            raise ConfigError(f"init_checkpoint: {path} is a different model: "
                              f"{'; '.join(differ)}")
        return path, {**meta, "kind": "stage_end", "stage": 1, "global_step": 0,
                      "layers": None, "stage_summaries": []}
    return path, (read_meta(path) if path is not None else None)


def run_training(config: RunConfig, until_stage: int | None = None) -> dict[str, Any]:
    """Run (or resume) the stages of `config`, up to `until_stage`; returns the summary dict.

    Raises:
        Preempted: a stop signal arrived (a checkpoint was written).
        Diverged: the loss became non-finite.
        ConfigError: the starting checkpoint does not fit the config.
    """
    out_dir = Path(config.out_dir)
    te.check_fp8(config.precision)  # before minutes of data preparation, not at the first step
    layout = init_distributed(config.model, config.stages[0].num_layers, config.parallel,
                              seed=config.train.seed)
    logger.info("world %d = TP %d x PP %d x DP %d; %s", layout.world_size,
                layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                layout.data_parallel_size, describe_backend())
    _write_run_files(config, out_dir)
    train_data, valid_data, accounting = _prepare_data(config, layout, out_dir)
    start_path, start = _starting_point(config)
    run = Run(config=config, layout=layout, out_dir=out_dir, train_data=train_data,
              valid_data=valid_data, data_accounting=accounting,
              metrics=MetricsLog(out_dir, tensorboard=config.logging.tensorboard,
                                 resume_step=start["global_step"] if start else 0,
                                 wandb=config.logging.wandb,
                                 run_config=json.loads(json.dumps(dataclasses.asdict(config)))),
              stop=StopFlag())
    if is_rank0():
        (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    chunks: list[torch.nn.Module] | None = None
    provenance: list[dict[str, Any]] = []
    first, resume = 1, None
    if start is not None:
        # kinds: "train" = mid-stage (adapters + optimizer: loaded by train_stage), "stage_end"
        # = a finished stage, "grown" = offline growth for the stage in its metadata
        logger.info("continuing from %s (%s, stage %d, global step %d)", start_path,
                    start["kind"], start["stage"], start["global_step"])
        run.global_step = start["global_step"]
        run.stage_summaries = list(start.get("stage_summaries") or [])
        first = start["stage"] + (1 if start["kind"] == "stage_end" else 0)
        provenance = provenance_from_meta(start, start["num_layers"])
        if start["kind"] == "train":
            resume = {"path": start_path}
        else:
            chunks = [_build(config, layout, len(provenance), initialize=False)]
            load_checkpoint(start_path, chunks)
    last = min(until_stage or len(config.stages), len(config.stages))
    try:
        for index in range(first, last + 1):
            stage = config.stages[index - 1]
            if chunks is None:
                chunks = [_build(config, layout, stage.num_layers, initialize=start is None)]
                provenance = provenance or default_provenance(stage.num_layers)
            elif stage.num_layers > len(provenance):
                logger.info("growing %d -> %d layers (%s at %s%s)", len(provenance),
                            stage.num_layers, stage.growth.operator, stage.growth.position,
                            ", zero output" if stage.growth.zero_output else "")
                chunks, provenance = grow_model(chunks, provenance, config.model,
                                                stage.num_layers, stage.growth, config.parallel,
                                                config.precision, index)
            if len(provenance) != stage.num_layers:
                raise ConfigError(f"stages[{index - 1}].num_layers: {stage.num_layers}, but the "
                                  f"checkpoint {start_path} has {len(provenance)} layers")
            train_stage(run, index, chunks, provenance, resume)
            resume = None
        return _finish(run, last)
    finally:
        run.train_data.close()
        run.metrics.close()


def _build(config: RunConfig, layout: Layout, num_layers: int,
           initialize: bool) -> torch.nn.Module:
    return build_model(config.model, num_layers, config.parallel, config.precision,
                       pre_process=layout.is_first_stage, post_process=layout.is_last_stage,
                       initialize=initialize, seed=config.train.seed)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m megatron_step.train",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run config YAML (see examples/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.seed=3 "
                             "--set stages[1].lora.rank=16 (repeatable)")
    parser.add_argument("--until-stage", type=int, metavar="I",
                        help="stop after stage I (1-based) has finished and been saved; "
                             "for one-job-per-stage schedules (slurm/submit_chain.sh)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config = load_config(args.config, args.set)
        if args.until_stage is not None and not 1 <= args.until_stage <= len(config.stages):
            raise ConfigError(f"--until-stage: must be in [1, {len(config.stages)}], got "
                              f"{args.until_stage}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_training(config, until_stage=args.until_stage)
        loss = summary["final_valid_loss"]
        logger.info("done: %d steps, final validation loss %s; summary %s/summary.json, "
                    "plots %s/loss.png and %s/memory.png, final model %s",
                    summary["global_steps"], "n/a" if loss is None else f"{loss:.4f}",
                    config.out_dir,
                    config.out_dir, config.out_dir, summary["final_checkpoint"])
        return 0
    except (ConfigError, data.DataError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        logger.warning("%s; exiting for requeue (code %d)", exc, EXIT_PREEMPTED)
        if is_rank0():
            (Path(config.out_dir) / PREEMPTED_MARKER).write_text(str(exc) + "\n")
        return EXIT_PREEMPTED
    except Diverged as exc:
        logger.error("%s", exc)
        return EXIT_DIVERGED
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
