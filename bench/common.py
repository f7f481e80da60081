"""Shared pieces of the benchmarks in bench/: STEP stages built by hand, isolated measurement
processes, and result files.

A STEP stage is `Stage(num_old, num_new)`: a model of num_old + num_new layers whose num_old old
layers (the ones growth.new_layer_indices does not name as new) are frozen behind LoRA adapters,
while the new layers, embeddings, final norm and output layer train. Vanilla training is the stage
`Stage(0, L)`. `build_stage` builds one exactly as the trainer does (megatron_step.train): build,
freeze + adapt, then Megatron DDP + optimizer over the trainable parameters only.

Isolation: a process's peak RSS is a high-water mark, so memory is measured per configuration in
a fresh Python process (`run_isolated`: the script re-runs itself with `--worker SPEC RESULT`).
On CPU the child gets an address-space limit (RLIMIT_AS), so an overshoot fails in the child
instead of OOM-killing other processes on a shared machine (CUDA needs unlimited address space,
so GPU children get none).

Outputs: every benchmark writes JSON + Markdown (+ PNG) under one directory, through a temporary
name and os.replace, and refuses to replace existing files without --overwrite. A Markdown file
starts with the command that produced it; `--update-readme` copies it between the benchmark's
markers in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from megatron_step.checkpoint import write_json_atomic
from megatron_step.cli import Parser
from megatron_step.config import (
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
)
from megatron_step.growth import new_layer_indices
from megatron_step.memory import MemoryModel, MemorySettings

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
README = REPO / "bench" / "README.md"
SMALL_LLAMA = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=4,
                          ffn_hidden_size=688, vocab_size=4096, seq_length=128)
"""Final model of the quality and throughput benchmarks: 8 layers, hidden 256, FFN ~8/3 h,
vocabulary of the 4096-id BPE trained on WikiText-2 (8.4M parameters)."""
GROWTH_POSITION = "upper"
"""Where new layers go (the trainer's default); only decides which layer indices are frozen."""


class BenchError(ValueError):
    """A bad benchmark argument or input; the message names it (exit code 2)."""


def make_parser(prog: str, doc: str, default_name: str, plan_default: str) -> Parser:
    """A parser with the options every benchmark shares (outputs, device, plan, worker mode)."""
    parser = Parser(prog, doc)
    parser.add_argument("--plan", choices=("paper", "full"), default=plan_default,
                        help="memory model whose optimal plan gives the STEP stage splits "
                             f"(megatron_step.plan; default: {plan_default})")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help="where the result files go (default: bench/results)")
    parser.add_argument("--name", default=default_name,
                        help=f"basename of the result files (default: {default_name})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run (cuda needs a GPU; default: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing result files")
    parser.add_argument("--update-readme", action="store_true",
                        help="also copy the Markdown result into bench/README.md (between this "
                             "benchmark's markers)")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser


def quiet_warnings() -> None:
    """Hide megatron-core's expected CPU warnings and torch's note that RMSNorm weights stay
    fp32 in bf16 models (Megatron's local spec keeps them so; the benchmarks count them)."""
    import warnings

    from megatron_step.log import quiet_megatron_warnings

    quiet_megatron_warnings()
    warnings.filterwarnings("ignore", message=r".*Mismatch dtype between input and weight.*")


def usage_error(parser: argparse.ArgumentParser, exc: Exception, argument: str) -> NoReturn:
    """Usage error (exit 2) from an exception, prefixed by `argument` unless it names one."""
    message = str(exc)
    parser.error(message if message.startswith("--") else f"{argument}: {message}")


def check_device(device: str, in_process: bool) -> None:
    """The device must be usable where the work runs (isolated children of a CPU run get
    CUDA_VISIBLE_DEVICES=; in this process CUDA, once visible, is what megatron_step uses).

    Raises:
        BenchError: cuda without a GPU, or cpu in-process while this process sees a GPU.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    if device == "cpu" and in_process and torch.cuda.is_available():
        raise BenchError("--device cpu: this process sees a GPU; set CUDA_VISIBLE_DEVICES= to "
                         "measure on the CPU")


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True, slots=True)
class Stage:
    """One STEP stage: `num_old` frozen + adapted layers and `num_new` trained ones."""

    num_old: int
    num_new: int

    @property
    def num_layers(self) -> int:
        return self.num_old + self.num_new

    @property
    def frozen_layers(self) -> list[int]:
        """Global indices of the old layers after growth (all trained in stage 1)."""
        if self.num_old == 0:
            return []
        new = set(new_layer_indices(self.num_old, self.num_new, GROWTH_POSITION))
        return [i for i in range(self.num_layers) if i not in new]

    @property
    def label(self) -> str:
        return f"{self.num_old}+{self.num_new}" if self.num_old else f"{self.num_new}"


def stages_from_splits(splits: Sequence[int]) -> list[Stage]:
    """Stages of a plan given the layers each stage adds, e.g. (9, 8, 7)."""
    stages, depth = [], 0
    for num_new in splits:
        stages.append(Stage(depth, num_new))
        depth += num_new
    return stages


def memory_settings(precision: PrecisionConfig, lora: LoraConfig, micro_batch_size: int,
                    memory_model: MemoryModel = "full") -> MemorySettings:
    """Planner settings describing a one-process stage built by `build_stage`."""
    from megatron_step import te

    return MemorySettings(memory_model=memory_model, lora_rank=lora.rank,
                          lora_targets=lora.targets, params_dtype=precision.params_dtype,
                          grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
                          micro_batch_size=micro_batch_size,
                          attention_backend="flash" if te.HAVE_TE else "unfused",
                          growth_position=GROWTH_POSITION,
                          fp8_frozen_storage=precision.fp8_frozen_storage,
                          fp8_frozen_block_size=precision.fp8_frozen_block_size)


def plan_splits(model: ModelConfig, num_stages: int, settings: MemorySettings
                ) -> tuple[int, ...]:
    """New layers per stage of the planner's memory-optimal K-stage plan."""
    from megatron_step.plan import plan_stages

    return plan_stages(model, num_stages, settings).splits


def start_world(model: ModelConfig, num_layers: int, seed: int = 1234) -> None:
    """A one-process Megatron world (TP = PP = DP = 1); reuses an existing process group."""
    import torch.distributed as dist

    from megatron_step.parallel import init_distributed

    init_distributed(model, num_layers, ParallelConfig(), seed=seed, rank=0, world_size=1,
                     store=dist.HashStore())


def build_stage(model: ModelConfig, stage: Stage, precision: PrecisionConfig, lora: LoraConfig,
                *, seed: int = 1, lr: float = 1e-3) -> tuple[list[torch.nn.Module], Any]:
    """Build, freeze + adapt, wrap: the stage's DDP chunks and Megatron optimizer.

    Call inside a one-process world (`start_world`); the same order as the trainer, so frozen
    weights get no gradient buffer, master copy or Adam state.
    """
    from megatron_step.lora import freeze_and_adapt
    from megatron_step.model import build_model
    from megatron_step.optim import wrap_and_optimize

    gpt = build_model(model, stage.num_layers, ParallelConfig(), precision, pre_process=True,
                      post_process=True)
    freeze_and_adapt([gpt], stage.frozen_layers, lora, seed=seed,
                     fp8_block_size=precision.fp8_frozen_block_size
                     if precision.fp8_frozen_storage else None)
    return wrap_and_optimize([gpt], ParallelConfig(), precision, OptimizerConfig(), lr)


def random_microbatches(model: ModelConfig, micro_batch_size: int, count: int,
                        seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` micro-batches of uniformly random token windows (next-token labels)."""
    from megatron_step.evaluation import microbatch

    generator = torch.Generator().manual_seed(seed)
    return [microbatch(torch.randint(0, model.vocab_size, (micro_batch_size,
                                                           model.seq_length + 1),
                                     generator=generator))
            for _ in range(count)]


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# Isolated measurement processes


def _limit_address_space(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def run_isolated(script: Path, spec: dict[str, Any], *, device: str,
                 memory_limit: int | None, timeout: float, log: Path | None = None
                 ) -> dict[str, Any]:
    """Run `script --worker SPEC RESULT` in a fresh process and return its JSON result.

    Args:
        script: a benchmark script whose main() serves `--worker` (see `serve_worker`).
        spec: JSON-able description of the one configuration to measure.
        device: "cpu" hides GPUs from the child; "cuda" gets no address-space limit.
        memory_limit: RLIMIT_AS for a CPU child, in bytes (None: unlimited).
        timeout: seconds before the child is killed.
        log: file for the child's output (default: kept in memory, shown on failure).

    Raises:
        RuntimeError: the child failed or timed out (with the tail of its output).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    limit = _limit_address_space(memory_limit) if memory_limit and device == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log_path = log or Path(tmp) / "log.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as out:
            try:
                code = subprocess.run([sys.executable, str(script), "--worker", str(spec_path),
                                       str(result_path)], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, preexec_fn=limit,
                                      timeout=timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                code = None
        if code != 0 or not result_path.is_file():
            tail = log_path.read_text()[-3000:]
            reason = "timed out" if code is None else f"exited with code {code}"
            raise RuntimeError(f"{script.name} worker {reason} for {json.dumps(spec)}:\n{tail}")
        return json.loads(result_path.read_text())


def serve_worker(paths: Sequence[Path], work: Callable[[dict[str, Any]], dict[str, Any]]
                 ) -> int:
    """The child side of `run_isolated`: read the spec, run `work`, write its result."""
    spec_path, result_path = paths
    write_json_atomic(Path(result_path), work(json.loads(Path(spec_path).read_text())))
    return 0


# ---------------------------------------------------------------------------------------------
# Result files


def output_paths(out_dir: Path, name: str, suffixes: Sequence[str], overwrite: bool
                 ) -> dict[str, Path]:
    """`{suffix: out_dir/name+suffix}`, checked before any long work starts.

    Raises:
        BenchError: a result file exists and `overwrite` is false.
    """
    paths = {suffix: out_dir / f"{name}{suffix}" for suffix in suffixes}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise BenchError(f"--out-dir: {', '.join(existing)} exist(s); pass --overwrite to "
                         "replace")
    return paths


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """JSON result file (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def command_line(script: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a run, from the repository root."""
    return shlex.join(["python", f"bench/{script}", *argv])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table (first column left-aligned, the rest right-aligned)."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def mib(num_bytes: float | None) -> str:
    """Bytes as MiB with one decimal ('-' when unmeasured)."""
    return "-" if num_bytes is None else f"{num_bytes / 2**20:,.1f}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def write_results(paths: dict[str, Path], result: dict[str, Any], markdown: str,
                  plot: Callable[[dict[str, Any], Path], None], readme_section: str | None
                  ) -> None:
    """Write NAME.json, NAME.md and NAME.png (and the README block if asked), then report."""
    write_json(paths[".json"], result)
    write_text_atomic(paths[".md"], markdown)
    plot(result, paths[".png"])
    if readme_section is not None:
        update_readme(readme_section, markdown)
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def update_readme(section: str, markdown: str,
                  readmes: Sequence[Path] = (README, REPO / "README.md")) -> None:
    """Replace the text between `<!-- results:SECTION -->` and `<!-- /results:SECTION -->` in
    every README that has the block (bench/README.md holds all blocks, the top-level README the
    headline ones).

    Raises:
        BenchError: no README has the markers.
    """
    start, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    updated = 0
    for readme in readmes:
        text = readme.read_text()
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        write_text_atomic(readme, f"{head}{start}\n{markdown.strip()}\n{end}{tail}")
        updated += 1
    if not updated:
        raise BenchError(f"--update-readme: no README has a {start} ... {end} block")

