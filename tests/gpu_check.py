"""The first-GPU check: everything a CPU could not show, on one GPU, in under 8 minutes.

    bash tests/gpu_check.sh [OUT_DIR]          # or: python tests/gpu_check.py --out-dir OUT_DIR

Runs, each in its own process with a time limit, on the first visible GPU:
1. `pytest -m "gpu or te"`: the GPU and Transformer Engine tests (TE spec LoRA, FP8, growth's
   FP8 scaling history, start-up recipe checks);
2. a tiny 2-stage STEP run through the real trainer with the TE spec and FP8 (hybrid, delayed
   scaling), and the same run in bf16: both must finish, FP8's final validation loss close to
   bf16's;
3. the memory benchmark for llama-368m on CUDA (bench/memory.py, K = 1, 2, 3, every stage in a
   fresh process): CUDA max allocated and model state vs the planner;
4. training throughput per stage for llama-368m (bench/throughput.py, a few hundred steps);
5. a stage boundary at scale: a 2-stage run of a 12 -> 24 layer llama-368m, where the live bytes
   just after the boundary must fit the larger planned model state of the two stages.

Writes OUT_DIR/gpu_check.json (everything measured) and OUT_DIR/gpu_check.md (one table), and the
logs of each check under OUT_DIR/logs/. Exit code 0 when every check passed, 1 otherwise; a failed
check says what failed and why in both files and on stdout. It changes no global GPU setting
(clocks, persistence, MIG, compute mode), uses only CUDA_VISIBLE_DEVICES' first GPU, refuses to
start when that GPU has less than 24 GiB free, and writes nothing outside OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
NEEDED_FREE_BYTES = 24 * 2**30
TINY = REPO / "examples" / "tiny_cpu.yaml"
TINY_SETS = ["stages[0].train_steps=120", "stages[1].train_steps=80", "train.eval_interval=40",
             "train.log_interval=40", "logging.tensorboard=false", "logging.plots=false",
             "logging.progress_bar=false", "precision.params_dtype=bf16"]


class Check:
    """One check's outcome, as written to the JSON and the table."""

    def __init__(self, name: str, what: str) -> None:
        self.name, self.what = name, what
        self.status, self.seconds, self.summary = "not run", 0.0, ""
        self.explanation = ""
        self.details: dict[str, Any] = {}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "status": self.status,
                "seconds": round(self.seconds, 1), "summary": self.summary,
                "explanation": self.explanation, "details": self.details}


def _run(command: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run `command` in the repository with a time limit; output to `log`, returned too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "4"}
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=timeout, check=False)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                  else exc.stdout or "") + f"\n[gpu_check] killed after {timeout:.0f} s\n"
        code = 124
    log.write_text(output)
    return code, output


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _train(out: Path, name: str, extra: list[str], timeout: float) -> tuple[int, str, Path]:
    run_dir = out / name
    command = [sys.executable, "-m", "megatron_step.train", str(TINY),
               *(a for s in [*TINY_SETS, f"out_dir={run_dir}", *extra] for a in ("--set", s))]
    code, output = _run(command, out / "logs" / f"{name}.log", timeout)
    return code, output, run_dir


def check_pytest(out: Path, check: Check, timeout: float) -> None:
    code, output = _run([sys.executable, "-m", "pytest", "-m", "gpu or te", "-rs", "-q",
                         "-p", "no:cacheprovider", "tests"], out / "logs" / "pytest.log", timeout)
    last = output.strip().splitlines()[-1] if output.strip() else ""
    check.details["result_line"] = last
    skipped = "skipped" in last and "passed" not in last
    if code != 0 or skipped:
        check.status = "failed"
        check.explanation = ("pytest reported failures or ran nothing (TE missing? see the "
                             "skip reasons):\n" + _tail(output, 40))
    check.summary = last


def check_tiny_fp8(out: Path, check: Check, timeout: float) -> None:
    code, output, run_dir = _train(out, "tiny_fp8", ["precision.fp8=hybrid"], timeout / 2)
    if code != 0:
        check.status = "failed"
        check.explanation = f"the FP8 run exited with code {code}:\n" + _tail(output)
        return
    ref_code, ref_output, ref_dir = _train(out, "tiny_bf16", [], timeout / 2)
    if ref_code != 0:
        check.status = "failed"
        check.explanation = f"the bf16 reference run exited with code {ref_code}:\n" + \
            _tail(ref_output)
        return
    fp8 = json.loads((run_dir / "summary.json").read_text())
    bf16 = json.loads((ref_dir / "summary.json").read_text())
    check.details = {"fp8_final_valid_loss": fp8["final_valid_loss"],
                     "bf16_final_valid_loss": bf16["final_valid_loss"],
                     "fp8_stages": [{k: s[k] for k in ("stage", "num_layers", "valid_loss",
                                                       "tokens_per_s")} for s in fp8["stages"]],
                     "uses_te": "Transformer Engine layer spec" in output}
    difference = abs(fp8["final_valid_loss"] - bf16["final_valid_loss"])
    check.summary = (f"FP8 final valid loss {fp8['final_valid_loss']:.4f} vs bf16 "
                     f"{bf16['final_valid_loss']:.4f}")
    if not (fp8["complete"] and check.details["uses_te"]) \
            or difference > 0.1 * bf16["final_valid_loss"]:
        check.status = "failed"
        check.explanation = ("the FP8 run did not finish both stages on the TE spec, or its "
                             "validation loss is more than 10% off the bf16 run's")


def check_memory(out: Path, check: Check, timeout: float) -> None:
    code, output = _run([sys.executable, "bench/memory.py", "--model", "llama-368m", "--stages",
                         "1", "2", "3", "--device", "cuda", "--seq-length", "1024",
                         "--out-dir", str(out), "--name", "memory_llama-368m_cuda",
                         "--overwrite", "--timeout", str(int(timeout / 3))],
                        out / "logs" / "memory.log", timeout)
    if code != 0:
        check.status = "failed"
        check.explanation = f"bench/memory.py exited with code {code}:\n" + _tail(output)
        return
    result = json.loads((out / "memory_llama-368m_cuda.json").read_text())
    rows = []
    for plan in result["plans"]:
        for index, stage in enumerate(plan["stages"], start=1):
            measured, predicted = stage["measured"], stage["predicted_full"]
            rows.append({"K": plan["num_stages"], "stage": index,
                         "model_state_measured": measured["model_state_bytes"],
                         "model_state_planned": predicted["model_state_bytes"],
                         "peak_increase_measured": measured["peak_increase_bytes"],
                         "peak_planned": predicted["peak_bytes"]})
    check.details = {"stages": rows}
    worst = max(abs(r["model_state_measured"] / r["model_state_planned"] - 1) for r in rows)
    peak_ratio = max(r["peak_increase_measured"] / r["peak_planned"] for r in rows)
    check.summary = (f"model state vs planner: worst {worst:.2%}; CUDA max allocated increase "
                     f"/ planned peak: up to {peak_ratio:.2f}")
    if worst > 0.01:
        check.status = "failed"
        check.explanation = "measured model state is more than 1% off the planner"


def check_throughput(out: Path, check: Check, timeout: float) -> None:
    code, output = _run([sys.executable, "bench/throughput.py", "--model", "llama-368m",
                         "--device", "cuda", "--params-dtype", "bf16", "--micro-batch-size", "8",
                         "--seq-length", "1024", "--steps", "100", "--warmup", "5",
                         "--out-dir", str(out), "--name", "throughput_llama-368m_cuda",
                         "--overwrite"], out / "logs" / "throughput.log", timeout)
    if code != 0:
        check.status = "failed"
        check.explanation = f"bench/throughput.py exited with code {code}:\n" + _tail(output)
        return
    markdown = (out / "throughput_llama-368m_cuda.md").read_text()
    check.details = {"table": markdown}
    check.summary = "tokens/s per stage in throughput_llama-368m_cuda.md"


def check_boundary(out: Path, check: Check, timeout: float) -> None:
    sets = ["model.preset=llama-368m", "model.num_layers=24", "model.seq_length=1024",
            "stages[0].num_layers=12", "stages[1].num_layers=24", "stages[0].train_steps=12",
            "stages[1].train_steps=8", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.eval_iters=1", "train.eval_interval=100"]
    code, output, run_dir = _train(out, "boundary_368m", sets, timeout)
    if code != 0:
        check.status = "failed"
        check.explanation = f"the 2-stage llama-368m run exited with code {code}:\n" + \
            _tail(output)
        return
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    planned = max(s["predicted"]["model_state_bytes"] for s in stages)
    live = stages[1]["measured"]["live_bytes_at_start"]
    check.details = {"live_bytes_after_boundary": live, "planned_model_state_max": planned,
                     "peak_bytes": [s["measured"]["peak_bytes"] for s in stages],
                     "planned_peak_bytes": [s["predicted"]["peak_bytes"] for s in stages]}
    check.summary = (f"live after the boundary {live / 2**30:.2f} GiB vs planned model state "
                     f"{planned / 2**30:.2f} GiB")
    if live > planned + 256 * 2**20:  # CUDA context-free slack: cuBLAS workspaces, RoPE, batch
        check.status = "failed"
        check.explanation = ("the previous stage's memory was not released before the grown "
                             "model trained (optim.release)")


CHECKS: list[tuple[str, str, Callable[[Path, Check, float], None], float]] = [
    ("pytest", "GPU / TE tests", check_pytest, 120),
    ("tiny_fp8", "2-stage STEP, TE spec + FP8 vs bf16", check_tiny_fp8, 120),
    ("memory", "llama-368m memory on CUDA vs planner", check_memory, 150),
    ("throughput", "llama-368m tokens/s per stage", check_throughput, 100),
    ("boundary", "stage-boundary memory at 368M scale", check_boundary, 80),
]


def _environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import megatron.core

        info["megatron_core"] = megatron.core.__version__
    except ImportError as exc:
        info["megatron_core"] = f"missing: {exc}"
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except Exception as exc:  # noqa: BLE001 - ImportError or OSError (CUDA libraries)
        info["transformer_engine"] = f"missing: {exc}"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(device=torch.cuda.get_device_name(0),
                    capability=list(torch.cuda.get_device_capability(0)),
                    free_bytes=free, total_bytes=total)
    return info


def _markdown(environment: dict[str, Any], checks: list[Check]) -> str:
    lines = [f"GPU check on {environment.get('device', 'no GPU')} (sm "
             f"{''.join(map(str, environment.get('capability', [])))}), torch "
             f"{environment['torch']}, Transformer Engine {environment['transformer_engine']}, "
             f"megatron-core {environment['megatron_core']}", "",
             "| check | what | status | time | result |", "|---|---|---|---|---|"]
    for check in checks:
        result = check.summary or next(iter(check.explanation.splitlines()), "")
        lines.append(f"| {check.name} | {check.what} | {check.status} | {check.seconds:.0f} s | "
                     f"{result} |")
    for check in checks:
        if check.status == "failed":
            lines += ["", f"### {check.name} failed", "", "```", check.explanation, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("gpu_check"),
                        help="where results and logs go (default: ./gpu_check)")
    parser.add_argument("--only", nargs="+", choices=[name for name, *_ in CHECKS],
                        help="run only these checks")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    environment = _environment()
    print(json.dumps(environment, indent=1))
    checks = [Check(name, what) for name, what, *_ in CHECKS]
    if "device" not in environment:
        checks[0].status, checks[0].explanation = "failed", "no CUDA device is visible"
    elif environment["free_bytes"] < NEEDED_FREE_BYTES:
        checks[0].status = "failed"
        checks[0].explanation = (f"only {environment['free_bytes'] / 2**30:.1f} GiB free on the "
                                 "GPU; the checks need 24 GiB (is someone else using it?)")
    else:
        start = time.monotonic()
        for check, (name, _, function, timeout) in zip(checks, CHECKS, strict=True):
            if args.only and name not in args.only:
                continue
            left = BUDGET_S - (time.monotonic() - start)
            if left < 30:
                check.explanation = "not run: the 8-minute budget is spent"
                continue
            began = time.monotonic()
            check.status = "passed"
            try:
                function(out, check, min(timeout, left))
            except Exception as exc:  # noqa: BLE001 - a broken check is reported, not raised
                check.status = "failed"
                check.explanation = f"{type(exc).__name__}: {exc}"
            check.seconds = time.monotonic() - began
            print(f"[gpu_check] {name}: {check.status} ({check.seconds:.0f} s) {check.summary}")
            if check.status == "failed":
                print(check.explanation)
    report = {"environment": environment, "checks": [c.as_dict() for c in checks]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(_markdown(environment, checks))
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if all(c.status == "passed" for c in checks
                    if not args.only or c.name in args.only) else 1


if __name__ == "__main__":
    sys.exit(main())
