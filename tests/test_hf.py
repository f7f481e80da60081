"""Hugging Face export and import: same function in transformers as in Megatron, lossless round
trips, refusals that leave the destination alone."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_step.checkpoint import load_full_tensors, read_meta, save_checkpoint
from megatron_step.config import LoraConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_step.config import model_preset as preset
from megatron_step.data.tokenizer import load_tokenizer, train_bpe
from megatron_step.forward import compute_logits, train_step
from megatron_step.hf import HFConversionError, load_hf, model_config_from_hf
from megatron_step.lora import adapter_meta, freeze_and_adapt
from megatron_step.optim import wrap_and_optimize
from megatron_step.parallel import local_world

from builders import FP32, build_world_model, load_at_layout, microbatches, random_tokens
from dist import run_world
from growth_builders import tree_snapshot
from tools import load_tool

ADAPTED = [0, 1]
LORA = LoraConfig(rank=4, alpha=8.0)


EXPORT, IMPORT = load_tool("export_hf"), load_tool("import_hf")


def tiny_model(groups: int | None = 2) -> ModelConfig:
    """The tiny preset with non-default RoPE base and eps (so a dropped field shows)."""
    return preset("tiny", num_query_groups=groups, rotary_base=50000, norm_epsilon=1e-6)


def _meta(model: ModelConfig, adapted: bool) -> dict[str, Any]:
    """Trainer-style metadata: stage 1, or stage 2 with layers 0-1 frozen under LoRA."""
    stage = 2 if adapted else 1
    born = [1 if adapted and i in ADAPTED else stage for i in range(model.num_layers)]
    return {"model": dataclasses.asdict(model), "num_layers": model.num_layers, "stage": stage,
            "stage_step": 3, "global_step": 3, "kind": "train", "precision": "fp32",
            "layers": [{"born_stage": b, "source": "init" if b == 1 else "copy:1"}
                       for b in born],
            "adapters": adapter_meta(LORA, ADAPTED) if adapted else None}


def train_and_save(path: Path, tp: int, pp: int, groups: int | None, adapted: bool,
                   distributed_optimizer: bool = False) -> torch.Tensor:
    """Train the tiny model 3 steps at (tp, pp) (layers 0-1 under LoRA if `adapted`), save it
    with its optimizer, return its logits on fixed tokens. Shared with the inspect and
    evaluate tests."""
    model = tiny_model(groups)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              use_distributed_optimizer=distributed_optimizer)
    _, gpt = build_world_model(model, model.num_layers, parallel)
    if adapted:
        freeze_and_adapt([gpt], ADAPTED, LORA, seed=3)
    chunks, optimizer = wrap_and_optimize([gpt], parallel, FP32, OptimizerConfig(), lr=1e-2)
    batches = microbatches(random_tokens(model), 2)
    for _ in range(3):
        train_step(chunks, optimizer, batches)
    save_checkpoint(path, [gpt], _meta(model, adapted), optimizer=optimizer)
    return compute_logits([gpt], random_tokens(model, seed=7))


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(directory).eval()(tokens).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A stage-1 checkpoint (TP1 PP1, GQA) after 3 training steps, and its logits."""
    path = tmp_path_factory.mktemp("trained") / "ckpt"
    return path, run_world(train_and_save, 1, path, 1, 1, 2, False)[0]


CASES = [(1, 1, 2, False), (2, 2, 2, True), (2, 1, None, False)]


@pytest.mark.parametrize(("tp", "pp", "groups", "adapted"), CASES,
                         ids=["tp1pp1-gqa", "tp2pp2-gqa-lora", "tp2-mha-sharded-files"])
def test_export_gives_megatron_logits_in_transformers(request: pytest.FixtureRequest,
                                                      tmp_path: Path, tp: int, pp: int,
                                                      groups: int | None, adapted: bool) -> None:
    """An exported checkpoint loaded with transformers' LlamaForCausalLM computes the logits
    the trained Megatron model computed (1e-4, fp32), whatever the TP/PP it was saved at,
    with GQA or MHA, with unmerged LoRA adapters (merged by the export) and with weights split
    over several safetensors files. Guards the q/k/v de-interleaving, the gate/up order, RoPE,
    norm eps and the config fields."""
    model = tiny_model(groups)
    if (tp, pp) == (1, 1):
        src, logits = request.getfixturevalue("trained")
    else:
        src = tmp_path / "ckpt"
        logits = run_world(train_and_save, tp * pp, src, tp, pp, groups, adapted)[0]
    dst = tmp_path / "hf"
    extra = ["--max-shard-size", "100KB"] if groups is None else []
    assert EXPORT.main([str(src), str(dst), *extra]) == 0

    config = json.loads((dst / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, groups or 4)
    assert (config["rope_theta"], config["rms_norm_eps"], config["vocab_size"]) == (
        50000.0, 1e-6, 256)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert (dst / "model.safetensors.index.json").is_file() == (groups is None)
    torch.testing.assert_close(_hf_logits(dst, random_tokens(model, seed=7)), logits,
                               atol=1e-4, rtol=0)
    if adapted:  # the export really folded the trained adapters in
        with local_world():
            base = load_full_tensors(src)["decoder.layers.0.self_attention.linear_proj.weight"]
        exported = load_hf(dst)[1]["model.layers.0.self_attn.o_proj.weight"]
        assert (exported - base).abs().max() > 1e-6


def test_bf16_export_is_the_rounded_fp32_export(trained: tuple[Path, torch.Tensor],
                                                tmp_path: Path) -> None:
    """--dtype bf16 writes every tensor as bf16, bit-equal to rounding the fp32 export, and
    says so in config.json (a cast in the wrong place or a dtype left behind fails)."""
    src, _ = trained
    assert EXPORT.main([str(src), str(tmp_path / "fp32")]) == 0
    assert EXPORT.main([str(src), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    _, full = load_hf(tmp_path / "fp32")
    config, half = load_hf(tmp_path / "bf16")
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert half.keys() == full.keys()
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name


def _random_hf_model(directory: Path, tied: bool, vocab: int = 256) -> dict[str, torch.Tensor]:
    """A random tiny HF LLaMA (GQA unless tied) saved with save_pretrained; its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4 if tied else 2, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                             "rope_theta": 50000.0},
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms too: a swapped norm must show
            param.copy_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _megatron_logits(path: Path, model: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    _, gpt = load_at_layout(model, model.num_layers,
                            ParallelConfig(tensor_model_parallel_size=2), path)
    return compute_logits([gpt], tokens)


@pytest.mark.parametrize("tied", [False, True], ids=["gqa-untied", "mha-tied"])
def test_hf_round_trip_is_bit_exact(tmp_path: Path, tied: bool) -> None:
    """HF -> megatron_step -> HF reproduces every tensor bit for bit and the architecture
    fields, with GQA or tied embeddings; the imported checkpoint is a stage-1 starting point
    (kind "imported", every layer born in stage 1) and, loaded into Megatron at TP=2, computes
    the HF model's logits (so the import is right, not merely invertible)."""
    original = _random_hf_model(tmp_path / "hf", tied)
    ckpt, back = tmp_path / "ckpt", tmp_path / "hf_back"
    assert IMPORT.main([str(tmp_path / "hf"), str(ckpt)]) == 0
    assert EXPORT.main([str(ckpt), str(back), "--max-shard-size", "200KB"]) == 0

    config, state = load_hf(back)
    assert state.keys() == original.keys() - ({"lm_head.weight"} if tied else set())
    for name, tensor in state.items():
        assert torch.equal(tensor, original[name]), name
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                  "max_position_embeddings", "rope_parameters"):
        assert config[field] == source[field], field
    meta = read_meta(ckpt)
    assert meta["kind"] == "imported" and meta["stage"] == 1
    assert meta["layers"] == [{"born_stage": 1, "source": "init"}] * 3
    if not tied:
        model = model_config_from_hf(source)
        tokens = random_tokens(model, seed=1)
        megatron = run_world(_megatron_logits, 2, ckpt, model, tokens)[0]
        torch.testing.assert_close(megatron, _hf_logits(tmp_path / "hf", tokens),
                                   atol=1e-4, rtol=0)


def _tokenizer(kind: str, directory: Path, documents: list[str]) -> str:
    """A 300-token BPE tokenizer trained on `documents`: tokenizer.json or SentencePiece."""
    if kind == "tokenizer.json":
        return str(train_bpe(documents, 300, directory / "bpe.json").files()[0])
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=str(directory / "sp"), vocab_size=300,
        model_type="bpe", unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2)
    return str(directory / "sp.model")


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_export_ships_the_tokenizer(tmp_path: Path, wikitext: Path, kind: str,
                                    trained: tuple[Path, torch.Tensor],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """With --tokenizer, transformers' AutoTokenizer loads from the exported directory and
    encodes text exactly as training did (no BOS added), with EOD as eos in the tokenizer and
    in config.json; a tokenizer larger than the model's vocabulary is refused by name.
    SentencePiece goes through transformers' LlamaTokenizer, which matches it on text with
    single inner spaces and none at the ends (hf.hf_tokenizer documents the limits)."""
    from transformers import AutoTokenizer

    lines = (wikitext / "valid.txt").read_text(encoding="utf-8").splitlines()
    documents = [line for line in lines if line.strip() and "<unk>" not in line][:400]
    spec = _tokenizer(kind, tmp_path, documents)
    _random_hf_model(tmp_path / "hf", tied=False, vocab=320)
    assert IMPORT.main([str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    dst = tmp_path / "export"
    assert EXPORT.main([str(tmp_path / "ckpt"), str(dst), "--tokenizer", spec]) == 0
    ours, theirs = load_tokenizer(spec), AutoTokenizer.from_pretrained(dst)
    for text in documents[:20]:
        text = text if kind == "tokenizer.json" else " ".join(text.split())
        assert theirs(text)["input_ids"] == ours.encode(text), text
    assert theirs.eos_token_id == ours.eod == json.loads(
        (dst / "config.json").read_text())["eos_token_id"]
    assert EXPORT.main([str(trained[0]), str(tmp_path / "small"), "--tokenizer", spec]) == 1
    assert "--tokenizer: vocabulary of 300 exceeds the model's 256" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value"), [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("attention_bias", True), ("hidden_act", "gelu"), ("head_dim", 32),
    ("rope_theta", 10000.5), ("num_key_value_heads", 3)])
def test_import_names_the_unsupported_field(field: str, value: Any) -> None:
    """An HF config megatron_step's LLaMA cannot represent is refused with an error naming the
    field, instead of importing a silently different model."""
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "num_hidden_layers": 2,
              "vocab_size": 256, "max_position_embeddings": 64, field: value}
    with pytest.raises(HFConversionError, match=field):
        model_config_from_hf(config)


def test_import_tool_errors(tmp_path: Path, trained: tuple[Path, torch.Tensor],
                            capsys: pytest.CaptureFixture[str]) -> None:
    """import_hf exits 1 naming config.json for a non-HF directory, and 2 (DST untouched)
    when DST exists without --overwrite; nothing is created on failure."""
    src, _ = trained
    assert IMPORT.main([str(src), str(tmp_path / "out")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    before = tree_snapshot(src)
    assert IMPORT.main([str(tmp_path), str(src)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tree_snapshot(src) == before


def test_export_refuses_to_overwrite_unless_asked(trained: tuple[Path, torch.Tensor],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An existing DST is left untouched (exit 2, message names --overwrite) unless
    --overwrite is given, which replaces it whole (no stale files survive)."""
    src, _ = trained
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "stale.txt").write_text("keep me")
    before = tree_snapshot(dst)
    assert EXPORT.main([str(src), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tree_snapshot(dst) == before
    assert EXPORT.main([str(src), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(("damage", "named"), [("shard", "__0_0.distcp"),
                                               ("index", ".metadata")])
def test_export_of_a_damaged_checkpoint_fails_without_output(
        trained: tuple[Path, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: str, named: str) -> None:
    """A checkpoint with a deleted shard or a truncated index is refused before anything is
    written: exit 1, the message names the missing/corrupt file, no DST and no temporary
    directory is left next to it."""
    src = tmp_path / "ckpt"
    shutil.copytree(trained[0], src)
    if damage == "shard":
        (src / "__0_0.distcp").unlink()
    else:
        (src / ".metadata").write_bytes((src / ".metadata").read_bytes()[:100])
    out = tmp_path / "out"
    out.mkdir()
    assert EXPORT.main([str(src), str(out / "hf")]) == 1
    assert named in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_tools_help() -> None:
    """--help of both tools exits 0 (the module docstring is the help text)."""
    for tool in (EXPORT, IMPORT):
        assert tool.main(["--help"]) == 0
