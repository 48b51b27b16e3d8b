"""Export a megatron_llama checkpoint to the Hugging Face Llama format.

    python tools/convert_to_hf.py --load checkpoints/run1 --save hf/run1 \
        [--ckpt-step 2000] [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB] \
        [--tokenizer-type HuggingFaceTokenizer --tokenizer-model tok/] [--chat-template openllama|llama2|chatml]

Reads any tensor/pipeline layout (merged by checkpoint.read_model_checkpoint); default iteration:
the latest. Writes config.json, generation_config.json, model.safetensors (or shards plus
model.safetensors.index.json above --max-shard-size) and the tokenizer files of the tokenizer the
checkpoint was trained with (or the one given here), with the chat template (default openllama) that
tokenizer.apply_chat_template renders. The folder loads with
transformers.LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained. Models with
Open-Llama's stable embedding are refused: Hugging Face Llama has no LayerNorm after the embedding. So are
weights holding NaN/Inf (a diverged checkpoint), files that fail their checksum, and a tokenizer whose files
differ from the ones the checkpoint was trained with (its recorded sha256). A write that fails (a full disk) leaves
no partial folder. Errors are one line, exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_llama.checkpoint import CheckpointError, read_model_checkpoint
from megatron_llama.config import DataConfig
from megatron_llama.data.chat_template import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE
from megatron_llama.data.tokenizer import TokenizerError, build_tokenizer, tokenizer_hash
from megatron_llama.hf_conversion import DEFAULT_MAX_SHARD_SIZE, ConversionError, check_exportable, save_hf_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint directory (the trainer's --save)")
    parser.add_argument("--ckpt-step", "--iteration", dest="iteration", type=int, default=None,
                        help="iteration to export (default: the published one)")
    parser.add_argument("--save", required=True, help="new folder for the Hugging Face model")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="weight dtype of the export (auto: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors file, e.g. 5GB or 500MiB; larger models are sharded with an index")
    parser.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                        help="overrides the tokenizer recorded in the checkpoint's configuration")
    parser.add_argument("--tokenizer-model", help="tokenizer file or folder (with --tokenizer-type)")
    parser.add_argument("--chat-template", choices=list(CHAT_TEMPLATES), default=DEFAULT_CHAT_TEMPLATE,
                        help="the conversation format written as the tokenizer's chat_template")
    return parser.parse_args(argv)


def load_tokenizer(args: argparse.Namespace, recorded: DataConfig, vocab_size: int):
    """The tokenizer named on the command line, else the one the checkpoint's configuration records, else None."""
    tokenizer_type = args.tokenizer_type or recorded.tokenizer_type
    tokenizer_model = args.tokenizer_model or recorded.tokenizer_model
    if tokenizer_type is None or tokenizer_model is None:
        print("convert_to_hf: the checkpoint names no tokenizer; exporting the model without tokenizer files "
              "(give --tokenizer-type and --tokenizer-model to include them)")
        return None
    if not os.path.exists(tokenizer_model):
        raise TokenizerError(f"the checkpoint was trained with tokenizer {tokenizer_model}, which does not exist "
                             "here; pass its current location with --tokenizer-type and --tokenizer-model")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    if recorded.tokenizer_hash is not None and tokenizer_hash(tokenizer) != recorded.tokenizer_hash:
        problem = (f"tokenizer {tokenizer_model} is not the one the checkpoint was trained with "
                   f"({recorded.tokenizer_model}, sha256 {recorded.tokenizer_hash[:12]}): its ids may mean other "
                   f"pieces")
        if args.tokenizer_model is None:  # the recorded file changed since training
            raise TokenizerError(f"{problem}; pass the tokenizer the model was trained with (--tokenizer-type and "
                                 f"--tokenizer-model)")
        print(f"convert_to_hf: WARNING: {problem}; exporting it as you asked")
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer_model} has {tokenizer.vocab_size} entries but the model's "
                             f"vocabulary only {vocab_size}; give the tokenizer the model was trained with")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config, state_dict, run_config = read_model_checkpoint(args.load, args.iteration)
        check_exportable(config)  # before the tokenizer is loaded: fail fast and say why
        tokenizer = load_tokenizer(args, run_config.data, config.vocab_size)
        dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
        try:
            save_hf_checkpoint(args.save, config, state_dict, dtype=dtype, max_shard_size=args.max_shard_size,
                               tokenizer=tokenizer, chat_template=args.chat_template)
        except OSError as error:
            raise ConversionError(f"could not write --save {args.save} ({error}); nothing was left there: free disk "
                                  f"space or choose another folder") from None
    except (CheckpointError, ConversionError, TokenizerError) as error:
        sys.exit(f"convert_to_hf: error: {error}")
    print(f"convert_to_hf: wrote {args.save} ({config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size})")


if __name__ == "__main__":
    main()
