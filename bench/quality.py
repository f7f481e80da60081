"""Quality at equal training tokens on WikiText-2: vanilla, STEP K=2, STEP K=3, ReLoRA, GaLore.

Every method trains the same final LLaMA (default: 8 layers, hidden 256, 4 heads, FFN 688) on
the same WikiText-2 train tokens in the same order (Megatron GPTDataset, one seed), for the same
number of optimizer steps of the same global batch, i.e. the same number of tokens; each stage
uses the same warmup + cosine learning-rate schedule (megatron_step.optim.learning_rate, 10%
warmup, min_lr = lr / 10) over its own steps:
- vanilla: one stage, every layer trained (megatron_step.train with a one-stage config);
- STEP K=2 / K=3: stage splits from the paper's memory model (megatron_step.plan; --plan full
  for the full per-GPU model), equal steps per stage, growth by Interpolation-Mean at the top,
  old layers frozen behind rank-8 LoRA (the trainer's defaults);
  each non-final stage is scheduled as a run of steps / 0.75 and grows at 75% of it;
- ReLoRA: a full-rank warm start for 25% of the steps, then LoRA (rank hidden/8) on every layer
  of the same depth with ReLoRA restarts (merge, re-init, 99% magnitude pruning of the adapter
  Adam states, 10-step jagged re-warmup) every quarter of the remaining steps;
- GaLore: galore-torch's GaLoreAdamW (rank hidden/4, projection refreshed every 50 steps, scale
  1.0, i.e. the same effective learning rate) on the layers' linear weights, plain AdamW on the
  rest, in a plain PyTorch loop over the same Megatron GPTModel (it cannot go through Megatron's
  optimizer wrapper), same batches, gradient clipping 1.0 and schedule.
All train in fp32 on one process (CPU). Validation: loss and perplexity of the final model on
WikiText-2 valid (the first --eval-tokens tokens), all through megatron_step.evaluation. Memory:
model state as the trainer measures it (weights + gradients + fp32 master copies + optimizer
states; GaLore: everything its optimizer holds, projections included), peak over the run's
stages, and the worker process's peak RSS (each method runs in a fresh process).

Data: a 4096-id byte-level BPE trained on WikiText-2 train and the tokenized train split are
cached under --work-dir (reused by later runs). --quick is a smoke test: the tiny model, byte
tokens, the first 200 KB of the data, a few steps per method, no process isolation.

Writes OUT_DIR/NAME.json, NAME.md (table) and NAME.png (training loss vs tokens, all methods).

Examples:
  python bench/quality.py                                   # about 20 minutes on 2 CPU cores
  python bench/quality.py --steps 600 --name quality_600
  python bench/quality.py --quick --out-dir /tmp/q --work-dir /tmp/q/work
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch
from tqdm import tqdm

from megatron_step.cli import positive_int, returns_exit_code
from megatron_step.config import ModelConfig, StageConfig, config_from_dict, model_preset

METHODS = {"vanilla": "Vanilla", "step2": "STEP K=2", "step3": "STEP K=3",
           "relora": "ReLoRA", "galore": "GaLore"}
WIKITEXT = common.REPO.parent / "shared" / "data" / "wikitext-2"
GROW_AT = 0.75
"""StageConfig.grow_at_fraction default: a non-final stage runs 75% of its planned steps."""
QUICK_BYTES = {"train.txt": 200_000, "valid.txt": 30_000}
STEP_LORA_RANK = 8
"""LoRA rank on STEP's frozen layers (the trainer's default LoraConfig)."""


# ---------------------------------------------------------------------------------------------
# Run configurations (pure)


def planned_steps(run_steps: int, fraction: float = GROW_AT) -> int:
    """Smallest planned length T with max(1, round(fraction * T)) == run_steps."""
    planned = max(1, math.floor(run_steps / fraction) - 1)
    while max(1, round(fraction * planned)) < run_steps:
        planned += 1
    if max(1, round(fraction * planned)) != run_steps:
        raise ValueError(f"no planned length runs exactly {run_steps} steps at {fraction}")
    return planned


def equal_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` positive integers differing by at most one (later ones larger)."""
    if total < parts:
        raise ValueError(f"--steps: {total} steps cannot be shared by {parts} stages")
    return [total // parts + (i >= parts - total % parts) for i in range(parts)]


def stage_dict(num_layers: int, run_steps: int, last: bool, lr: float, lora_rank: int,
               relora: dict[str, Any] | None = None) -> dict[str, Any]:
    """One StageConfig dict that runs exactly `run_steps` steps (its whole plan if `last`)."""
    train_steps = run_steps if last else planned_steps(run_steps)
    return {"num_layers": num_layers, "train_steps": train_steps, "lr": lr, "min_lr": lr / 10,
            "warmup_steps": train_steps // 10, "grow_at_fraction": GROW_AT,
            "lora": {"rank": lora_rank, "alpha": 2.0 * lora_rank}, "relora": relora}


def method_stages(method: str, model: ModelConfig, steps: int, lr: float,
                  splits: dict[int, Sequence[int]]) -> list[dict[str, Any]]:
    """The stage list of a trainer-run method (vanilla, step2, step3, relora)."""
    depth = model.num_layers
    if method == "vanilla":
        return [stage_dict(depth, steps, True, lr, STEP_LORA_RANK)]
    if method.startswith("step"):
        layers = list(splits[int(method[-1])])
        shares = equal_shares(steps, len(layers))
        return [stage_dict(sum(layers[:i + 1]), share, i == len(layers) - 1, lr, STEP_LORA_RANK)
                for i, share in enumerate(shares)]
    if method == "relora":
        warm = max(1, steps // 4)
        rest = steps - warm
        interval = max(2, rest // 4)
        relora = {"reset_interval": interval, "optimizer_reset": "magnitude_prune",
                  "prune_ratio": 0.99, "rewarmup_steps": min(10, interval - 1)}
        rank = max(1, model.hidden_size // 8)
        return [stage_dict(depth, warm, False, lr, STEP_LORA_RANK),
                stage_dict(depth, rest, True, lr, rank, relora)]
    raise ValueError(f"unknown trainer method {method!r}")


def run_config(out_dir: Path, model: ModelConfig, data: dict[str, str],
               stages: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """A complete, validated-on-load megatron_step run config dict for one method."""
    return {"out_dir": str(out_dir), "model": dataclasses.asdict(model), "stages": stages,
            "precision": {"params_dtype": "fp32"},
            "train": {"micro_batch_size": args.micro_batch_size,
                      "global_batch_size": args.global_batch_size, "seed": args.seed,
                      "eval_interval": args.steps, "eval_iters": 1,
                      "log_interval": max(1, args.steps // 10)},
            "data": {"path": data["prefix"], "tokenizer": data["tokenizer"],
                     "split": "100,0,0"},
            "logging": {"tensorboard": False, "plots": False, "progress_bar": False}}


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(work_dir: Path, source: Path, quick: bool, vocab_size: int) -> dict[str, str]:
    """Tokenizer spec, train dataset prefix and valid text path (cached in work_dir/data).

    Raises:
        common.BenchError: WikiText-2 is missing.
    """
    from megatron_step.data import build_indexed_dataset
    from megatron_step.data.sources import texts
    from megatron_step.data.tokenizer import load_tokenizer, train_bpe
    from megatron_step.evaluation import indexed_prefix

    files = {name: source / name for name in ("train.txt", "valid.txt")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise common.BenchError(f"--wikitext: {', '.join(missing)} not found")
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    if quick:  # the first bytes of each split, cut at a line end
        for name, limit in QUICK_BYTES.items():
            text = files[name].read_text()[:limit]
            files[name] = data_dir / f"quick-{name}"
            common.write_text_atomic(files[name], text[:text.rfind("\n") + 1])
    name = "quick-byte" if quick else f"wikitext2-bpe{vocab_size}"
    prefix = data_dir / f"{name}-train"
    tokenizer_spec = "byte" if quick else str(data_dir / f"{name}.tokenizer.json")
    if quick or not Path(tokenizer_spec).is_file():
        tokenizer = (load_tokenizer("byte") if quick else
                     train_bpe(texts([files["train.txt"]], document_format="wikitext"),
                               vocab_size, Path(tokenizer_spec), overwrite=True))
    else:
        tokenizer = load_tokenizer(tokenizer_spec)
    if quick or indexed_prefix(prefix) is None:
        build_indexed_dataset([files["train.txt"]], prefix, tokenizer,
                              document_format="wikitext", progress=False, overwrite=True)
    return {"prefix": str(prefix), "tokenizer": tokenizer_spec, "valid": str(files["valid.txt"]),
            "vocab_size": str(tokenizer.vocab_size)}


def valid_stream(data: dict[str, str], max_tokens: int) -> torch.Tensor:
    """WikiText-2 valid as one token stream (megatron_step.evaluation's definition)."""
    from megatron_step.data.tokenizer import load_tokenizer
    from megatron_step.evaluation import read_token_stream

    return read_token_stream(data["valid"], load_tokenizer(data["tokenizer"]),
                             document_format="wikitext", max_tokens=max_tokens)


# ---------------------------------------------------------------------------------------------
# Workers: one method each (a fresh process unless --quick / --no-isolate)


def _evaluate(checkpoint: str, spec: dict[str, Any]) -> dict[str, float]:
    from megatron_step.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, valid_stream(spec["data"], spec["eval_tokens"]),
                                 micro_batch_size=spec["eval_micro_batch_size"], progress=False)
    return {"valid_loss": result["loss"], "valid_ppl": result["perplexity"],
            "valid_tokens": result["tokens"]}


def train_with_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """vanilla / STEP / ReLoRA: megatron_step.train.run_training, then evaluation."""
    from megatron_step.metrics import read_metrics
    from megatron_step.train import run_training

    config = config_from_dict(spec["config"])
    baseline = common.current_rss_bytes()
    summary = run_training(config)
    stages = summary["stages"]
    wall = sum(s["wall_s"] for s in stages)  # training loops only, like GaLore's
    records = read_metrics(Path(config.out_dir) / "metrics.jsonl")
    peak_rss = max(stage["measured"]["peak_bytes"] for stage in stages)
    return {"tokens": summary["tokens"], "steps": summary["global_steps"], "wall_s": wall,
            "stages": [{"num_layers": s["num_layers"], "num_new_layers": s["num_new_layers"],
                        "steps": s["steps"], "trainable_params": s["trainable_params"],
                        "adapter_params": s["adapter_params"], "frozen_params": s["frozen_params"],
                        "model_state_bytes": s["measured"]["model_state_bytes"],
                        "predicted_model_state_bytes": s["predicted"]["model_state_bytes"]}
                       for s in stages],
            "model_state_peak_bytes": max(s["measured"]["model_state_bytes"] for s in stages),
            "model_state_last_bytes": stages[-1]["measured"]["model_state_bytes"],
            "peak_rss_bytes": peak_rss, "rss_increase_bytes": peak_rss - baseline,
            "curve": [[r["tokens"], round(r["loss"], 5)] for r in records if "loss" in r],
            **_evaluate(summary["final_checkpoint"], spec)}


def galore_model_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                       ) -> dict[str, int]:
    """Bytes GaLore training keeps across steps: weights, gradients, optimizer state.

    Optimizer state = every tensor the optimizer holds: Adam moments (in the projected space
    for GaLore parameters) and the projection matrices.
    """
    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    weights = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                states += nbytes(value)
            elif getattr(value, "ortho_matrix", None) is not None:  # GaLoreProjector
                matrices = value.ortho_matrix
                states += sum(nbytes(m) for m in (matrices if isinstance(matrices, list | tuple)
                                                  else [matrices]))
    return {"weights": weights, "grads": grads, "master_weights": 0, "optimizer_states": states,
            "model_state_bytes": weights + grads + states}


def train_galore(spec: dict[str, Any]) -> dict[str, Any]:
    """GaLore: a plain PyTorch loop over Megatron's GPTModel, then evaluation."""
    import warnings

    from megatron_step import data as mdata
    from megatron_step.checkpoint import save_checkpoint
    from megatron_step.config import ParallelConfig, PrecisionConfig
    from megatron_step.data.tokenizer import load_tokenizer
    from megatron_step.log import logger
    from megatron_step.metrics import peak_memory_bytes
    from megatron_step.model import build_model
    from megatron_step.optim import learning_rate, set_learning_rate

    with warnings.catch_warnings():  # galore-torch warns at import about bitsandbytes kernels
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW

    model = ModelConfig(**spec["model"])
    stage = StageConfig(**{k: v for k, v in spec["stage"].items() if k not in ("lora",
                                                                               "relora")})
    train = spec["train"]
    out_dir = Path(spec["out_dir"])
    baseline = common.current_rss_bytes()
    common.start_world(model, model.num_layers, seed=train["seed"])
    gpt = build_model(model, model.num_layers, ParallelConfig(),
                      PrecisionConfig(params_dtype="fp32"), pre_process=True, post_process=True)
    dataset, _ = mdata.build_datasets(
        spec["data"]["prefix"], load_tokenizer(spec["data"]["tokenizer"]),
        seq_length=model.seq_length, split="100,0,0", seed=train["seed"],
        num_train_samples=stage.train_steps * train["global_batch_size"], num_valid_samples=0,
        cache_dir=out_dir / "data" / "cache")
    galore = spec["galore"]
    low_rank = [p for name, p in gpt.named_parameters()
                if galore["rank"] and p.dim() == 2 and ".layers." in name]
    chosen = {id(p) for p in low_rank}
    groups = [{"params": [p for p in gpt.parameters() if id(p) not in chosen]}]
    if low_rank:  # rank 0: no projection at all, the loop's control (it must match vanilla)
        groups.append({"params": low_rank, "rank": galore["rank"], "proj_type": "std",
                       "update_proj_gap": galore["update_proj_gap"], "scale": galore["scale"]})
    optimizer = GaLoreAdamW(groups, lr=stage.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            no_deprecation_warning=True)
    tokens_per_step = train["global_batch_size"] * model.seq_length
    device = next(gpt.parameters()).device
    curve, start = [], time.perf_counter()
    for step in range(stage.train_steps):
        set_learning_rate(optimizer, learning_rate(stage, step))
        batches = mdata.step_microbatches(
            dataset, consumed_samples=step * train["global_batch_size"],
            global_batch_size=train["global_batch_size"],
            micro_batch_size=train["micro_batch_size"], dp_rank=0, dp_size=1)
        optimizer.zero_grad(set_to_none=False)  # keep gradients allocated, like Megatron DDP
        total = 0.0
        for batch in batches:  # same loss as megatron_step.forward: per-micro-batch token mean
            batch = {key: value.to(device) for key, value in batch.items()}
            losses = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            loss = (losses.float() * mask).sum() / mask.sum() / len(batches)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        if not math.isfinite(total):
            raise RuntimeError(f"GaLore: non-finite loss {total} at step {step + 1}")
        curve.append([(step + 1) * tokens_per_step, round(total, 5)])
        if (step + 1) % train["log_interval"] == 0:
            logger.info("GaLore step %d/%d | loss %.4f | %.0f tok/s", step + 1,
                        stage.train_steps, total, tokens_per_step * (step + 1)
                        / (time.perf_counter() - start))
    wall = time.perf_counter() - start
    state = galore_model_state(gpt, optimizer)
    peak_rss = peak_memory_bytes()
    checkpoint = out_dir / "checkpoints" / "final"
    save_checkpoint(checkpoint, [gpt], {"kind": "final", "model": dataclasses.asdict(model),
                                        "num_layers": model.num_layers, "stage": 1,
                                        "global_step": stage.train_steps})
    return {"tokens": stage.train_steps * tokens_per_step, "steps": stage.train_steps,
            "wall_s": wall,
            "stages": [{"num_layers": model.num_layers, "num_new_layers": model.num_layers,
                        "steps": stage.train_steps,
                        "trainable_params": sum(p.numel() for p in gpt.parameters()),
                        "adapter_params": 0, "frozen_params": 0,
                        "model_state_bytes": state["model_state_bytes"],
                        "predicted_model_state_bytes": None}],
            "model_state_peak_bytes": state["model_state_bytes"],
            "model_state_last_bytes": state["model_state_bytes"], "model_state": state,
            "peak_rss_bytes": peak_rss, "rss_increase_bytes": peak_rss - baseline,
            "curve": curve, **_evaluate(str(checkpoint), spec)}


def train_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: train and evaluate one method (always tears the world down)."""
    from megatron_step.log import setup_logging
    from megatron_step.parallel import destroy_distributed

    setup_logging()
    torch.manual_seed(spec["train"]["seed"])
    try:
        result = (train_galore(spec) if spec["method"] == "galore"
                  else train_with_trainer(spec))
    finally:
        destroy_distributed()
    label = METHODS[spec["method"]]
    if spec["method"] == "galore" and not spec["galore"]["rank"]:
        label = "AdamW loop (GaLore rank 0)"
    return {"method": spec["method"], "label": label, **result}


# ---------------------------------------------------------------------------------------------
# The benchmark


def method_spec(method: str, model: ModelConfig, data: dict[str, str],
                splits: dict[int, Sequence[int]], args: Any) -> dict[str, Any]:
    """Everything a worker needs to train and evaluate `method` (JSON-able)."""
    out_dir = args.work_dir / "methods" / method
    spec = {"method": method, "model": dataclasses.asdict(model), "data": data,
            "out_dir": str(out_dir), "eval_tokens": args.eval_tokens, "eval_micro_batch_size": 8,
            "train": {"seed": args.seed, "micro_batch_size": args.micro_batch_size,
                      "global_batch_size": args.global_batch_size,
                      "log_interval": max(1, args.steps // 10)}}
    if method == "galore":
        spec["stage"] = method_stages("vanilla", model, args.steps, args.lr, splits)[0]
        rank = model.hidden_size // 4 if args.galore_rank is None else args.galore_rank
        spec["galore"] = {"rank": rank, "scale": args.galore_scale,
                          "update_proj_gap": args.galore_update_proj_gap}
    else:
        stages = method_stages(method, model, args.steps, args.lr, splits)
        spec["config"] = run_config(out_dir, model, data, stages, args)
    return spec


def run_method(spec: dict[str, Any], args: Any) -> dict[str, Any]:
    """Train + evaluate one method from a clean directory, isolated unless --no-isolate."""
    out_dir = Path(spec["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)  # the trainer would resume from old checkpoints
    out_dir.mkdir(parents=True)
    if args.no_isolate:
        result = train_method(spec)
        return {**result, "peak_rss_bytes": None, "rss_increase_bytes": None}
    return common.run_isolated(Path(__file__), spec, device=args.device, memory_limit=None,
                               timeout=args.timeout, log=out_dir / "log.txt")


def assemble(model: ModelConfig, data: dict[str, str], splits: dict[int, Sequence[int]],
             specs: dict[str, dict[str, Any]], results: list[dict[str, Any]], args: Any,
             command: str) -> dict[str, Any]:
    """JSON result: settings, per-method numbers and loss curves."""
    tokens = {r["tokens"] for r in results}
    if len(tokens) != 1:  # the whole comparison rests on it
        raise RuntimeError(f"methods trained on different numbers of tokens: "
                           f"{ {r['method']: r['tokens'] for r in results} }")
    relora = None
    if "relora" in specs:
        last = specs["relora"]["config"]["stages"][-1]
        relora = {**last["relora"], "rank": last["lora"]["rank"]}
    return {"benchmark": "quality", "command": command, "device": args.device,
            "quick": args.quick, "isolated": not args.no_isolate,
            "model": dataclasses.asdict(model),
            "tokenizer": ("byte-level" if data["tokenizer"] == "byte" else
                          f"byte-level BPE trained on WikiText-2 train ({data['vocab_size']} ids)"),
            "steps": args.steps, "global_batch_size": args.global_batch_size,
            "micro_batch_size": args.micro_batch_size, "lr": args.lr, "seed": args.seed,
            "tokens_per_method": tokens.pop(),
            "eval_tokens": results[0]["valid_tokens"] if results else None,
            "step_splits": {f"K={k}": list(v) for k, v in splits.items()},
            "relora": relora, "galore": specs.get("galore", {}).get("galore"),
            "methods": results}


def to_markdown(result: dict[str, Any]) -> str:
    """The quality table with the settings that make it comparable."""
    model = result["model"]
    rows = []
    for r in result["methods"]:
        layers = " -> ".join(str(s["num_layers"]) for s in r["stages"])
        rows.append([r["label"], layers, r["steps"], f"{r['tokens']:,}", f"{r['valid_loss']:.4f}",
                     f"{r['valid_ppl']:.2f}", common.mib(r["model_state_peak_bytes"]),
                     common.mib(r["model_state_last_bytes"]), common.mib(r["peak_rss_bytes"]),
                     f"{r['wall_s']:.0f}", f"{r['tokens'] / r['wall_s']:,.0f}"])
    table = common.markdown_table(
        ["method", "layers per stage", "steps", "train tokens", "valid loss", "valid ppl",
         "model state peak (MiB)", "model state last stage (MiB)", "peak RSS (MiB)",
         "train wall (s)", "train tokens/s"], rows)
    splits = ", ".join(f"{k}: {'+'.join(map(str, v))} new layers"
                       for k, v in result["step_splits"].items())
    relora, galore = result["relora"], result["galore"]
    details = []
    if relora:
        details.append(f"ReLoRA: rank {relora['rank']}, restart every "
                       f"{relora['reset_interval']} steps, {relora['optimizer_reset']} "
                       f"{relora['prune_ratio']}, re-warmup {relora['rewarmup_steps']} steps")
    if galore:
        details.append(f"GaLore: rank {galore['rank']}, projection refresh every "
                       f"{galore['update_proj_gap']} steps, scale {galore['scale']}")
    return (f"#### Quality on WikiText-2: {model['num_layers']} layers, hidden "
            f"{model['hidden_size']}, {result['tokenizer']} tokens, "
            f"sequence {model['seq_length']}, {result['tokens_per_method']:,} train tokens per "
            f"method, fp32 on {result['device']}, seed {result['seed']}\n\n"
            f"`{result['command']}`\n\n"
            f"Same data order, batch ({result['global_batch_size']} sequences), steps and "
            f"per-stage schedule (peak lr {result['lr']}, 10% warmup, cosine to lr/10) for "
            f"every method; validation on the first {result['eval_tokens']:,} tokens of "
            f"WikiText-2 valid. STEP splits ({splits}), LoRA rank 8 on frozen layers. "
            f"{'; '.join(details)}. Model state = weights + gradients + optimizer states "
            f"(fp32: no master copies); peak RSS = the method's own process "
            f"({'isolated' if result['isolated'] else 'NOT isolated: cumulative, omitted'})."
            f"\n\n{table}\n")


def plot(result: dict[str, Any], path: Path) -> None:
    """Training loss against tokens for every method (moving average over 10 steps)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["methods"]:
        tokens = [t for t, _ in r["curve"]]
        losses = [loss for _, loss in r["curve"]]
        window = min(10, len(losses))
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):
                                                                         i + 1])
                  for i in range(len(losses))]
        ax.plot(tokens, smooth, lw=1.2, label=f"{r['label']} (valid ppl {r['valid_ppl']:.1f})")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats/token, 10-step mean)")
    ax.set_title(f"WikiText-2, {result['model']['num_layers']}-layer LLaMA, equal tokens",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def _parse(argv: Sequence[str]) -> tuple[Any, Any]:
    parser = common.make_parser("quality.py", __doc__, "quality", "paper")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="methods to run (default: all five)")
    parser.add_argument("--wikitext", type=Path, default=WIKITEXT,
                        help="directory with WikiText-2 train.txt and valid.txt")
    parser.add_argument("--work-dir", type=Path, default=common.REPO / "runs" / "bench_quality",
                        help="cached data and per-method runs (default: runs/bench_quality)")
    parser.add_argument("--steps", type=positive_int, default=400,
                        help="optimizer steps per method")
    parser.add_argument("--global-batch-size", type=positive_int, default=16)
    parser.add_argument("--micro-batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-length", type=positive_int, default=common.SMALL_LLAMA.seq_length)
    parser.add_argument("--vocab-size", type=positive_int, default=common.SMALL_LLAMA.vocab_size,
                        help="BPE vocabulary (and model vocab) size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eval-tokens", type=positive_int, default=131072,
                        help="validation tokens (from the start of valid.txt)")
    parser.add_argument("--galore-rank", type=int,
                        help="GaLore projection rank (default: hidden / 4); 0 = no projection, "
                             "plain AdamW in the same loop (a control that must match vanilla)")
    parser.add_argument("--galore-scale", type=float, default=1.0)
    parser.add_argument("--galore-update-proj-gap", type=positive_int, default=50)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run the methods in this process (no per-method peak RSS)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, byte tokens, 200 KB of data, 6 steps, "
                             "in-process")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.global_batch_size, args.micro_batch_size = 6, 4, 2
        args.eval_tokens, args.galore_update_proj_gap, args.no_isolate = 4096, 2, True
    if args.global_batch_size % args.micro_batch_size:
        parser.error(f"--global-batch-size: {args.global_batch_size} is not a multiple of "
                     f"--micro-batch-size {args.micro_batch_size}")
    return parser, args


def run(argv: list[str]) -> int:
    """The benchmark (or, with --worker, one method); raises SystemExit on usage errors."""
    from megatron_step.config import LoraConfig, PrecisionConfig

    common.quiet_warnings()
    parser, args = _parse(argv)
    if args.worker:
        return common.serve_worker(args.worker, train_method)
    parser.echo(args)
    try:
        common.check_device(args.device, in_process=args.no_isolate)
        model = (model_preset("tiny") if args.quick else dataclasses.replace(
            common.SMALL_LLAMA, seq_length=args.seq_length, vocab_size=args.vocab_size))
        settings = common.memory_settings(PrecisionConfig(params_dtype="fp32"),
                                          LoraConfig(rank=STEP_LORA_RANK),
                                          args.micro_batch_size, args.plan)
        splits = {k: common.plan_splits(model, k, settings) for k in (2, 3)}
        for method in args.methods:  # every STEP stage needs at least one step
            if method.startswith("step"):
                equal_shares(args.steps, int(method[-1]))
        paths = common.output_paths(args.out_dir, args.name, (".json", ".md", ".png"),
                                    args.overwrite)
    except ValueError as exc:  # BenchError, ConfigError
        common.usage_error(parser, exc, "--steps/--plan")
    print(f"preparing data under {args.work_dir / 'data'}")
    try:
        data = prepare_data(args.work_dir, args.wikitext, args.quick, args.vocab_size)
    except ValueError as exc:  # BenchError, CorpusError, TokenizerError
        common.usage_error(parser, exc, "--wikitext")
    specs = {m: method_spec(m, model, data, splits, args) for m in args.methods}
    results = []
    for method in tqdm(args.methods, desc="methods", unit="method"):
        if not args.no_isolate:
            tqdm.write(f"{METHODS[method]}: log in {Path(specs[method]['out_dir']) / 'log.txt'}")
        results.append(run_method(specs[method], args))
        last = results[-1]
        tqdm.write(f"{METHODS[method]}: valid ppl {last['valid_ppl']:.2f}, model state peak "
                   f"{common.mib(last['model_state_peak_bytes'])} MiB, {last['wall_s']:.0f} s")
    result = assemble(model, data, splits, specs, results, args,
                      common.command_line("quality.py", argv))
    common.write_results(paths, result, to_markdown(result), plot,
                         "quality" if args.update_readme else None)
    return 0


@returns_exit_code
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for usage errors)."""
    return run(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
