"""ReLoRA inside a stage: function-preserving restarts, adapter-only optimizer reset, jagged LR.

Models are the tiny LLaMA with layers 0-1 frozen and adapted, trained a few Adam steps so that
B, the Adam moments and the fp32 master copies all hold real values before a reset. Optimizer
state is read back through Megatron's own bookkeeping (`main_param`, the distributed
optimizer's `_get_main_param_and_optimizer_states`), independently of relora's mapping.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_step.checkpoint import load_checkpoint, load_full_tensors, save_checkpoint
from megatron_step.config import (
    LoraConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    ReloraConfig,
    StageConfig,
    model_preset,
)
from megatron_step.forward import compute_logits, train_step
from megatron_step.lora import (
    adapted_modules,
    adapter_meta,
    derive_seed,
    freeze_and_adapt,
    init_lora_a,
    lora_delta,
    merge_full_state_dict,
)
from megatron_step.model import build_model
from megatron_step.optim import leaf_optimizers, learning_rate, wrap_and_optimize
from megatron_step.parallel import init_distributed
from megatron_step.relora import is_reset_step, last_reset_step, prune_, relora_reset

from builders import FP32, microbatches, random_tokens
from dist import run_world

LORA = LoraConfig(rank=4, alpha=8.0)
FROZEN = (0, 1)
SEED = 5
STEP = 3
MODES = ("reset", "magnitude_prune", "random_prune")


def _trained(parallel: ParallelConfig, precision: PrecisionConfig, steps: int = STEP) -> tuple:
    """Adapted tiny model after `steps` Adam steps: (gpt, ddp chunks, optimizer, batch)."""
    tiny = model_preset("tiny")
    layout = init_distributed(tiny, 4, parallel, seed=1234)
    gpt = build_model(tiny, 4, parallel, precision, pre_process=layout.is_first_stage,
                      post_process=layout.is_last_stage)
    freeze_and_adapt([gpt], FROZEN, LORA, seed=SEED)
    chunks, optimizer = wrap_and_optimize([gpt], parallel, precision, OptimizerConfig(), lr=1e-2)
    batch = microbatches(random_tokens(tiny, seed=layout.dp_rank))[0]
    for _ in range(steps):
        train_step(chunks, optimizer, [batch])
    return gpt, chunks, optimizer, batch


def _main_and_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter
                    ) -> tuple[torch.Tensor | None, dict]:
    """(master tensor or shard, Adam state) of `param` through Megatron's own bookkeeping."""
    for inner in leaf_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer):
            if param in inner.model_param_group_index_map:
                tensors = inner._get_main_param_and_optimizer_states(param)
                return tensors["param"], tensors
        else:
            main = getattr(param, "main_param", param)
            if main in inner.optimizer.state:
                return main, inner.optimizer.state[main]
    return None, {}


def _snapshot(gpt: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    snap = {}
    for name, param in gpt.named_parameters():
        if param.requires_grad:
            main, state = _main_and_state(optimizer, param)
            snap[name] = (main.detach().clone(),
                          {k: v.detach().clone() for k, v in state.items()})
    return snap


def _check_pruned(old: dict, new: dict, mode: str, ratio: float, name: str) -> tuple[int, int]:
    """Assert that `new` moments are `old` ones with one shared set of entries zeroed by
    `mode`; return (zeroed, total) entries."""
    drop = (new["exp_avg"] == 0) & (new["exp_avg_sq"] == 0)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new[key][~drop], old[key][~drop]), f"{name}.{key}: kept entry changed"
    assert not ((new["exp_avg_sq"] == 0) & (new["exp_avg"] != 0)).any(), (
        f"{name}: exp_avg kept where exp_avg_sq was zeroed (the update would blow up)")
    if mode == "reset":
        assert drop.all(), f"{name}: reset left non-zero moments"
    if mode == "magnitude_prune":
        assert int(drop.sum()) >= round(ratio * drop.numel()), name
        magnitude = old["exp_avg"].abs()
        assert float(magnitude[drop].max()) <= float(magnitude[~drop].min()), (
            f"{name}: a pruned entry is larger than a kept one")
    return int(drop.sum()), drop.numel()


# ---------------------------------------------------------------------------------------------
# One process: function, adapters, optimizer state


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "distopt"])
@pytest.mark.parametrize("mode", MODES)
def test_reset_preserves_function_and_resets_only_adapter_moments(
        world1: None, mode: str, distributed_optimizer: bool) -> None:
    """A reset folds B @ A into W (logits unchanged, 1e-5), restarts A from (seed, step) and
    zeroes B, prunes exactly the adapters' Adam moments as configured, and leaves every other
    optimizer state, every `step` counter and every other master weight bit-identical.

    Guards resets that change the model, prune or reset the new layers' state, or get the
    optimizer's parameter mapping wrong (plain torch Adam and the distributed optimizer).
    """
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    gpt, chunks, optimizer, batch = _trained(parallel, FP32)
    logits = compute_logits([gpt], batch["tokens"])
    modules = adapted_modules([gpt])
    merged = {id(m): m.weight.detach() + lora_delta(m) for m in modules}
    adapter_names = {n for n, p in gpt.named_parameters() if "lora_" in n}
    before = _snapshot(gpt, optimizer)
    relora = ReloraConfig(reset_interval=STEP, optimizer_reset=mode, prune_ratio=0.5)

    relora_reset(chunks, optimizer, relora, seed=SEED, step=STEP)

    torch.testing.assert_close(compute_logits([gpt], batch["tokens"]), logits, atol=1e-5, rtol=0)
    for m in modules:
        state = m.lora_state
        assert not m.lora_b.weight.any(), state.name
        expected = init_lora_a(LORA.rank, m.weight.shape[1],
                               derive_seed(SEED, state.layer, state.target, STEP))
        assert torch.equal(m.lora_a.weight, expected), f"{state.name}: A not restarted"
        torch.testing.assert_close(m.weight, merged[id(m)], atol=1e-6, rtol=0)
    after = _snapshot(gpt, optimizer)
    zeroed = total = 0
    for name, (main, state) in after.items():
        old_main, old_state = before[name]
        assert torch.equal(state["step"], old_state["step"]), f"{name}: step changed"
        if name not in adapter_names:
            assert torch.equal(main, old_main), f"{name}: master weight touched"
            for key, value in state.items():
                assert torch.equal(value, old_state[key]), f"{name}.{key} touched"
            continue
        param = dict(gpt.named_parameters())[name]
        assert torch.equal(main.flatten(), param.detach().flatten()), f"{name}: stale master"
        dropped, size = _check_pruned(old_state, state, mode, 0.5, name)
        zeroed, total = zeroed + dropped, total + size
    if mode == "random_prune":
        assert 0.45 < zeroed / total < 0.55, f"random prune zeroed {zeroed}/{total}"
    result = train_step(chunks, optimizer, [batch])
    assert torch.isfinite(torch.tensor(result["loss"]))


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["float16", "distopt"])
def test_reset_reloads_only_adapter_masters_in_bf16(world1: None,
                                                    distributed_optimizer: bool) -> None:
    """bf16 params with fp32 masters: after a reset the adapters' masters equal their new
    values, other masters keep their fp32 precision (a blanket reload_model_params would round
    them to bf16), and the next step moves A from the new init, not back to the old A.
    """
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    gpt, chunks, optimizer, batch = _trained(parallel, PrecisionConfig(params_dtype="bf16"))
    old_a = {id(m): m.lora_a.weight.detach().clone() for m in adapted_modules([gpt])}
    before = _snapshot(gpt, optimizer)
    relora_reset(chunks, optimizer, ReloraConfig(reset_interval=STEP), seed=SEED, step=STEP)
    new_a = {id(m): m.lora_a.weight.detach().clone() for m in adapted_modules([gpt])}
    finer_than_bf16 = 0
    for name, (main, _) in _snapshot(gpt, optimizer).items():
        param = dict(gpt.named_parameters())[name]
        if "lora_" in name:
            assert torch.equal(main.flatten(), param.detach().float().flatten()), name
        else:
            assert torch.equal(main, before[name][0]), f"{name}: master weight touched"
            finer_than_bf16 += int(not torch.equal(main, main.bfloat16().float()))
    assert finer_than_bf16 > 0, "no master weight carries more than bf16 precision"
    train_step(chunks, optimizer, [batch])
    for m in adapted_modules([gpt]):
        moved = float((m.lora_a.weight.detach().float() - new_a[id(m)].float()).abs().max())
        jump = float((new_a[id(m)].float() - old_a[id(m)].float()).abs().max())
        assert moved < 0.2 * jump, f"{m.lora_state.name}: A moved {moved}, restart {jump}"


def test_checkpoint_after_reset_holds_merged_weights(world1: None, tmp_path) -> None:
    """A checkpoint written after a reset stores the merged base weights (never adapter-only
    deltas on the original base): loading it into a fresh adapted model gives the same logits,
    and its full tensors are the model's merged weights with B = 0."""
    gpt, chunks, optimizer, batch = _trained(ParallelConfig(), FP32)
    relora_reset(chunks, optimizer, ReloraConfig(reset_interval=STEP), seed=SEED, step=STEP)
    logits = compute_logits([gpt], batch["tokens"])
    adapters = adapter_meta(LORA, FROZEN)
    save_checkpoint(tmp_path / "ckpt", [gpt], {"num_layers": 4, "adapters": adapters})
    saved = load_full_tensors(tmp_path / "ckpt")
    assert not any(t.any() for k, t in saved.items() if k.endswith("lora_b.weight"))
    merged = merge_full_state_dict(saved, adapters)
    for m in adapted_modules([gpt]):
        key = next(n for n, p in gpt.named_parameters() if p is m.weight)
        assert torch.equal(saved[key], m.weight.detach()), key
        assert torch.equal(merged[key], m.weight.detach()), key
    fresh, _, _, _ = _trained(ParallelConfig(), FP32, steps=0)
    load_checkpoint(tmp_path / "ckpt", [fresh])
    torch.testing.assert_close(compute_logits([fresh], batch["tokens"]), logits, atol=1e-6,
                               rtol=0)


# ---------------------------------------------------------------------------------------------
# TP=2 x DP=2 with the distributed optimizer


def _tp2_dp2_world() -> dict:
    parallel = ParallelConfig(tensor_model_parallel_size=2, use_distributed_optimizer=True)
    gpt, chunks, optimizer, batch = _trained(parallel, FP32)
    tokens = random_tokens(model_preset("tiny"))
    logits = compute_logits([gpt], tokens)
    relora_reset(chunks, optimizer, ReloraConfig(reset_interval=STEP,
                                                 optimizer_reset="random_prune",
                                                 prune_ratio=0.9), seed=SEED, step=STEP)
    result = {"logits": logits, "reset_logits": compute_logits([gpt], tokens)}
    for _ in range(2):
        train_step(chunks, optimizer, [batch])
    from megatron.core import parallel_state

    result["tp_rank"] = parallel_state.get_tensor_model_parallel_rank()
    result["dp_rank"] = parallel_state.get_data_parallel_rank()
    result["replicated"] = {m.lora_state.name: (m.lora_a.weight if m.lora_state.kind == "column"
                                                else m.lora_b.weight).detach().clone()
                            for m in adapted_modules([gpt])}
    return result


def test_reset_under_tp2_dp2_distributed_optimizer() -> None:
    """TP=2 x DP=2, distributed optimizer, random pruning: the reset keeps the function on every
    rank, and TP-replicated adapters stay bit-identical across TP ranks afterwards (masks and
    re-initialisation are derived identically on TP replicas; DP shards refresh their own
    masters)."""
    results = run_world(_tp2_dp2_world, 4)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["reset_logits"], result["logits"], atol=1e-5, rtol=0,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")
    by_position = {(r["tp_rank"], r["dp_rank"]): r["replicated"] for r in results}
    for dp in (0, 1):
        for name, tensor in by_position[(0, dp)].items():
            assert torch.equal(tensor, by_position[(1, dp)][name]), f"dp {dp}: {name} diverged"
            assert torch.equal(tensor, by_position[(0, 1 - dp)][name]), f"{name}: DP diverged"


# ---------------------------------------------------------------------------------------------
# Schedule and pruning primitives (pure)


def test_reset_schedule_drives_the_jagged_learning_rate() -> None:
    """Resets happen at steps T, 2T, ... (never 0); optim.learning_rate fed with
    last_reset_step re-warms linearly from lr / rewarmup_steps at each reset back to the plain
    schedule, which it equals before the first reset and after each ramp."""
    relora = ReloraConfig(reset_interval=10, rewarmup_steps=4)
    stage = StageConfig(num_layers=4, train_steps=40, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                        relora=relora)
    assert [s for s in range(40) if is_reset_step(relora, s)] == [10, 20, 30]
    assert not any(is_reset_step(None, s) for s in range(40))
    for step in range(40):
        plain = learning_rate(stage, step)
        jagged = learning_rate(stage, step, last_reset_step(relora, step))
        since = step % 10
        factor = min(1.0, (since + 1) / 4) if step >= 10 else 1.0
        assert jagged == pytest.approx(plain * factor, rel=1e-12), step
    assert last_reset_step(relora, 9) is None and last_reset_step(relora, 27) == 20


def test_prune_modes_zero_the_configured_fraction() -> None:
    """magnitude_prune zeroes the round(ratio * n) entries of smallest |exp_avg|, random_prune a
    seeded random fraction, reset everything; both moments lose the same entries and
    surviving entries are untouched."""
    generator = torch.Generator().manual_seed(0)
    old = {"exp_avg": torch.randn(1000, generator=generator),
           "exp_avg_sq": torch.rand(1000, generator=generator) + 0.1}

    def pruned(mode: str, ratio: float, seed: int = 1) -> dict:
        new = {k: v.clone() for k, v in old.items()}
        prune_(list(new.values()), mode, ratio, torch.Generator().manual_seed(seed))
        return new

    assert _check_pruned(old, pruned("magnitude_prune", 0.9), "magnitude_prune", 0.9,
                         "magnitude") == (900, 1000)
    first = pruned("random_prune", 0.3)
    assert all(torch.equal(first[k], pruned("random_prune", 0.3)[k]) for k in old)
    assert 250 < _check_pruned(old, first, "random_prune", 0.3, "random")[0] < 350
    assert _check_pruned(old, pruned("reset", 0.3), "reset", 0.3, "reset") == (1000, 1000)
    with pytest.raises(ValueError, match="relora.optimizer_reset"):
        pruned("zero", 0.5)
