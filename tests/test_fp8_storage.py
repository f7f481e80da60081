"""FP8 storage of the frozen base: quantization, the FP8 linear, merges, and real staged runs.

The contract (megatron_step/fp8_storage.py): frozen linear weights live on the device as
float8_e4m3fn + fp32 scales, forward and backward de-quantize one layer at a time without saving
a high-precision weight, and the full-precision weight is never lost (host master, checkpoints in
the params dtype, merges in fp32), so stages do not accumulate FP8 rounding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from megatron_step import fp8_storage
from megatron_step.checkpoint import load_full_tensors, read_meta
from megatron_step.config import LoraConfig, ParallelConfig, PrecisionConfig, model_preset
from megatron_step.growth import layer_map
from megatron_step.lora import adapted_modules, freeze_and_adapt, lora_delta, merge_adapters
from megatron_step.metrics import read_metrics
from megatron_step.model import build_model

from runs import REPO, run_ok, train_command
from tools import load_tool

E4M3_RELATIVE = 2.0**-4  # half the spacing of a 3-bit mantissa
E4M3_SUBNORMAL = 2.0**-10  # half the subnormal spacing, in units of the scale


def _weight(rows: int = 32, cols: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator) * 0.02
    # an outlier 50,000x the typical value: row 3's scale then pushes the row's other values
    # below E4M3's smallest normal (448 / 2^-6 = 28,672x the largest), where rounding is coarse
    weight[3, 5] = 1000.0
    return weight


@pytest.mark.parametrize("block", [0, 16])
def test_quantization_error_is_e4m3_rounding(block: int) -> None:
    """Every element comes back within E4M3 rounding of itself: 2^-4 relative, or half a
    subnormal step of its scale; per-block scales shrink the error of an outlier's row."""
    weight = _weight()
    q, scale = fp8_storage.quantize(weight, fp8_storage.block_amax(weight, block))
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == ((32,) if block == 0 else (32, 64 // block))
    back = fp8_storage.dequantize(q, scale, torch.float32)
    expanded = fp8_storage._expand(scale, weight.shape)
    bound = torch.maximum(weight.abs() * E4M3_RELATIVE, expanded * E4M3_SUBNORMAL) * 1.0001
    assert ((back - weight).abs() <= bound).all()
    if block:  # the outlier's row, away from the outlier's block: small values, small scales
        per_channel = fp8_storage.quantize(weight, fp8_storage.block_amax(weight, 0))
        channel_error = (fp8_storage.dequantize(*per_channel, torch.float32) - weight)[3, 16:]
        assert (back - weight)[3, 16:].norm() < channel_error.norm() / 2


def _stored_layer(world1: None, dtype: str = "fp32") -> torch.nn.Module:
    """Layer 0 of the tiny model, frozen, its four linears stored in FP8 (per channel)."""
    tiny = model_preset("tiny")
    gpt = build_model(tiny, 4, ParallelConfig(), PrecisionConfig(params_dtype=dtype),
                      pre_process=True, post_process=True)
    gpt.requires_grad_(False)
    layer = gpt.decoder.layers[0]
    for name in ("linear_qkv", "linear_proj"):
        fp8_storage.store(getattr(layer.self_attention, name), 0)
    for name in ("linear_fc1", "linear_fc2"):
        fp8_storage.store(getattr(layer.mlp, name), 0)
    return layer


def test_fp8_linear_saves_no_high_precision_weight(world1: None) -> None:
    """Forward is x dequant(q)^T, the input gradient is dy dequant(q); what autograd keeps for
    backward is the FP8 weight and its scales only: no tensor of the weight's size in a float
    dtype is saved, so the de-quantized weight lives only during its own GEMM."""
    layer = _stored_layer(world1)
    for module in (layer.self_attention.linear_qkv, layer.mlp.linear_fc2):
        weight = fp8_storage.dequantize(module.weight, module.fp8_scale, torch.float32)
        x = torch.randn(8, 2, weight.shape[1], requires_grad=True)
        saved: list[torch.Tensor] = []

        def keep(tensor: torch.Tensor, saved: list = saved) -> torch.Tensor:
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            output = module(x)[0]
        grad = torch.randn_like(output)
        output.backward(grad)
        torch.testing.assert_close(output, x @ weight.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, grad @ weight, atol=1e-5, rtol=1e-5)
        big_float = [t for t in saved if t.is_floating_point() and t.dtype != torch.float8_e4m3fn
                     and t.numel() >= weight.numel()]
        assert big_float == [], [(t.dtype, tuple(t.shape)) for t in big_float]
        assert any(t.dtype == torch.float8_e4m3fn for t in saved)
        assert module.weight.dtype == torch.float8_e4m3fn and module.weight.element_size() == 1


def test_merges_go_into_the_full_precision_master(world1: None) -> None:
    """A LoRA merge adds scale * B A to the bf16 master in fp32 (one bf16 rounding), then the
    FP8 copy is re-quantized from it; restoring gives back plain bf16 Megatron linears holding
    exactly the merged master, never a value that went through FP8."""
    tiny = model_preset("tiny")
    gpt = build_model(tiny, 4, ParallelConfig(), PrecisionConfig(params_dtype="bf16"),
                      pre_process=True, post_process=True)
    freeze_and_adapt([gpt], {0, 1}, LoraConfig(rank=4, alpha=8.0), seed=3, fp8_block_size=0)
    generator = torch.Generator().manual_seed(1)
    expected = {}
    for module in adapted_modules([gpt]):
        with torch.no_grad():
            module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape,
                                                   generator=generator) * 0.1)
        assert module.weight.dtype == torch.float8_e4m3fn
        assert module.fp8_master.dtype == torch.bfloat16
        expected[id(module)] = (module.fp8_master.float() + lora_delta(module)).bfloat16()
    modules = {id(m): m for m in adapted_modules([gpt])}
    merge_adapters([gpt])
    for key, module in modules.items():
        assert torch.equal(module.fp8_master, expected[key])
        q, _ = fp8_storage.quantize(module.fp8_master, fp8_storage.block_amax(
            module.fp8_master, 0))
        assert torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8))
    fp8_storage.restore([gpt])
    assert fp8_storage.stored_modules([gpt]) == []
    for key, module in modules.items():
        assert type(module).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
        assert module.weight.dtype == torch.bfloat16 and not module.weight.requires_grad
        assert torch.equal(module.weight, expected[key])
        assert getattr(module.weight, "tensor_model_parallel", False)


# ---------------------------------------------------------------------------------------------
# Staged runs through the real trainer (bf16, FP8 storage per output channel)

STAGE = {"train_steps": 12, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 2,
         "lora": {"rank": 4, "alpha": 8.0}}
THREE_STAGES = {  # the tiny demo as 4 -> 5 -> 6 layers, bf16, frozen layers stored in FP8
    "model": {"preset": "tiny", "num_layers": 6},
    "precision": {"params_dtype": "bf16", "fp8_frozen_storage": True},
    "data": {"path": "embedded", "tokenizer": "byte", "split": "95,5,0"},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "eval_interval": 9,
              "eval_iters": 1, "log_interval": 9},
    "checkpoint": {"save_interval": 3, "keep_last": 50},
    "logging": {"tensorboard": False, "plots": False},
    "stages": [{"num_layers": 4, **STAGE}, {"num_layers": 5, **STAGE},
               {"num_layers": 6, **STAGE}]}
STAGE_STEPS = (9, 9, 12)  # 75% of 12, 75% of 12, all of the last


def _run(out_dir: Path, nproc: int = 1, extra: tuple[str, ...] = ()) -> Path:
    config = out_dir.parent / f"{out_dir.name}.yaml"
    config.write_text(yaml.safe_dump({**THREE_STAGES, "out_dir": str(out_dir)}))
    run_ok(train_command(config, list(extra), nproc), timeout=400)
    return out_dir


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("fp8") / "run")


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")}


def test_fp8_storage_memory_is_what_the_planner_predicts(fp8_run: Path) -> None:
    """Every stage's measured model state (FP8 weights + scales, adapters, new layers, grad
    buffers, Adam) equals the planner's `--fp8-frozen-storage` prediction byte for byte."""
    stages = json.loads((fp8_run / "summary.json").read_text())["stages"]
    assert [s["num_layers"] for s in stages] == [4, 5, 6]
    for stage in stages:
        assert stage["measured"]["model_state_bytes"] == \
            stage["predicted"]["model_state_bytes"], stage["stage"]


def _ulp(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 spacing at each element (for rounding bounds)."""
    magnitude = tensor.float().abs().clamp(min=2.0**-126)
    return 2.0 ** (torch.floor(torch.log2(magnitude)) - 7)


def test_stage_ends_are_bf16_merges_not_fp8_round_trips(fp8_run: Path) -> None:
    """Across three stages with FP8 storage, each frozen weight at a stage end differs from the
    previous stage end by exactly a rank-4 LoRA delta plus bf16 rounding: the residual beyond
    rank 4 is below the bf16 rounding bound, and far below FP8 rounding (which a design that
    merged into FP8 weights and re-quantized would leave in every element). The final export
    holds the same weights."""
    checkpoints = fp8_run / "checkpoints"
    names = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
             "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
    checked = 0
    for stage, old_depth in ((2, 4), (3, 5)):
        before = load_full_tensors(checkpoints / f"stage{stage - 1}-end")
        after = load_full_tensors(checkpoints / f"stage{stage}-end")
        for index, source in enumerate(layer_map(old_depth, 1)):
            if source.is_new:
                continue  # trained in full this stage
            for name in names:
                old = before[f"decoder.layers.{source.old[0]}.{name}"].double()
                new = after[f"decoder.layers.{index}.{name}"]
                difference = new.double() - old
                u, s, vh = torch.linalg.svd(difference, full_matrices=False)
                residual = difference - (u[:, :4] * s[:4]) @ vh[:4]
                bf16_bound = 0.5 * _ulp(new).double().norm()
                assert residual.norm() <= bf16_bound, (stage, index, name)
                assert s[0] > 10 * bf16_bound  # the adapters really trained
                # the design this guards against: delta merged into FP8-rounded weights
                rounded = fp8_storage.dequantize(*fp8_storage.quantize(
                    old, fp8_storage.block_amax(old, 0)), torch.float64)
                drift = rounded - old + (u[:, :4] * s[:4]) @ vh[:4]
                u2, s2, vh2 = torch.linalg.svd(drift, full_matrices=False)
                assert (drift - (u2[:, :4] * s2[:4]) @ vh2[:4]).norm() > 4 * bf16_bound
                checked += 1
    assert checked == 4 * (4 + 5)  # stage 2: 4 frozen layers, stage 3: 5
    export = load_tool("export_hf")
    destination = fp8_run.parent / "export"
    assert export.main([str(checkpoints / "stage3-end"), str(destination)]) == 0
    from safetensors.torch import load_file

    exported = {k: v for f in destination.glob("*.safetensors") for k, v in load_file(f).items()}
    final = load_full_tensors(checkpoints / "stage3-end")
    assert torch.equal(exported["model.layers.2.mlp.down_proj.weight"],
                       final["decoder.layers.2.mlp.linear_fc2.weight"])


def test_mid_stage_resume_with_fp8_storage_is_exact(fp8_run: Path, tmp_path: Path) -> None:
    """A run resumed from a stage-2 mid-stage checkpoint (FP8 weights re-quantized from the
    saved bf16 masters, adapters and Adam state loaded) reproduces every later loss exactly."""
    resumed = tmp_path / "run"
    shutil.copytree(fp8_run, resumed)
    keep = f"stage2-step{STAGE_STEPS[0] + 6:07d}"
    for path in (resumed / "checkpoints").iterdir():
        if path.name != keep and not path.name.startswith("stage1"):
            shutil.rmtree(path)
    (resumed / "summary.json").unlink()
    _run(resumed)
    expected, got = _losses(fp8_run), _losses(resumed)
    assert sorted(got) == sorted(expected)
    for step in range(STAGE_STEPS[0] + 7, sum(STAGE_STEPS) + 1):
        assert got[step] == expected[step], step


def test_offline_growth_reads_an_fp8_run(fp8_run: Path, tmp_path: Path) -> None:
    """tools/grow_checkpoint.py grows a mid-stage checkpoint of an FP8-storage run (its weights
    are bf16, its adapters unmerged) like any other."""
    tool = load_tool("grow_checkpoint")
    source = fp8_run / "checkpoints" / f"stage2-step{STAGE_STEPS[0] + 6:07d}"
    destination = tmp_path / "grown"
    assert tool.main([str(source), str(destination), "--num-new-layers", "1",
                      "--merge-adapters", "--no-progress"]) == 0
    assert read_meta(destination)["num_layers"] == 6
    tensors = load_full_tensors(destination)
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k.endswith("weight"))


def test_fp8_storage_at_tp2_pp2_matches_one_process(tmp_path: Path) -> None:
    """Two stages with FP8 storage at TP=2 x PP=2 (4 gloo processes, distributed optimizer) and
    on one process, fp32 so that layouts differ only by reduction order: per-channel scales use
    the whole row's amax (all-reduced over TP for row-parallel shards), so every rank quantizes
    exactly as one process does and the losses agree within 1e-4."""
    config = REPO / "examples" / "tiny_cpu_tp2_pp2.yaml"
    sets = ["stages[0].train_steps=8", "stages[1].train_steps=6", "train.eval_interval=6",
            "train.eval_iters=1", "train.log_interval=6", "logging.tensorboard=false",
            "logging.plots=false", "precision.fp8_frozen_storage=true"]
    run_ok(train_command(config, [*sets, f"out_dir={tmp_path / 'tp2pp2'}"], nproc=4),
           timeout=400)
    run_ok(train_command(config, [*sets, f"out_dir={tmp_path / 'single'}",
                                  "parallel.tensor_model_parallel_size=1",
                                  "parallel.pipeline_model_parallel_size=1"]), timeout=400)
    expected, got = _losses(tmp_path / "single"), _losses(tmp_path / "tp2pp2")
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
