"""Checkpoint safety: atomic saves, incomplete checkpoints never picked, adapters never dropped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_step.checkpoint import (
    META_FILE,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from megatron_step.config import LoraConfig, ParallelConfig, model_preset
from megatron_step.lora import adapter_meta, freeze_and_adapt
from megatron_step.model import build_model

from builders import FP32

SAVE_LOOP = """
import sys, torch, torch.distributed as dist
from megatron_step.config import model_preset, ParallelConfig, PrecisionConfig
from megatron_step.parallel import init_distributed
from megatron_step.model import build_model
from megatron_step.checkpoint import save_checkpoint
tiny = model_preset("tiny", hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                    num_query_groups=4)
init_distributed(tiny, 4, ParallelConfig(), rank=0, world_size=1, store=dist.HashStore())
gpt = build_model(tiny, 4, ParallelConfig(), PrecisionConfig(params_dtype="fp32"),
                  pre_process=True, post_process=True)
for step in range(1, 10_000):
    with torch.no_grad():
        for p in gpt.parameters():
            p.fill_(step)
    save_checkpoint(f"{sys.argv[1]}/step{step:05d}", [gpt], {"global_step": step,
                                                           "num_layers": 4})
    print(step, flush=True)
"""


def test_a_crash_during_saves_never_leaves_a_complete_looking_partial_checkpoint(
        world1: None, tmp_path: Path) -> None:
    """A process killed (SIGKILL) while it keeps saving leaves only hidden temporary
    directories besides complete checkpoints; every checkpoint `list_checkpoints` offers loads
    in full, and its tensors hold the value of one single save."""
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(3):  # let a few saves complete, then kill at an arbitrary moment
            assert proc.stdout.readline(), "the save loop ended early"
        time.sleep(0.37)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    visible = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    complete = list_checkpoints(tmp_path)
    assert sorted(visible) == sorted(complete) and len(complete) >= 3
    model = model_preset("tiny", hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                         num_query_groups=4)
    gpt = build_model(model, 4, ParallelConfig(), FP32, pre_process=True, post_process=True,
                      initialize=False)
    for path in complete:
        meta = load_checkpoint(path, [gpt])
        values = {float(p.detach().flatten()[0]) for p in gpt.parameters()}
        assert values == {float(meta["global_step"])}, path


def test_incomplete_and_temporary_directories_are_never_resumed(world1: None,
                                                                tmp_path: Path) -> None:
    """Resume picks the newest directory whose metadata file exists; a temporary directory
    (crash mid-save) or one without metadata (crash before the rename) is ignored."""
    tiny = model_preset("tiny")
    gpt = build_model(tiny, 4, ParallelConfig(), FP32, pre_process=True, post_process=True)
    save_checkpoint(tmp_path / "stage1-step0000002", [gpt], {"global_step": 2})
    (tmp_path / ".stage1-step0000004.tmp").mkdir()
    partial = tmp_path / "stage1-step0000003"
    partial.mkdir()
    (partial / "common.pt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == tmp_path / "stage1-step0000002"
    assert not (partial / META_FILE).exists()


def test_loading_adapters_into_a_model_without_them_is_refused(world1: None,
                                                               tmp_path: Path) -> None:
    """A checkpoint with unmerged LoRA tensors must not load into a plain model (the adapters
    would be dropped without a word); with adapters attached it loads."""
    tiny = model_preset("tiny")
    lora = LoraConfig(rank=4)

    def build() -> torch.nn.Module:
        return build_model(tiny, 4, ParallelConfig(), FP32, pre_process=True,
                           post_process=True)

    adapted = build()
    freeze_and_adapt([adapted], {0, 1}, lora, seed=1)
    save_checkpoint(tmp_path / "ckpt", [adapted], {"global_step": 1,
                                                   "adapters": adapter_meta(lora, {0, 1})})
    with pytest.raises(CheckpointError, match=r"holds unmerged LoRA adapters \(layers \[0, 1\]\)"):
        load_checkpoint(tmp_path / "ckpt", [build()])
    again = build()
    freeze_and_adapt([again], {0, 1}, lora, seed=2)
    load_checkpoint(tmp_path / "ckpt", [again])
    for (name, a), (_, b) in zip(adapted.named_parameters(), again.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
