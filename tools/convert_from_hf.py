"""Import a Hugging Face Llama model (local folder) as a megatron_llama checkpoint, to continue pretraining it.

    python tools/convert_from_hf.py --load path/to/hf_llama --save checkpoints/from_hf \
        [--target-tensor-parallel-size 2] [--target-pipeline-parallel-size 2] \
        [--make-vocab-size-divisible-by 128]

Reads config.json and model.safetensors (or its shards and index) from local disk; nothing is
downloaded. The target tensor-parallel size must divide the attention heads, key/value heads and
intermediate size (checked before any weight is read). Writes a model-only checkpoint (iteration 0,
fp32 weights, the vocabulary zero-padded to the tensor-parallel multiple) that
`python -m megatron_llama.pretrain --load checkpoints/from_hf` starts from with a fresh optimizer
(launched with the same --tensor-model-parallel-size). When the folder holds a tokenizer.json, the checkpoint's args
name it (HuggingFaceTokenizer), so a later convert_to_hf.py export carries it along. A config.json that says
tie_word_embeddings while its weights hold a different lm_head.weight converts untied, keeping the head (a warning
and the last line say so), as transformers loads it.

The checkpoint is written into a hidden folder beside --save and renamed to it when complete, so a failed write (a
full disk) leaves nothing at --save and no partial files: one line names --save and the OSError, exit status 1.
--save must be a new or empty directory.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_llama.checkpoint import CheckpointError, tracker_path, write_model_checkpoint
from megatron_llama.config import DataConfig, RunConfig
from megatron_llama.hf_conversion import ConversionError, complete_or_absent, load_hf_checkpoint, read_hf_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="local Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--save", required=True, help="checkpoint directory to create (the trainer's --load)")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="the vocabulary is padded to a multiple of this times the tensor-parallel size")
    return parser.parse_args(argv)


def write_failure(error: BaseException) -> OSError | None:
    """The OSError behind a failed write: `error` itself, or the one torch.save's zip writer was handling when it
    raised its own RuntimeError on closing; None when there is none (a bug, not the disk)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if os.path.exists(tracker_path(args.save)):
            raise CheckpointError(f"--save {args.save} already holds a checkpoint ({tracker_path(args.save)}); "
                                  "choose a new directory")
        if os.path.isdir(args.save) and os.listdir(args.save):
            raise ConversionError(f"--save {args.save} already holds files; choose a new or empty directory")
        config, _ = read_hf_config(args.load, args.make_vocab_size_divisible_by)
        try:
            config.check(args.target_tensor_parallel_size, "--target-tensor-parallel-size")
        except ValueError as error:
            raise ConversionError(f"{args.load}: {error}") from None
        config, state_dict, _ = load_hf_checkpoint(args.load,
                                                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        data = DataConfig()
        if os.path.isfile(os.path.join(args.load, "tokenizer.json")):
            data = DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=os.path.abspath(args.load))
        try:
            with complete_or_absent(args.save) as partial:
                write_model_checkpoint(str(partial), 0, config, state_dict, RunConfig(data=data),
                                       tensor_parallel_size=args.target_tensor_parallel_size,
                                       pipeline_parallel_size=args.target_pipeline_parallel_size)
        except (OSError, RuntimeError) as error:
            failed_write = write_failure(error)
            if failed_write is None:
                raise
            raise ConversionError(f"could not write --save {args.save} ({failed_write}); nothing was left there: "
                                  f"free disk space or choose another directory") from None
    except (CheckpointError, ConversionError) as error:
        sys.exit(f"convert_from_hf: error: {error}")
    print(f"convert_from_hf: wrote {args.save} (iteration 0, tp {args.target_tensor_parallel_size}, "
          f"pp {args.target_pipeline_parallel_size}, {config.num_layers} layers, vocab {config.vocab_size}, "
          f"{'untied' if config.untie_embeddings_and_output_weights else 'tied'} output head)")


if __name__ == "__main__":
    main()
