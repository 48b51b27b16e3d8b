"""Mapping between our Llama (ModelConfig + state dict) and Hugging Face's LlamaForCausalLM format.

Used by tools/convert_to_hf.py and tools/convert_from_hf.py; works on plain
(ModelConfig, state_dict) pairs so it needs neither transformers nor a checkpoint on disk.

Weight correspondence (ours -> Hugging Face; {i} = layer):
    embedding.weight [V_padded, h]            -> model.embed_tokens.weight [V, h]   (padding rows dropped)
    layers.{i}.attention.qkv.weight           -> model.layers.{i}.self_attn.{q,k,v}_proj.weight
        (ours is fused in grouped layout: per kv group g, [q heads of g, k_g, v_g])
    the _LAYER_WEIGHTS table below             -> the remaining per-layer weights, unchanged
    final_norm.weight                          -> model.norm.weight
    output.weight [V_padded, h]                -> lm_head.weight [V, h] (absent when tied)
Rotary embeddings use the same rotate-half convention on both sides, so q/k rows are not permuted.
Open-Llama's stable embedding (a LayerNorm after the token embedding) has no Hugging Face Llama
equivalent: exporting such a model raises ConversionError instead of writing a different model; so does a
weight holding NaN/Inf (a diverged checkpoint), named in the message.

Importing refuses, by field name, a config.json field that changes the math in a way our Llama does not implement
(sliding_window below the context, attention_bias, mlp_bias, head_dim other than hidden/heads, rope scaling,
hidden_act other than silu, ...: _unsupported_fields). A config that says tie_word_embeddings but whose weights hold
a different lm_head.weight converts untied, keeping the head, with a warning (transformers does the same).
Reading a Hugging Face folder, a config.json that is not JSON or lacks a size, a safetensors file that is cut
short or damaged, and a tensor whose shape config.json does not explain each give a ConversionError naming the
file or tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_llama.config import ModelConfig
from megatron_llama.data.chat_template import DEFAULT_CHAT_TEMPLATE, get_chat_template

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Per-layer weights whose tensors are identical on both sides: ours -> Hugging Face.
_LAYER_WEIGHTS = {
    "input_norm.weight": "input_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
# Hugging Face buffers some older checkpoints carry; recomputed on load, never weights.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The model or files cannot be converted; the message says what to change."""


# ----------------------------------------------------------------------------- configs

def hf_config_dict(config: ModelConfig, dtype: torch.dtype, *, bos_token_id: int | None = None,
                   eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """config.json contents for transformers.LlamaConfig (readable by transformers 4.x and 5.x)."""
    check_exportable(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_method_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
    }


def check_exportable(config: ModelConfig) -> None:
    if config.use_stable_embedding:
        raise ConversionError(
            "this model uses Open-Llama's stable embedding (a LayerNorm right after the token embedding, "
            "ModelConfig.use_stable_embedding / the preset's setting); Hugging Face LlamaForCausalLM has no such "
            "layer, so the export would compute different logits. Train without stable embedding to export "
            "to the Hugging Face Llama format.")


def model_config_from_hf(hf_config: dict, source: str = "config.json",
                         make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig for a Hugging Face Llama config.json; refuses features our model does not have."""
    model_type = hf_config.get("model_type")
    if model_type != "llama":
        raise ConversionError(f"{source}: model_type is {model_type!r}; only 'llama' (LlamaForCausalLM) converts")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in sizes if key not in hf_config]
    if missing:
        raise ConversionError(f"{source}: missing {', '.join(missing)}")
    wrong = [f"{key} {hf_config[key]!r}" for key in sizes + ("num_key_value_heads",)
             if key in hf_config and hf_config[key] is not None
             and (not isinstance(hf_config[key], int) or isinstance(hf_config[key], bool) or hf_config[key] <= 0)]
    if wrong:
        raise ConversionError(f"{source}: {', '.join(wrong)} should be positive whole numbers")
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    unsupported = _unsupported_fields(hf_config)
    if unsupported:
        raise ConversionError(f"{source}: {'; '.join(unsupported)}: our Llama does not compute that, so the converted "
                              f"model would give other logits")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    kv_heads = hf_config.get("num_key_value_heads") or heads
    rotary_base = _positive_number(source, "rope_theta", rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    config = ModelConfig(
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        vocab_size=hf_config["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rotary_base=rotary_base,
        norm_epsilon=_positive_number(source, "rms_norm_eps", hf_config.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
        use_stable_embedding=False,
        init_method_std=hf_config.get("initializer_range", 0.02),
    )
    try:
        config.check()
    except ValueError as error:
        raise ConversionError(f"{source}: {error} (in Hugging Face keys: --num-query-groups is num_key_value_heads, "
                              f"--ffn-hidden-size is intermediate_size)") from None
    return config


def _unsupported_fields(hf_config: dict) -> list[str]:
    """What in a Llama config.json changes the forward pass in a way our Llama does not implement, each named by its
    field (e.g. a Mistral checkpoint relabelled 'llama' keeps its sliding window); empty when nothing does."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    context = hf_config.get("max_position_embeddings", 2048)
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    rotary_fraction = (rope if isinstance(rope, dict) else {}).get("partial_rotary_factor",
                                                                  hf_config.get("partial_rotary_factor"))
    window = hf_config.get("sliding_window")
    checks = {  # field: (value, whether our model cannot compute it, what it does)
        "head_dim": (hf_config.get("head_dim"), hf_config.get("head_dim") not in (None, hidden // heads),
                     f"differs from hidden_size / num_attention_heads = {hidden // heads}"),
        "attention_bias": (hf_config.get("attention_bias"), bool(hf_config.get("attention_bias")),
                           "adds biases to the attention projections"),
        "mlp_bias": (hf_config.get("mlp_bias"), bool(hf_config.get("mlp_bias")), "adds biases to the MLP"),
        "hidden_act": (hf_config.get("hidden_act"), hf_config.get("hidden_act", "silu") not in ("silu", "swish"),
                       "is not silu (our MLP is SwiGLU)"),
        "rope type": (rope_type, rope_type != "default",
                      "scales the rotary embeddings (rope scaling is not supported yet; only 'default' converts)"),
        "partial_rotary_factor": (rotary_fraction, rotary_fraction not in (None, 1, 1.0),
                                  "rotates only part of each head"),
        "sliding_window": (window, isinstance(window, int) and hf_config.get("use_sliding_window") is not False
                           and window < context,
                           f"limits attention to the last {window} tokens, fewer than max_position_embeddings "
                           f"{context}"),
        "attn_logit_softcapping": (hf_config.get("attn_logit_softcapping"),
                                   hf_config.get("attn_logit_softcapping") is not None, "caps the attention scores"),
        "final_logit_softcapping": (hf_config.get("final_logit_softcapping"),
                                    hf_config.get("final_logit_softcapping") is not None, "caps the logits"),
    }
    return [f"{name} {value!r} {effect}" for name, (value, unsupported, effect) in checks.items() if unsupported]


def _positive_number(source: str, key: str, value) -> float:
    """`value` of the config's `key` as a float; ConversionError naming both unless it is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConversionError(f"{source}: {key} {value!r} should be a positive number")
    return float(value)


# ----------------------------------------------------------------------------- weights

def _require(state_dict: dict, name: str) -> torch.Tensor:
    if name not in state_dict:
        raise ConversionError(f"the state dict has no {name!r}; it does not match the model config "
                              f"({len(state_dict)} tensors present)")
    return state_dict[name]


def split_qkv(config: ModelConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused grouped qkv [(heads + 2 groups) d, h] -> q [heads d, h], k [groups d, h], v [groups d, h]."""
    groups, d, h = config.kv_heads, config.head_dim, qkv.shape[1]
    per_group = qkv.view(groups, config.num_attention_heads // groups + 2, d, h)
    q, k, v = per_group.split([config.num_attention_heads // groups, 1, 1], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def fuse_qkv(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of split_qkv."""
    groups, d, h = config.kv_heads, config.head_dim, q.shape[1]
    per_group = [q.view(groups, -1, d, h), k.view(groups, 1, d, h), v.view(groups, 1, d, h)]
    return torch.cat(per_group, dim=1).reshape(-1, h)


def to_hf_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full state dict -> Hugging Face LlamaForCausalLM names and shapes (views; not yet copied)."""
    check_exportable(config)
    hf = {"model.embed_tokens.weight": _require(state_dict, "embedding.weight")[:config.vocab_size]}
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(config, _require(state_dict, ours + "attention.qkv.weight"))
        hf[theirs + "self_attn.q_proj.weight"] = q
        hf[theirs + "self_attn.k_proj.weight"] = k
        hf[theirs + "self_attn.v_proj.weight"] = v
        for our_name, hf_name in _LAYER_WEIGHTS.items():
            hf[theirs + hf_name] = _require(state_dict, ours + our_name)
    hf["model.norm.weight"] = _require(state_dict, "final_norm.weight")
    if config.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = _require(state_dict, "output.weight")[:config.vocab_size]
    expected = _our_names(config)
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        raise ConversionError(f"the state dict holds tensors the model config does not explain: {unexpected[:5]}")
    return hf


def _our_names(config: ModelConfig) -> set[str]:
    names = {"embedding.weight", "final_norm.weight"}
    if config.untie_embeddings_and_output_weights:
        names.add("output.weight")
    for i in range(config.num_layers):
        names.add(f"layers.{i}.attention.qkv.weight")
        names.update(f"layers.{i}.{name}" for name in _LAYER_WEIGHTS)
    return names


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face weight name -> its shape for `config` (lm_head included even when tied: some exports hold it)."""
    h, d, vocab, ffn = config.hidden_size, config.head_dim, config.vocab_size, config.ffn_hidden_size
    per_layer = {"self_attn.q_proj.weight": (config.num_attention_heads * d, h),
                 "self_attn.k_proj.weight": (config.kv_heads * d, h),
                 "self_attn.v_proj.weight": (config.kv_heads * d, h),
                 "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn)}
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def _pad_vocab_rows(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """[V, h] -> [padded_rows, h], padding rows zero (the loss and logits of real tokens ignore them)."""
    padded = weight.new_zeros(padded_rows, weight.shape[1])
    padded[:weight.shape[0]] = weight
    return padded


def from_hf_state_dict(config: ModelConfig, hf: dict[str, torch.Tensor],
                       dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM tensors -> our full state dict as a tp=1 model holds it
    (vocabulary rows zero-padded to ModelConfig.padded_vocab_size(1))."""
    hf = {name: tensor for name, tensor in hf.items() if not name.endswith(_IGNORED_HF_SUFFIXES)}
    padded_vocab = config.padded_vocab_size(1)
    shapes = hf_weight_shapes(config)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConversionError(f"the Hugging Face weights have no {name!r}; they do not match config.json")
        tensor = hf.pop(name)
        if tuple(tensor.shape) != shapes[name]:
            raise ConversionError(f"the Hugging Face weight {name} has shape {list(tensor.shape)} but config.json "
                                  f"implies {list(shapes[name])}; the weights and config.json do not belong together")
        return tensor.to(dtype)

    ours = {"embedding.weight": _pad_vocab_rows(take("model.embed_tokens.weight"), padded_vocab)}
    for i in range(config.num_layers):
        theirs = f"model.layers.{i}."
        q, k, v = (take(theirs + f"self_attn.{part}_proj.weight") for part in "qkv")
        ours[f"layers.{i}.attention.qkv.weight"] = fuse_qkv(config, q, k, v)
        for our_name, hf_name in _LAYER_WEIGHTS.items():
            ours[f"layers.{i}.{our_name}"] = take(theirs + hf_name)
    ours["final_norm.weight"] = take("model.norm.weight")
    if config.untie_embeddings_and_output_weights:
        ours["output.weight"] = _pad_vocab_rows(take("lm_head.weight"), padded_vocab)
    else:
        hf.pop("lm_head.weight", None)  # a tied export may store the shared matrix twice (tie_distinct_head: equal)
    if hf:
        raise ConversionError(f"the Hugging Face weights hold tensors config.json does not explain: {sorted(hf)[:5]}")
    return ours


# ----------------------------------------------------------------------------- files

def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2^20; units as Hugging Face's --max-shard-size."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size {size!r}: use a number of bytes or a number with KB/MB/GB/KiB/MiB/GiB")
    number, unit = int(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return number * scale


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_hf_weights(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write model.safetensors, or model-0000k-of-0000n.safetensors + index above max_shard_size."""
    folder = Path(folder)
    # One fresh contiguous copy per tensor: safetensors refuses views that share storage.
    copies = {name: torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format).copy_(t)
              for name, t in tensors.items()}
    shards = _shard(copies, parse_size(max_shard_size))
    if len(shards) == 1:
        _save_safetensors(shards[0], folder / SAFETENSORS_SINGLE)
        return [SAFETENSORS_SINGLE]
    file_names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(file_names, shards):
        _save_safetensors(shard, folder / file_name)
        weight_map.update({name: file_name for name in shard})
    total_size = sum(t.numel() * t.element_size() for t in copies.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return file_names + [SAFETENSORS_INDEX]


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, its write failures (disk full, quota) raised as OSError like every other write's."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as error:
        raise OSError(f"{path}: {error}") from None


def load_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder's model.safetensors or sharded safetensors (local disk only)."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).exists():
        weight_map = _read_json_file(folder / SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{folder / SAFETENSORS_INDEX} has no \"weight_map\" object; fix or replace it")
        files = sorted(set(weight_map.values()))
    elif (folder / SAFETENSORS_SINGLE).exists():
        files = [SAFETENSORS_SINGLE]
    else:
        present = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
        raise ConversionError(f"{folder} holds neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} (found: "
                              f"{present}); save the model with save_pretrained(..., safe_serialization=True)")
    tensors = {}
    for file_name in files:
        path = folder / file_name
        if not path.is_file():
            raise ConversionError(f"{path} is missing; {SAFETENSORS_INDEX} names it")
        try:
            with safe_open(path, framework="pt") as shard:
                tensors.update({name: shard.get_tensor(name) for name in shard.keys()})
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise ConversionError(f"{path} is not a readable safetensors file ({error}); it is probably cut short "
                                  f"or damaged: copy or download it again") from None
    return tensors


def _read_json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); fix or replace the file") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} should hold a JSON object; fix or replace the file")
    return value


def read_hf_config(folder: str | os.PathLike, make_vocab_size_divisible_by: int = 128) -> tuple[ModelConfig, dict]:
    """(ModelConfig, the Hugging Face config dict) of a local Hugging Face Llama folder; reads no weights."""
    config_path = Path(folder) / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path} not found; --load must be a Hugging Face model folder")
    hf_config = _read_json_file(config_path)
    return model_config_from_hf(hf_config, str(config_path), make_vocab_size_divisible_by), hf_config


def untie_distinct_head(config: ModelConfig, hf: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """`config` untied when it says tie_word_embeddings but the weights hold an lm_head.weight that differs from
    model.embed_tokens.weight (a UserWarning says so), as transformers then keeps the head; else `config`."""
    head, embedding = hf.get("lm_head.weight"), hf.get("model.embed_tokens.weight")
    if config.untie_embeddings_and_output_weights or head is None or embedding is None:
        return config
    if head.shape == embedding.shape and torch.equal(head.to(embedding.dtype), embedding):
        return config
    warnings.warn(f"{source}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                  f"converting untied with both kept, as transformers loads it (set tie_word_embeddings to false to "
                  f"say so)")
    return dataclasses.replace(config, untie_embeddings_and_output_weights=True)


def load_hf_checkpoint(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       make_vocab_size_divisible_by: int = 128) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(ModelConfig, our state dict, the Hugging Face config dict) of a local Hugging Face Llama folder; a tied
    config whose weights hold a distinct output head converts untied (untie_distinct_head)."""
    config, hf_config = read_hf_config(folder, make_vocab_size_divisible_by)
    hf_tensors = load_hf_weights(folder)
    config = untie_distinct_head(config, hf_tensors, str(Path(folder) / "config.json"))
    state_dict = from_hf_state_dict(config, hf_tensors, dtype)
    return config, state_dict, hf_config


def save_hf_checkpoint(folder: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                       dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                       tokenizer=None, chat_template: str = DEFAULT_CHAT_TEMPLATE) -> None:
    """Write a folder LlamaForCausalLM.from_pretrained loads: config.json, generation_config.json, weights,
    and the tokenizer files when `tokenizer` (megatron_llama.data.tokenizer.Tokenizer) is given, their
    tokenizer_config.json carrying the named chat template (data/chat_template.py) for apply_chat_template.

    dtype None keeps the checkpoint's dtype. Written into a new temporary folder beside it (a hidden name chosen
    here, removed on failure) renamed at the end, so `folder` never holds half an export; it must not exist yet or
    be empty. Weights holding NaN/Inf are refused (check_finite). A failed write (a full disk) raises OSError and
    leaves nothing behind.
    """
    check_exportable(config)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConversionError(f"--save {folder} already holds files; choose a new folder or delete it first")
    dtype = dtype or _require(state_dict, "embedding.weight").dtype
    if dtype not in _DTYPE_NAMES:
        raise ConversionError(f"cannot export weights as {dtype}; use one of {', '.join(_DTYPE_NAMES.values())}")
    check_finite(state_dict)
    hf_tensors = to_hf_state_dict(config, state_dict)
    token_ids = {}
    if tokenizer is not None:
        token_ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod, "pad_token_id": tokenizer.pad}
    with complete_or_absent(folder) as partial:
        save_hf_weights(partial, hf_tensors, dtype, max_shard_size)
        _write_json(partial / "config.json", hf_config_dict(config, dtype, **token_ids))
        generation = {key: value for key, value in token_ids.items() if value is not None}
        _write_json(partial / "generation_config.json", {"_from_model_config": True, **generation})
        if tokenizer is not None:
            tokenizer.save_hf_files(str(partial))
            tokenizer_config = json.loads((partial / "tokenizer_config.json").read_text())
            tokenizer_config["chat_template"] = get_chat_template(chat_template).jinja()
            _write_json(partial / "tokenizer_config.json", tokenizer_config)


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """ConversionError naming the first weight that holds NaN/Inf (a checkpoint saved after training diverged)."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(f"weight {name} holds {count} NaN/Inf values: the checkpoint diverged; export an "
                                  f"earlier iteration (--ckpt-step N)")


@contextlib.contextmanager
def complete_or_absent(folder: str | os.PathLike):
    """Yields a new, empty folder beside `folder` (a hidden name chosen here, never one that exists: a user's files
    are never touched) to write into; renamed to `folder` (absent or empty) when the block completes, removed when
    it raises, so `folder` never holds half an output."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            partial.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield partial
        if folder.exists():
            folder.rmdir()
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours alone: created above under a name nobody else uses
        raise


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
