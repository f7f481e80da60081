"""Hugging Face LLaMA <-> megatron_step: tensor and config conversion, HF directory I/O.

A STEP model leaves Megatron as a plain `LlamaForCausalLM` directory (config.json + safetensors)
that transformers, lm-eval-harness and vLLM load, and a small HF LLaMA can enter as a stage-1
starting point. Conversion works on *full* tensors (`checkpoint.load_full_tensors` /
`checkpoint.save_full_tensors`), so it is independent of the TP/PP a checkpoint was saved at.

Layout facts the conversion rests on (megatron-core 0.16.1, verified by the logits tests):
- `linear_qkv.weight` is [(heads + 2 * groups) * head_dim, hidden], interleaved per query group:
  for each group g the rows are [q heads of g (heads/groups * head_dim); k_g; v_g]
  (`SelfAttention.get_query_key_value_tensors`). Query head h belongs to group
  h // (heads/groups), which is HF's GQA convention, so q/k/v are plain row splits.
- `linear_fc1.weight` is [gate; up] ([2 * ffn, hidden]); the MLP computes silu(gate) * up
  (`MLP.glu`), HF's `down(silu(gate_proj(x)) * up_proj(x))`.
- Megatron's RoPE (rotary_interleaved=False) rotates halves like HF's `rotate_half`, so q and k
  need no permutation.
- The RMSNorm weights fused into `linear_qkv` / `linear_fc1` are HF's `input_layernorm` and
  `post_attention_layernorm`.

Invariants: `from_hf(to_hf(t)) == t` and `to_hf(from_hf(s)) == s` bit for bit (pure row
splits, concatenations and renames); nothing is ever cast unless a dtype is asked for.
HF directories are written to a hidden sibling and renamed into place, so a failure never leaves
a partial destination.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from megatron_step.checkpoint import load_full_tensors, model_config_from_meta, save_full_tensors
from megatron_step.config import ConfigError, ModelConfig, load_model_config
from megatron_step.data.tokenizer import Tokenizer, load_tokenizer
from megatron_step.inspection import verify_checkpoint
from megatron_step.lora import merge_full_state_dict
from megatron_step.model import DTYPES

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Per-layer tensors that are a plain rename (Megatron suffix -> HF suffix).
_LAYER_RENAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL_RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_HF_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


class HFConversionError(ValueError):
    """A model or file that cannot be converted (the message names the field or tensor)."""


# ---------------------------------------------------------------------------------------------
# Fused tensors


def split_qkv(weight: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Megatron's group-interleaved `linear_qkv.weight` -> HF (q_proj, k_proj, v_proj)."""
    groups, per_group = model.query_groups, model.num_attention_heads // model.query_groups
    blocks = weight.reshape(groups, per_group + 2, model.head_dim, weight.shape[-1])
    query = blocks[:, :per_group].reshape(-1, weight.shape[-1])
    key = blocks[:, per_group].reshape(-1, weight.shape[-1])
    value = blocks[:, per_group + 1].reshape(-1, weight.shape[-1])
    return query.clone(), key.clone(), value.clone()  # own storage: safetensors refuses aliases


def fuse_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             model: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's group-interleaved `linear_qkv.weight`."""
    groups, hidden = model.query_groups, query.shape[-1]
    return torch.cat([query.reshape(groups, -1, hidden), key.reshape(groups, -1, hidden),
                      value.reshape(groups, -1, hidden)], dim=1).reshape(-1, hidden)


def split_fc1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's SwiGLU `linear_fc1.weight` [gate; up] -> HF (gate_proj, up_proj)."""
    gate, up = weight.chunk(2, dim=0)
    return gate.clone(), up.clone()


# ---------------------------------------------------------------------------------------------
# State dicts


def _take(tensors: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise HFConversionError(f"{what} has no tensor {key!r}")
    return tensors[key]


def _check_consumed(tensors: Mapping[str, torch.Tensor], used: set[str], what: str,
                    hint: str) -> None:
    extra = sorted(set(tensors) - used)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise HFConversionError(f"{what} has tensors the conversion does not know: {shown}"
                                f"{hint}")


def _global_keys(model: ModelConfig) -> dict[str, str]:
    if model.untie_embeddings_and_output_weights:
        return _GLOBAL_RENAMES
    return {k: v for k, v in _GLOBAL_RENAMES.items() if k != "output_layer.weight"}


def to_hf(tensors: Mapping[str, torch.Tensor], model: ModelConfig,
          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full Megatron tensors (checkpoint keys) -> HF `LlamaForCausalLM` state dict.

    Args:
        tensors: every model tensor of a checkpoint, adapters already merged.
        model: the checkpoint's ModelConfig (its own depth).
        dtype: cast every tensor to it; None keeps the stored dtypes.

    Raises:
        HFConversionError: a tensor is missing, or there are tensors this mapping does not
            cover (e.g. unmerged `lora_*`), named in the message.
    """
    what = "the checkpoint"
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for src, dst in _global_keys(model).items():
        out[dst] = _take(tensors, src, what)
        used.add(src)
    for layer in range(model.num_layers):
        meg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        for src, dst in _LAYER_RENAMES.items():
            out[hf + dst] = _take(tensors, meg + src, what)
        parts = split_qkv(_take(tensors, meg + _QKV, what), model)
        parts += split_fc1(_take(tensors, meg + _FC1, what))
        out.update({hf + name: t for name, t in zip(_HF_QKV + _HF_FC1, parts, strict=True)})
        used.update(meg + k for k in (*_LAYER_RENAMES, _QKV, _FC1))
    _check_consumed(tensors, used, what, " (adapters must be merged before export)")
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return out


def from_hf(state: Mapping[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """HF `LlamaForCausalLM` state dict -> full Megatron tensors (checkpoint keys).

    HF's non-persistent rotary buffers (`rotary_emb.inv_freq`, written by old exporters) are
    ignored: Megatron recomputes them from `rotary_base`.

    Raises:
        HFConversionError: a tensor is missing or unknown (named in the message).
    """
    what = "the Hugging Face model"
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for dst, src in _global_keys(model).items():
        out[dst] = _take(state, src, what)
        used.add(src)
    for layer in range(model.num_layers):
        meg, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        for dst, src in _LAYER_RENAMES.items():
            out[meg + dst] = _take(state, hf + src, what)
        query, key, value = (_take(state, hf + name, what) for name in _HF_QKV)
        out[meg + _QKV] = fuse_qkv(query, key, value, model)
        out[meg + _FC1] = torch.cat([_take(state, hf + name, what) for name in _HF_FC1])
        used.update(hf + k for k in (*_LAYER_RENAMES.values(), *_HF_QKV, *_HF_FC1))
    _check_consumed(state, used, what, "")
    return out


# ---------------------------------------------------------------------------------------------
# Configs


def hf_config(model: ModelConfig, dtype: torch.dtype,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """config.json of the HF LLaMA equal to `model` (readable by transformers 4.x and 5.x).

    Both spellings of RoPE (`rope_theta`, 4.x; `rope_parameters`, 5.x) and of the dtype
    (`torch_dtype`, `dtype`) are written so either major version reads the same model.
    """
    theta = float(model.rotary_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
    }


def _require(config: Mapping[str, Any], name: str, ok: Callable[[Any], bool], wanted: str,
             default: Any = None) -> Any:
    value = config.get(name, default)
    if not ok(value):
        raise HFConversionError(f"config.json: {name} = {value!r} is not supported "
                                f"(megatron_step's LLaMA needs {wanted})")
    return value


def _rope_theta(config: Mapping[str, Any]) -> int:
    """rotary_base from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    rope = config.get(field) or {}
    if rope.get("rope_type", "default") != "default":
        raise HFConversionError(f"config.json: {field}.rope_type = {rope['rope_type']!r} is not "
                                "supported (megatron_step's LLaMA has plain RoPE, no scaling)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise HFConversionError(f"config.json: rope_theta = {theta!r} is not supported "
                                "(megatron_step's rotary_base is an integer)")
    return int(theta)


# ModelConfig field <- config.json field, for the plain copies (and to name errors).
_HF_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
              "num_attention_heads": "num_attention_heads",
              "num_query_groups": "num_key_value_heads", "ffn_hidden_size": "intermediate_size",
              "vocab_size": "vocab_size", "seq_length": "max_position_embeddings",
              "norm_epsilon": "rms_norm_eps", "init_method_std": "initializer_range"}


def model_config_from_hf(config: Mapping[str, Any],
                         seq_length: int | None = None) -> ModelConfig:
    """The ModelConfig of an HF LLaMA config.json, or an error naming the unsupported field.

    Args:
        config: parsed config.json.
        seq_length: training sequence length; default `max_position_embeddings`.
    """
    _require(config, "model_type", lambda v: v == "llama", "'llama'")
    _require(config, "hidden_act", lambda v: v == "silu", "'silu' (SwiGLU)", "silu")
    for flag in ("attention_bias", "mlp_bias"):
        _require(config, flag, lambda v: not v, "false (no biases)", False)
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        _require(config, "head_dim", lambda v: v in (None, hidden // heads),
                 f"hidden_size / num_attention_heads = {hidden // heads}")
    fields = {ours: config[theirs] for ours, theirs in _HF_FIELDS.items() if theirs in config}
    fields.setdefault("norm_epsilon", 1e-6)  # LlamaConfig's default, not ours
    if fields.get("num_query_groups") == heads:
        fields["num_query_groups"] = None  # MHA, spelled as the presets spell it
    if seq_length is not None:
        fields["seq_length"] = seq_length
    fields["rotary_base"] = _rope_theta(config)
    fields["untie_embeddings_and_output_weights"] = not config.get("tie_word_embeddings", False)
    try:
        return load_model_config(fields)
    except ConfigError as exc:
        field, _, message = str(exc).partition(": ")
        name = _HF_FIELDS.get(field.removeprefix("model."), field)
        raise HFConversionError(f"config.json: {name}: {message}") from exc


# ---------------------------------------------------------------------------------------------
# Directories


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Greedy split of the tensor names into files of at most `max_bytes` (one big tensor
    may exceed it alone), in insertion order."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_atomic_dir(dst: Path, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """Create directory `dst` by `fill(tmp)` on a hidden sibling, then rename it into place.

    Raises:
        FileExistsError: `dst` exists and `overwrite` is false (nothing is written).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists (pass --overwrite to replace it)")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def save_hf(dst: str | Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
            extra_files: Mapping[str, Path] | None = None,
            extra_json: Mapping[str, Any] | None = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write an HF model directory atomically: config.json, safetensors (sharded with an index
    when larger than `max_shard_bytes`, HF's naming), `extra_files` ({name in dst: source}) copied
    in and `extra_json` ({name: content}) written (the tokenizer).

    Raises:
        FileExistsError: `dst` exists and `overwrite` is false.
    """
    shards = _shards(state, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, keys in tqdm(list(zip(names, shards, strict=True)), desc="writing weights",
                               unit="file", disable=not progress):
            save_file({k: state[k].contiguous() for k in keys}, tmp / name,
                      metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: n for n, keys in zip(names, shards, strict=True)
                                    for k in keys}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copy2(source, tmp / name)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")

    return _write_atomic_dir(Path(dst), fill, overwrite)


def load_hf(src: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of an HF model directory (single or sharded safetensors).

    Raises:
        HFConversionError: the directory, config.json or a weight file is missing or unreadable.
    """
    src = Path(src)
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise HFConversionError(f"{str(src)!r} is not a Hugging Face model directory: "
                                f"{CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise HFConversionError(f"{str(config_path)!r} is not valid JSON: {exc}") from exc
    if (src / INDEX_FILE).is_file():
        files = sorted(set(json.loads((src / INDEX_FILE).read_text())["weight_map"].values()))
    elif (src / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise HFConversionError(f"{str(src)!r} has no safetensors weights ({SINGLE_FILE} or "
                                f"{INDEX_FILE}); convert .bin checkpoints with transformers "
                                "first (save_pretrained)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (src / name).is_file():
            raise HFConversionError(f"{str(src)!r}: weight file {name} is missing")
        state.update(load_file(src / name))
    return config, state


def import_meta(model: ModelConfig, precision: str, source: str) -> dict[str, Any]:
    """megatron_step metadata of an imported model: a finished stage 1, every layer `init`."""
    return {"kind": "imported", "model": dataclasses.asdict(model),
            "num_layers": model.num_layers, "stage": 1, "stage_step": 0, "global_step": 0,
            "consumed_samples": 0, "adapters": None, "precision": precision,
            "layers": [{"born_stage": 1, "source": "init"}] * model.num_layers,
            "imported_from": source}


def hf_tokenizer(tok: Tokenizer, model: ModelConfig) -> tuple[dict[str, Path], dict[str, Any]]:
    """Files ({name in the HF directory: source}) and tokenizer_config.json that make
    transformers' AutoTokenizer encode like `tok`: no BOS, no special tokens added, EOD as
    `eos_token`. The byte-level tokenizer has no files (ids are UTF-8 bytes, EOD 0).

    SentencePiece models go through transformers' LlamaTokenizer (the file becomes
    `tokenizer.model`), which matches SentencePiece for BPE models on text with single inner
    spaces and none at the ends (verified); it does not apply SentencePiece's whitespace
    normaliser and it parses special-token strings such as "<unk>" in the text, so other text
    may tokenize differently. tokenizer.json tokenizers match exactly.

    Raises:
        HFConversionError: the tokenizer's vocabulary is larger than the model's.
    """
    if tok.vocab_size > model.vocab_size:
        raise HFConversionError(f"--tokenizer: vocabulary of {tok.vocab_size} exceeds the "
                                f"model's {model.vocab_size} ({tok.describe()})")
    common = {"bos_token": None, "model_max_length": model.seq_length,
              "clean_up_tokenization_spaces": False}
    if tok.kind == "huggingface":
        return ({"tokenizer.json": tok.files()[0]},
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.decode([tok.eod]),
                 **common})
    if tok.kind == "sentencepiece":
        import sentencepiece

        path = tok.files()[0]
        eos = sentencepiece.SentencePieceProcessor(model_file=str(path)).id_to_piece(tok.eod)
        return ({"tokenizer.model": path},
                {"tokenizer_class": "LlamaTokenizer", "eos_token": eos, "add_bos_token": False,
                 "add_eos_token": False, **common})
    return {}, {}


# ---------------------------------------------------------------------------------------------
# Checkpoint <-> HF directory


def export_checkpoint(src: str | Path, dst: str | Path, *, dtype: str | None = None,
                      tokenizer: str | None = None, overwrite: bool = False,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = True) -> Path:
    """Write the model of megatron_step checkpoint `src` as an HF LlamaForCausalLM at `dst`.

    The checkpoint is verified (load-free, `inspection.verify_checkpoint`) before anything is
    read, unmerged adapters are merged (`lora.merge_full_state_dict`), and `dst` appears only
    when complete. Needs a process group to read tensors (`parallel.local_world()`).

    Args:
        src: checkpoint directory, saved at any TP/PP.
        dst: HF model directory to create.
        dtype: "fp32" or "bf16"; None keeps the checkpoint's dtype.
        tokenizer: tokenizer spec (`tokenizer.load_tokenizer`) shipped with the model
            (`hf_tokenizer`); its end-of-document id becomes `eos_token_id`.
        overwrite: replace an existing `dst`.

    Raises:
        FileExistsError: `dst` exists and `overwrite` is false (checked first).
        CheckpointError: `src` is incomplete or corrupt (the message names what is missing).
    """
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists (pass --overwrite to replace it)")
    meta = verify_checkpoint(src)
    model = model_config_from_meta(meta)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    files, tok_config = hf_tokenizer(tok, model) if tok is not None else ({}, {})
    tensors = load_full_tensors(src)
    if meta.get("adapters"):
        tensors = merge_full_state_dict(tensors, meta["adapters"])
    state = to_hf(tensors, model, DTYPES[dtype] if dtype else None)
    config = hf_config(model, next(iter(state.values())).dtype,
                       eos_token_id=tok.eod if tok else None)
    return save_hf(dst, config, state, extra_files=files,
                   extra_json={"tokenizer_config.json": tok_config} if tok_config else None,
                   overwrite=overwrite, max_shard_bytes=max_shard_bytes, progress=progress)


def import_checkpoint(src: str | Path, dst: str | Path, *, seq_length: int | None = None,
                      overwrite: bool = False) -> tuple[Path, ModelConfig]:
    """Convert HF LLaMA directory `src` into a megatron_step checkpoint at `dst` (stage 1 done).

    Weights keep their dtype when it is fp32 or bf16 (a lossless round trip); fp16 becomes
    fp32. Collective over the current world; call it from `parallel.local_world()`.

    Raises:
        FileExistsError: `dst` exists and `overwrite` is false (checked first).
        HFConversionError: `src` is not a supported LLaMA (the message names the field/file).
    """
    if Path(dst).exists() and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists (pass --overwrite to replace it)")
    config, state = load_hf(src)
    model = model_config_from_hf(config, seq_length)
    tensors = from_hf(state, model)
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16,
                                                           torch.float32} else torch.float32
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    return save_full_tensors(dst, tensors, import_meta(model, precision, str(src))), model
