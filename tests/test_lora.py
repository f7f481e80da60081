"""LoRA on Megatron's parallel linears: TP invariance, merge, checkpoints, frozen-state memory.

The reference weights are built once (TP=PP=1) and saved; every world loads them, adapts layers
0-2 (layer 3, the embeddings and the output layer train fully) with the same seed, and gives the
adapters deterministic non-zero B so that the branch matters. B is set from the layout itself
(column bases: B_local = W_local[:, :r], whose rows follow W's TP split; row bases: B is
replicated), so every layout holds the shards of one full B.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_step.checkpoint import load_checkpoint, load_full_tensors, save_checkpoint
from megatron_step.config import (
    LoraConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    model_preset,
)
from megatron_step.forward import compute_logits, train_step
from megatron_step.lora import (
    LoraLinear,
    adapted_modules,
    adapter_meta,
    derive_seed,
    freeze_and_adapt,
    has_adapters,
    init_lora_a,
    merge_adapters,
    merge_full_state_dict,
    unmerge_adapters,
)
from megatron_step.model import build_model
from megatron_step.optim import leaf_optimizers, wrap_and_optimize
from megatron_step.parallel import init_distributed, local_world

from builders import (
    build_world_model,
    load_at_layout,
    microbatches,
    random_tokens,
    save_reference,
)
from dist import run_world

LORA = LoraConfig(rank=4, alpha=8.0)
FROZEN = (0, 1, 2)
SEED = 11
META = {"global_step": 0, "num_layers": 4, "adapters": adapter_meta(LORA, FROZEN)}


# ---------------------------------------------------------------------------------------------
# Helpers run inside the worlds


@torch.no_grad()
def _set_nonzero_b(gpt: torch.nn.Module) -> None:
    """Deterministic non-zero B, the same full tensor at every TP layout (see module doc)."""
    for module in adapted_modules([gpt]):
        state = module.lora_state
        if state.kind == "column":
            module.lora_b.weight.copy_(module.weight[:, : state.rank] * 0.5)
        else:
            generator = torch.Generator().manual_seed(derive_seed("b", state.layer, state.target))
            module.lora_b.weight.copy_(torch.randn(module.lora_b.weight.shape,
                                                   generator=generator) * 0.05)


def _gather(tensor: torch.Tensor, dim: int, swiglu: bool) -> torch.Tensor:
    """Full TP=1-layout tensor from this TP group's shards (fc1 B: [gate; up] per rank)."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    if swiglu:
        halves = [part.chunk(2) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim)


def _full_adapters(gpt: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter matrix (or its gradient) as a full tensor, keyed 'layer.target.a|b'."""
    full = {}
    for module in adapted_modules([gpt]):
        state = module.lora_state
        a, b = module.lora_a.weight, module.lora_b.weight
        a, b = (a.grad, b.grad) if grads else (a.detach(), b.detach())
        key = f"{state.layer}.{state.target}"
        column = state.kind == "column"
        full[f"{key}.a"] = a.clone() if column else _gather(a, 1, False)
        full[f"{key}.b"] = _gather(b, 0, state.swiglu) if column else b.clone()
    return full


def _loss_and_backward(gpt: torch.nn.Module, tokens: torch.Tensor) -> float:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = gpt(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1)).mean()
    loss.backward()
    return float(loss.detach())


def _reference(path: Path) -> torch.Tensor:
    tiny = model_preset("tiny")
    save_reference(tiny, 4, path)
    _, gpt = load_at_layout(tiny, 4, ParallelConfig(), path)
    return compute_logits([gpt], random_tokens(tiny))


def _adapted_world(tp: int, reference: Path, out: Path) -> dict:
    """Adapt at TP=tp: init, forward, grads, merge/unmerge/remove; save checkpoints at TP=2."""
    tiny = model_preset("tiny")
    _, gpt = load_at_layout(tiny, 4, ParallelConfig(tensor_model_parallel_size=tp), reference)
    report = freeze_and_adapt([gpt], FROZEN, LORA, seed=SEED)
    tokens = random_tokens(tiny)
    result = {"report": report, "init": _full_adapters(gpt),
              "fresh_logits": compute_logits([gpt], tokens)}
    _set_nonzero_b(gpt)
    result["logits"] = compute_logits([gpt], tokens)
    result["loss"] = _loss_and_backward(gpt, tokens)
    result["grads"] = _full_adapters(gpt, grads=True)
    result["frozen_grads"] = [n for n, p in gpt.named_parameters()
                              if not p.requires_grad and p.grad is not None]
    if tp == 2:
        save_checkpoint(out / "adapted", [gpt], META)
    bases = {id(m): m.weight.detach().clone() for m in adapted_modules([gpt])}
    merge_adapters([gpt], remove=False)
    result["merged_logits"] = compute_logits([gpt], tokens)
    unmerge_adapters([gpt])
    result["unmerge_error"] = max(float((m.weight - bases[id(m)]).abs().max())
                                  for m in adapted_modules([gpt]))
    result["unmerged_logits"] = compute_logits([gpt], tokens)
    merge_adapters([gpt])
    result["removed_logits"] = compute_logits([gpt], tokens)
    result["has_adapters"] = has_adapters([gpt])
    result["linear_types"] = sorted({type(m).__name__ for m in gpt.modules()
                                     if isinstance(m, ColumnParallelLinear | RowParallelLinear)})
    result["keys"] = sorted(gpt.sharded_state_dict(metadata={"non_homogeneous_layers": True}))
    if tp == 2:
        save_checkpoint(out / "merged", [gpt], {**META, "adapters": None})
    return result


def _load_adapted(tp: int, pp: int, path: Path) -> torch.Tensor:
    """Build at (tp, pp), adapt the same layers, load the adapter checkpoint, return logits."""
    tiny = model_preset("tiny")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    _, gpt = build_world_model(tiny, 4, parallel)
    freeze_and_adapt([gpt], FROZEN, LORA, seed=SEED + 1)  # values come from the checkpoint
    load_checkpoint(path, [gpt])
    return compute_logits([gpt], random_tokens(tiny))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Reference logits, then the adapted TP=1 and TP=2 worlds (the latter saves checkpoints)."""
    root = tmp_path_factory.mktemp("lora")
    reference = root / "reference"
    plain_logits = run_world(_reference, 1, reference)[0]
    return {"root": root, "plain_logits": plain_logits,
            1: run_world(_adapted_world, 1, 1, reference, root),
            2: run_world(_adapted_world, 2, 2, reference, root)}


# ---------------------------------------------------------------------------------------------
# Tensor parallelism


def test_adapter_forward_and_grads_at_tp2_equal_tp1(worlds: dict) -> None:
    """Same full weights and adapters -> same logits (1e-5) and same gathered A/B gradients.

    Guards the TP layout: a missing all-reduce (dL/dh for column bases, h for row bases), a B
    split unlike its base, or a wrong SwiGLU order changes the TP=2 numbers.
    """
    tp1, tp2 = worlds[1][0], worlds[2]
    for rank, result in enumerate(tp2):
        torch.testing.assert_close(result["logits"], tp1["logits"], atol=1e-5, rtol=0,
                                   msg=lambda m, r=rank: f"TP2 rank {r} logits: {m}")
        assert result["loss"] == pytest.approx(tp1["loss"], abs=1e-6)
        assert result["grads"].keys() == tp1["grads"].keys()
        for key, grad in result["grads"].items():
            assert float(grad.abs().max()) > 0, f"{key}: zero gradient"
            torch.testing.assert_close(grad, tp1["grads"][key], atol=1e-6, rtol=1e-4,
                                       msg=lambda m, k=key, r=rank: f"rank {r} grad {k}: {m}")
    assert not tp1["frozen_grads"], f"frozen parameters got gradients: {tp1['frozen_grads']}"


def test_adapter_init_is_tp_invariant_kaiming_over_full_fan_in(worlds: dict) -> None:
    """Same seed -> the same full A at TP=1 and TP=2 (bit-exact), B zero, bound 1/sqrt(fan_in).

    Guards the peers' TP-dependent init: a row-parallel A drawn per shard with the local fan-in
    would differ across layouts and have a sqrt(TP) larger bound.
    """
    tp1 = worlds[1][0]["init"]
    for rank, result in enumerate(worlds[2]):
        for key, tensor in result["init"].items():
            assert torch.equal(tensor, tp1[key]), f"TP2 rank {rank}: {key} differs from TP=1"
    fan_in = {"linear_qkv": 64, "linear_proj": 64, "linear_fc1": 64, "linear_fc2": 128}
    for key, tensor in tp1.items():
        layer, target, which = key.split(".")
        if which == "b":
            assert not tensor.any(), f"{key}: B must start at zero"
            continue
        expected = init_lora_a(LORA.rank, fan_in[target], derive_seed(SEED, int(layer), target, 0))
        assert torch.equal(tensor, expected), key
        bound = fan_in[target] ** -0.5
        assert 0.8 * bound < float(tensor.abs().max()) <= bound, f"{key}: bound {bound}"


def test_fresh_adapters_keep_the_base_function(worlds: dict) -> None:
    """B = 0 at attach: the adapted model's logits equal the plain model's at TP=1 and TP=2."""
    for tp in (1, 2):
        for result in worlds[tp]:
            torch.testing.assert_close(result["fresh_logits"], worlds["plain_logits"], atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_merge_matches_unmerged_and_unmerge_restores_base(worlds: dict, tp: int) -> None:
    """merged forward == unmerged forward (1e-5) with no communication, at TP=1 and TP=2.

    Unmerge restores W within fp32 rounding (W + d - d; < 1e-7 absolute here). Removing the
    adapters leaves plain Megatron linears and the plain checkpoint key set. Guards merges that
    mix shards (the peers' TP>1 merge failure) and adapters left behind after a merge.
    """
    for rank, result in enumerate(worlds[tp]):
        for name in ("merged_logits", "unmerged_logits", "removed_logits"):
            torch.testing.assert_close(result[name], result["logits"], atol=1e-5, rtol=0,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
        assert result["unmerge_error"] < 1e-7, result["unmerge_error"]
        assert not result["has_adapters"]
        assert result["linear_types"] == ["ColumnParallelLinear", "RowParallelLinear"]
        assert not [k for k in result["keys"] if "lora_" in k]


def test_report_counts_each_parameter_once(worlds: dict) -> None:
    """The report's whole-model counts are layout independent and match the arithmetic.

    Per layer (hidden 64, qkv out 128, ffn 128): 36,992 weights; r=4 adapters add
    4 * (64 + 128) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (128 + 64) = 3,328.
    """
    per_layer, adapters = 36_992, 3_328
    total = 2 * 256 * 64 + 64 + 4 * per_layer
    expected = (total - 3 * per_layer + 3 * adapters, 3 * per_layer, 3 * adapters)
    for tp in (1, 2):
        for result in worlds[tp]:
            model = result["report"].model
            assert (model.trainable, model.frozen, model.adapter) == expected, model
            assert result["report"].adapted_modules == 3 * 4
    assert worlds[2][0]["report"].local.frozen < expected[1]  # TP=2 holds about half the weights


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (1, 2)], ids=["tp1", "pp2"])
def test_adapter_checkpoint_saved_at_tp2_reshards(worlds: dict, tp: int, pp: int) -> None:
    """An adapter-bearing checkpoint saved at TP=2 loads at TP=1 and PP=2 with equal logits.

    Guards fc1's B without Megatron's SwiGLU sharded factory: TP2 -> TP1 would silently
    scramble gate/up rows (a reload at the same TP would not notice).
    """
    results = run_world(_load_adapted, tp * pp, tp, pp, worlds["root"] / "adapted")
    for rank, logits in enumerate(results):
        torch.testing.assert_close(logits, worlds[2][0]["logits"], atol=1e-5, rtol=0,
                                   msg=lambda m, r=rank: f"rank {r}: {m}")


def test_offline_full_tensor_merge_equals_online_merge(worlds: dict) -> None:
    """merge_full_state_dict on the TP=2 adapter checkpoint equals the model merged in place.

    The adapter checkpoint holds full tensors in the TP=1 layout, so the offline merge (growth
    tool, HF export) must reproduce the in-model merge; the result has the plain key set.
    """
    root = worlds["root"]
    with local_world():
        adapted = load_full_tensors(root / "adapted")
        merged = load_full_tensors(root / "merged")
    lora_keys = sorted(k for k in adapted if "lora_" in k)
    assert len(lora_keys) == 2 * 4 * len(FROZEN)
    assert all(k.startswith(("decoder.layers.0.", "decoder.layers.1.", "decoder.layers.2."))
               for k in lora_keys)
    offline = merge_full_state_dict(adapted, META["adapters"])
    assert offline.keys() == merged.keys()
    for key, tensor in merged.items():
        torch.testing.assert_close(offline[key], tensor, atol=1e-6, rtol=0,
                                   msg=lambda m, k=key: f"{k}: {m}")


def test_merge_full_state_dict_rejects_inconsistent_adapters() -> None:
    """A lone lora_a, or adapters on other layers than the metadata lists, is an error."""
    weight = torch.zeros(8, 6)
    a, b = torch.ones(2, 6), torch.ones(8, 2)
    stem = "decoder.layers.3.mlp.linear_fc2."
    meta = {"rank": 2, "alpha": 4.0, "targets": ["linear_fc2"], "layers": [3]}
    merged = merge_full_state_dict({stem + "weight": weight, stem + "lora_a.weight": a,
                                    stem + "lora_b.weight": b}, meta)
    torch.testing.assert_close(merged[stem + "weight"], torch.full((8, 6), 4.0), atol=0, rtol=0)
    with pytest.raises(ValueError, match="without a partner"):
        merge_full_state_dict({stem + "weight": weight, stem + "lora_a.weight": a}, meta)
    with pytest.raises(ValueError, match=r"lists layers \[1\]"):
        merge_full_state_dict({stem + "weight": weight, stem + "lora_a.weight": a,
                               stem + "lora_b.weight": b}, {**meta, "layers": [1]})


# ---------------------------------------------------------------------------------------------
# Frozen weights: no gradient buffer, no optimizer state


def _buffer_bytes(chunks: list) -> dict[str, int]:
    """Bytes of Megatron DDP's grad and param buffers, and the parameters they hold."""
    sizes = dict.fromkeys(("grad", "param_buffer", "held", "held_tensors", "buckets"), 0)
    for chunk in chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            sizes["grad"] += buffer.grad_data.numel() * buffer.grad_data.element_size()
            if buffer.param_data is not None:
                sizes["param_buffer"] += (buffer.param_data.numel()
                                          * buffer.param_data.element_size())
            sizes["held"] += sum(p.numel() for p in buffer.params)
            sizes["held_tensors"] += len(buffer.params)
            sizes["buckets"] += len(buffer.buckets)
    return sizes


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(Adam moment bytes, fp32 master-copy bytes) held by this rank."""
    moments = master = 0
    for inner in leaf_optimizers(optimizer):
        for state in inner.optimizer.state.values():
            moments += sum(state[k].numel() * state[k].element_size()
                           for k in ("exp_avg", "exp_avg_sq"))
        groups = getattr(inner, "shard_fp32_from_float16_groups",
                         getattr(inner, "fp32_from_float16_groups", []))
        master += sum(p.numel() * p.element_size() for group in groups for p in group)
    return moments, master


def _memory_after_steps(distributed_optimizer: bool) -> dict:
    """bf16 model, layers 0-1 frozen + adapted, two optimizer steps; bytes and changes."""
    tiny = model_preset("tiny")
    parallel = ParallelConfig(use_distributed_optimizer=distributed_optimizer)
    precision = PrecisionConfig(params_dtype="bf16")
    layout = init_distributed(tiny, 4, parallel)
    gpt = build_model(tiny, 4, parallel, precision, pre_process=True, post_process=True)
    freeze_and_adapt([gpt], {0, 1}, LORA, seed=SEED)
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    chunks, optimizer = wrap_and_optimize([gpt], parallel, precision, OptimizerConfig(), lr=1e-2)
    batches = microbatches(random_tokens(tiny, seed=layout.dp_rank))
    for _ in range(2):
        train_step(chunks, optimizer, batches)
    params = dict(gpt.named_parameters())
    moments, master = _optimizer_bytes(optimizer)
    return {**_buffer_bytes(chunks),
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "trainable_bf16": sum(p.numel() for p in params.values()
                              if p.requires_grad and p.dtype == torch.bfloat16),
        "frozen": sum(p.numel() for p in params.values() if not p.requires_grad),
        "frozen_not_bf16": [n for n, p in params.items()
                            if not p.requires_grad and p.dtype != torch.bfloat16],
        "moments": moments, "master": master,
        "frozen_changed": [n for n, p in params.items()
                           if not p.requires_grad and not torch.equal(p, before[n])],
        "trainable_unchanged": [n for n, p in params.items()
                                if p.requires_grad and torch.equal(p, before[n])],
        "frozen_with_grad": [n for n, p in params.items() if not p.requires_grad
                             and (p.grad is not None or hasattr(p, "main_grad"))],
    }


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "distopt"])
def test_frozen_weights_get_no_grad_buffer_or_optimizer_state(
        world1: None, distributed_optimizer: bool) -> None:
    """Two steps with Megatron DDP + Adam (plain / distributed), bf16, layers 0-1 frozen.

    Measured: DDP grad buffer = 4 B (fp32) per trainable parameter, Adam moments = 8 B, fp32
    master copies = 4 B (bf16 parameters only: the local spec's torch RMSNorm keeps its weights
    in fp32, which need no master copy), nothing for frozen weights, which stay in their storage
    dtype (bf16 for every matrix; 2 B per parameter). Frozen weights stay bit-exact;
    adapters (A too: B moved off zero in step 1) and new layers change. The distributed
    optimizer pads its buffer for alignment only (< 64 elements per parameter + 128 per bucket).
    Guards freezing after wrapping, and frozen weights leaking into buffers or optimizer.
    """
    m = _memory_after_steps(distributed_optimizer)
    trainable = m["trainable"]
    padding = m["grad"] // 4 - trainable
    print(f"\n[lora memory, distributed_optimizer={distributed_optimizer}] trainable params "
          f"{trainable:,} ({m['trainable_bf16']:,} bf16), frozen {m['frozen']:,}; DDP grad "
          f"buffer {m['grad']:,} B (padding {padding} elements), param buffer "
          f"{m['param_buffer']:,} B; Adam moments {m['moments']:,} B; fp32 master "
          f"{m['master']:,} B")
    assert all(name.endswith("layernorm.weight") for name in m["frozen_not_bf16"]), m
    assert m["held"] == trainable, f"DDP buffers hold {m['held']:,} params, {trainable:,} train"
    assert m["moments"] == 8 * trainable, f"Adam moments {m['moments']:,} B != 8 x {trainable:,}"
    assert m["master"] == 4 * m["trainable_bf16"], f"fp32 master {m['master']:,} B"
    if distributed_optimizer:
        assert 0 <= padding < 64 * m["held_tensors"] + 128 * m["buckets"], f"padding {padding}"
        assert 2 * trainable <= m["param_buffer"] <= 4 * (trainable + padding)  # bf16 / fp32
    else:
        assert m["grad"] == 4 * trainable, f"grad buffer {m['grad']:,} B != 4 x {trainable:,}"
        assert m["param_buffer"] == 0
    assert not m["frozen_changed"], f"frozen weights changed: {m['frozen_changed']}"
    assert not m["trainable_unchanged"], f"trainable weights unchanged: {m['trainable_unchanged']}"
    assert not m["frozen_with_grad"], m["frozen_with_grad"]


def _sharded_memory() -> dict:
    return _memory_after_steps(distributed_optimizer=True)


def test_distributed_optimizer_shards_only_trainable_state_over_dp() -> None:
    """At DP=2 the distributed optimizer's Adam moments and masters sum to the trainable count.

    Each rank holds about half (8 + 4 B per trainable parameter in total, none for frozen ones).
    """
    results = run_world(_sharded_memory, 2)
    trainable = results[0]["trainable"]
    moments = [r["moments"] for r in results]
    masters = [r["master"] for r in results]
    print(f"\n[lora memory, DP=2 distributed optimizer] trainable {trainable:,}: Adam moments "
          f"per rank {moments} B, fp32 master per rank {masters} B")
    assert sum(moments) == 8 * trainable and sum(masters) == 4 * results[0]["trainable_bf16"]
    assert all(abs(b - 4 * trainable) <= 4 * 8 * 128 for b in moments), moments


# ---------------------------------------------------------------------------------------------
# Activation recompute, dropout, errors


def _adapter_grads(recompute: bool) -> dict[str, torch.Tensor]:
    tiny = model_preset("tiny")
    _, gpt = build_world_model(tiny, 4, ParallelConfig(recompute_activations=recompute))
    freeze_and_adapt([gpt], {0, 1}, LORA, seed=SEED, freeze_embeddings=True)
    _set_nonzero_b(gpt)
    _loss_and_backward(gpt, random_tokens(tiny))
    return {f"{n}": p.grad for n, p in gpt.named_parameters() if p.requires_grad}


def test_recompute_keeps_adapter_gradients(world1: None) -> None:
    """Full activation recompute with frozen embeddings and frozen first layers: adapter (and
    new-layer) gradients are non-zero and equal those without recompute.

    Reentrant checkpointing runs its backward only when an input requires grad; with frozen
    embeddings the decoder input does not, so without freeze_and_adapt's fix the adapters of
    recomputed layers silently get no gradient (a peer bug).
    """
    plain = _adapter_grads(recompute=False)
    recomputed = _adapter_grads(recompute=True)
    assert plain.keys() == recomputed.keys()
    assert sum("lora_" in k for k in plain) == 2 * 4 * 2
    for key, grad in plain.items():
        assert recomputed[key] is not None and float(recomputed[key].abs().max()) > 0, key
        torch.testing.assert_close(recomputed[key], grad, atol=1e-7, rtol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")


def _dropout_world() -> dict:
    """TP=2, dropout 0.5: train-mode branch differs from eval; replicas stay equal after steps."""
    tiny = model_preset("tiny")
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    _, gpt = build_world_model(tiny, 4, parallel)
    freeze_and_adapt([gpt], {0, 1}, LoraConfig(rank=4, dropout=0.5), seed=SEED)
    _set_nonzero_b(gpt)
    module = next(m for m in adapted_modules([gpt]) if m.lora_state.target == "linear_fc2")
    x = torch.randn(8, 2, module.weight.shape[1], generator=torch.Generator().manual_seed(0))
    train_out = module(x)[0]
    module.eval()
    eval_out, base_out = module(x)[0], torch.nn.functional.linear(x, module.weight)
    module.train()
    chunks, optimizer = wrap_and_optimize([gpt], parallel, PrecisionConfig(params_dtype="fp32"),
                                          OptimizerConfig(), lr=1e-2)
    for _ in range(2):
        train_step(chunks, optimizer, microbatches(random_tokens(tiny)))
    replicated = {f"{m.lora_state.layer}.{m.lora_state.target}": (
        m.lora_a.weight if m.lora_state.kind == "column" else m.lora_b.weight).detach().clone()
        for m in adapted_modules([gpt])}
    return {"train_differs": not torch.allclose(train_out, eval_out),
            "eval_branch_active": not torch.allclose(eval_out, base_out),
            "replicated": replicated}


def test_dropout_is_active_in_training_and_keeps_tp_replicas_in_sync() -> None:
    """lora.dropout acts in training only, and TP-replicated adapters stay identical on both TP
    ranks after training with dropout (same mask for a replicated input, no divergence)."""
    rank0, rank1 = run_world(_dropout_world, 2)
    for result in (rank0, rank1):
        assert result["train_differs"] and result["eval_branch_active"]
    for key, tensor in rank0["replicated"].items():
        assert torch.equal(tensor, rank1["replicated"][key]), f"{key}: TP replicas diverged"


def test_freeze_and_adapt_sets_which_parameters_train(world1: None) -> None:
    """Frozen layers: every base parameter (norms included) frozen, adapters on the four
    targets train; other layers train fully; embeddings, final norm and output layer follow
    freeze_embeddings."""
    tiny = model_preset("tiny")
    for freeze_embeddings in (False, True):
        _, gpt = build_world_model(tiny, 4, ParallelConfig())
        freeze_and_adapt([gpt], {1, 2}, LORA, seed=SEED, freeze_embeddings=freeze_embeddings)
        for name, param in gpt.named_parameters():
            if "lora_" in name:
                expected = True
            elif name.startswith("decoder.layers."):
                expected = int(name.split(".")[2]) not in (1, 2)
            else:
                expected = not freeze_embeddings
            assert param.requires_grad == expected, (name, freeze_embeddings)
        targets = sorted((m.lora_state.layer, m.lora_state.target)
                         for m in adapted_modules([gpt]))
        assert targets == [(layer, t) for layer in (1, 2) for t in sorted(LORA.targets)]


def test_freeze_and_adapt_rejects_bad_requests(world1: None) -> None:
    """Out-of-range frozen layers, adapting twice and non-linear targets raise ValueError."""
    tiny = model_preset("tiny")
    _, gpt = build_world_model(tiny, 4, ParallelConfig())
    with pytest.raises(ValueError, match=r"frozen_layers: \[4\] outside the model's 4 layers"):
        freeze_and_adapt([gpt], {1, 4}, LORA, seed=SEED)
    gpt.decoder.layers[0].mlp.linear_fc2 = torch.nn.Identity()
    with pytest.raises(ValueError, match="lora.targets: 'linear_fc2' in layer 0 is a Identity"):
        freeze_and_adapt([gpt], {0}, LoraConfig(targets=("linear_fc2",)), seed=SEED)
    del gpt.decoder.layers[1].self_attention.linear_proj
    with pytest.raises(ValueError, match="lora.targets: 'linear_proj' matches no module in "
                                         "layer 1"):
        freeze_and_adapt([gpt], {1}, LORA, seed=SEED)
    _, gpt = build_world_model(tiny, 4, ParallelConfig())
    freeze_and_adapt([gpt], {0}, LORA, seed=SEED)
    assert all(isinstance(m, LoraLinear) for m in adapted_modules([gpt]))
    with pytest.raises(ValueError, match="already holds adapters"):
        freeze_and_adapt([gpt], {1}, LORA, seed=SEED)


def test_norm_fused_branch_input_unpacks_megatrons_te_wrapping() -> None:
    """The LoRA branch of a TE LayerNormLinear reads TE's own normalised input: the forward
    runs with `return_layernorm_output` on (restored afterwards, TE >= 2.9's `_gathered` flag
    kept off) and Megatron's two wrappings of TE's result are unpacked to (out, bias, norm(x))."""
    from megatron_step import te

    out, bias, norm = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    assert te.split_norm_output(((out, norm), None)) == (out, None, norm)
    assert te.split_norm_output((out, bias, norm)) == (out, bias, norm)

    module = torch.nn.Linear(2, 2)
    module.return_layernorm_output, module.return_layernorm_output_gathered = False, False
    with te.returning_norm_output(module):
        assert module.return_layernorm_output is True
        assert module.return_layernorm_output_gathered is False
    assert module.return_layernorm_output is False
    older = torch.nn.Linear(2, 2)  # TE < 2.9 has no `_gathered` flag: none is added
    older.return_layernorm_output = False
    with te.returning_norm_output(older):
        assert older.return_layernorm_output is True
    assert not hasattr(older, "return_layernorm_output_gathered")
