"""Weights & Biases logging: an offline run of the real trainer, read back from W&B's own
transaction log, and the message when the optional package is missing."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from wandb.proto import wandb_internal_pb2

from megatron_step.config import ConfigError, WandbConfig
from megatron_step.metrics import MetricsLog, read_metrics

from runs import REPO, run_ok, train_command

BLOCK = 32768
HEADER = 7  # ':W&B', magic 0xBEE1, version


def read_wandb_records(path: Path) -> list[Any]:
    """The protobuf Records of a `run-<id>.wandb` file. W&B writes them in LevelDB's log
    framing (32 KiB blocks; each fragment: crc32 u32, length u16, type u8 = full, first, middle
    or last); wandb 0.31 ships no Python reader for it."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:HEADER]
    records, pending, pos = [], b"", HEADER
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        fragment, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = fragment if kind in (1, 2) else pending + fragment
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_offline_run_holds_the_logged_history(tmp_path: Path) -> None:
    """A two-stage run with `logging.wandb: {project, mode: offline}` needs no network and
    leaves a W&B run under <out_dir>/wandb whose history has, for every step of
    metrics.jsonl, the same loss, lr and tokens at the same global_step; a `stage_start`
    marker at each stage start carrying the planner's predicted bytes (as in summary.json);
    and the run config. The run id is kept for resumes. Guards against W&B logging other
    numbers than TensorBoard/metrics.jsonl, and against needing a network."""
    out_dir = tmp_path / "run"
    run_ok(train_command(REPO / "examples" / "tiny_cpu.yaml", [
        f"out_dir={out_dir}", "stages[0].train_steps=8", "stages[1].train_steps=6",
        "train.global_batch_size=4", "train.eval_interval=3", "train.eval_iters=1",
        "logging.tensorboard=false", "logging.plots=false",
        "logging.wandb={project: megatron-step-test, name: tiny, mode: offline}"]))
    run_id = (out_dir / "wandb_run_id").read_text().strip()
    [log] = list((out_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    records = read_wandb_records(log)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for item in run.config.update}
    assert (run.project, run.display_name) == ("megatron-step-test", "tiny")
    assert config["out_dir"] == str(out_dir) and config["model"]["num_layers"] == 6
    steps = {row["global_step"]: row for row in history if "loss" in row}
    metrics = read_metrics(out_dir / "metrics.jsonl")
    assert sorted(steps) == [r["step"] for r in metrics] == list(range(1, 12 + 1))
    for record in metrics:
        row = steps[record["step"]]
        for key in ("loss", "lr", "tokens", "grad_norm", "valid_loss"):
            assert row.get(key) == record.get(key), (record["step"], key)
    stages = [row for row in history if "stage_start" in row]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [(row["stage_start"], row["global_step"]) for row in stages] == [(1, 0), (2, 6)]
    for row, stage in zip(stages, summary["stages"], strict=True):
        assert row["predicted/peak_bytes"] == stage["predicted"]["peak_bytes"]
        assert row["predicted/model_state_bytes"] == stage["predicted"]["model_state_bytes"]


def test_missing_wandb_fails_with_the_field_and_the_fix(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the wandb package, asking for it is a ConfigError naming logging.wandb and how
    to install it (the trainer turns it into exit code 2 before training); without
    logging.wandb nothing imports it. Guards against an ImportError traceback deep in a run
    and against wandb becoming a hard dependency."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb: needs the `wandb` package.*pip "
                                          r"install wandb"):
        MetricsLog(tmp_path, tensorboard=False, wandb=WandbConfig(project="p"))
    MetricsLog(tmp_path, tensorboard=False).close()
