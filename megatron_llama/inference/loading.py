"""A model and tokenizer for inference: from our checkpoint (whatever tensor/pipeline layout it was saved at,
re-split to this run's tensor-parallel size) or from a Hugging Face Llama folder on local disk.

    model, tokenizer = load_for_inference(ModelSource(load="checkpoints/run1"), device="cpu", dtype=torch.float32)
    model, tokenizer = load_for_inference(ModelSource(hf="hf/run1"), device="cuda", dtype=torch.bfloat16)

The model is rebuilt from the checkpoint's config.json (or the Hugging Face config.json), never from trainer
flags. The tokenizer is the one the checkpoint records (the Hugging Face folder's tokenizer.json), unless
ModelSource names another. Tensor parallelism comes from the installed parallel layout (parallel.state);
pipeline parallelism is refused: generation runs the whole model on every tensor rank.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from megatron_llama.checkpoint import read_model_checkpoint, split_state_dict
from megatron_llama.config import ModelConfig
from megatron_llama.data.tokenizer import TokenizerError, build_tokenizer
from megatron_llama.hf_conversion import load_hf_checkpoint
from megatron_llama.model.llama import LlamaModel
from megatron_llama.parallel import state


@dataclass(frozen=True)
class ModelSource:
    load: str | None = None
    """Our checkpoint directory (the trainer's --save)."""
    hf: str | None = None
    """A Hugging Face Llama folder (config.json, safetensors, tokenizer.json)."""
    iteration: int | None = None
    """The checkpoint's iteration to load (None: the latest)."""
    tokenizer_type: str | None = None
    """SentencePieceTokenizer or HuggingFaceTokenizer; None: the recorded one."""
    tokenizer_model: str | None = None
    """The tokenizer's file or folder; None: the recorded one."""

    @property
    def name(self) -> str:
        """The model's name in the API: its folder's name."""
        return os.path.basename(os.path.normpath(self.load or self.hf))


def load_for_inference(source: ModelSource, *, device: torch.device | str, dtype: torch.dtype):
    """(LlamaModel in eval mode holding this tensor rank's weights on `device` in `dtype`, tokenizer)."""
    if (source.load is None) == (source.hf is None):
        raise ValueError("give exactly one of --load (our checkpoint) and --hf (a Hugging Face folder)")
    layout = state.current_layout()
    if layout.pipeline_size > 1 or layout.data_size > 1:
        raise ValueError(f"generation runs the whole model on each tensor rank: launch exactly "
                         f"--tensor-model-parallel-size processes (this run has {layout.world_size} processes for "
                         f"tensor-parallel size {layout.tensor_size}); pipeline-parallel inference is not supported")
    if source.load is not None:
        config, full_state, run_config = read_model_checkpoint(source.load, source.iteration)
        recorded = (run_config.data.tokenizer_type, run_config.data.tokenizer_model)
    else:
        config, full_state, _ = load_hf_checkpoint(source.hf)
        has_tokenizer = os.path.isfile(os.path.join(source.hf, "tokenizer.json"))
        recorded = ("HuggingFaceTokenizer", source.hf) if has_tokenizer else (None, None)
    # The KV-cache path does its own attention; sdpa keeps a checkpoint trained with another backend loadable here.
    config = dataclasses.replace(config, attention_backend="sdpa")
    try:
        config.check(layout.tensor_size)
    except ValueError as error:
        raise ValueError(f"this model cannot be split over {layout.tensor_size} tensor ranks: {error}") from None
    shard = split_state_dict(config, full_state, layout.tensor_size, 1)[(layout.tensor_rank, 0)]
    with torch.device("meta"):
        model = LlamaModel(config)
    model.load_state_dict(shard, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = _tokenizer(source, recorded, config)
    return model, tokenizer


def _tokenizer(source: ModelSource, recorded: tuple[str | None, str | None], config: ModelConfig):
    tokenizer_type = source.tokenizer_type or recorded[0]
    tokenizer_model = source.tokenizer_model or recorded[1]
    if tokenizer_type is None or tokenizer_model is None:
        raise TokenizerError("the model records no tokenizer; pass --tokenizer-type and --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        raise TokenizerError(f"the model's tokenizer {tokenizer_model} does not exist here; pass its current location "
                             "with --tokenizer-type and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer_model} has {tokenizer.vocab_size} entries but the model's "
                             f"vocabulary only {config.vocab_size}; give the tokenizer the model was trained with")
    return tokenizer
