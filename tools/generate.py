"""Generate completions with a megatron_llama checkpoint or a Hugging Face Llama folder (KV cache, batched).

    python tools/generate.py --load checkpoints/run1 --prompt "The capital of France is" --max-new-tokens 32
    python tools/generate.py --hf hf/run1 --input-file prompts.jsonl --output-file out.jsonl \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1234
    torchrun --nproc_per_node 2 tools/generate.py --tensor-model-parallel-size 2 --load checkpoints/run1 ...

--load reads our checkpoint at whatever tensor/pipeline layout it was saved and re-splits it to this run's
--tensor-model-parallel-size (pipeline-parallel generation is not supported); the tokenizer is the one the
checkpoint records unless --tokenizer-type/--tokenizer-model name another. Prompts are tokenized as the exported
Hugging Face tokenizer tokenizes them (BOS first), so greedy completions (--temperature 0, the default) equal
transformers' generate(do_sample=False) on the export. prompts.jsonl holds one record per line, {"prompt": text}
or {"messages": [{"role", "content"}, ...]} (rendered by --chat-template); out.jsonl gets the records with
"completion" (and "finish_reason", token counts) added. Without --output-file completions go to stdout.
A checkpoint whose files fail their checksums or hold NaN/Inf is refused: one line naming the tensor and the
newest intact earlier iteration (--iteration N), exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_llama.checkpoint import CheckpointError
from megatron_llama.data.chat_template import ChatTemplateError, get_chat_template
from megatron_llama.data.tokenizer import TokenizerError
from megatron_llama.hf_conversion import ConversionError
from megatron_llama.inference.generator import encode_prompt
from megatron_llama.inference.launch import add_model_arguments, start_generator, stop_process_groups
from megatron_llama.inference.sampling import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    prompts = parser.add_argument_group("prompts and output")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    prompts.add_argument("--input-file", help='jsonl of {"prompt": text} or {"messages": [...]} records')
    prompts.add_argument("--output-file", help="jsonl to write the records with their completions to")
    prompts.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=64)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    sampling.add_argument("--top-k", type=int, default=0, help="0: no cut")
    sampling.add_argument("--top-p", type=float, default=1.0, help="1.0: no cut")
    sampling.add_argument("--seed", type=int, default=1234)
    sampling.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    args = parser.parse_args(argv)
    if bool(args.prompt) == bool(args.input_file):
        parser.error("give prompts with --prompt (repeatable) or --input-file, not both")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def read_records(path: str) -> list[dict]:
    """The records of a prompts jsonl file; ValueError naming the file and line of a bad one."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str) or "messages" in record):
                raise ValueError(f'{path} line {number}: a record needs a string "prompt" or a "messages" list')
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records; write one JSON object per line")
    return records


def prompt_ids(record: dict, tokenizer, chat_template, where: str) -> list[int]:
    if "messages" not in record:
        return encode_prompt(tokenizer, record["prompt"])
    try:
        return chat_template.encode(record["messages"], tokenizer)
    except ChatTemplateError as error:
        raise ValueError(f"{where}: {error}") from None


def write_jsonl(path: str, records: list[dict]) -> None:
    """All records at once, through a temporary file renamed at the end (a reader never sees half a file)."""
    temporary = f"{path}.partial"
    with open(temporary, "w", encoding="utf-8") as output:
        for record in records:
            output.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        records = read_records(args.input_file) if args.input_file else [{"prompt": text} for text in args.prompt]
        generator, _ = start_generator(args)
        template = get_chat_template(args.chat_template)
        where = args.input_file or "--prompt"
        prompts = [prompt_ids(record, generator.tokenizer, template, f"{where} record {number}")
                   for number, record in enumerate(records, start=1)]
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        stop = args.stop + list(template.stop if any("messages" in record for record in records) else ())
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first:first + args.batch_size]
            completions = generator.generate(batch, args.max_new_tokens, sampling, stop)
            for record, completion in zip(records[first:first + args.batch_size], completions):
                record.update(completion=completion.text, finish_reason=completion.finish_reason,
                              prompt_tokens=completion.prompt_tokens, completion_tokens=len(completion.tokens))
    except (CheckpointError, ConversionError, TokenizerError, ValueError, OSError) as error:
        sys.exit(f"generate: error: {error}")
    if generator.model.layout.tensor_rank == 0:
        if args.output_file:
            write_jsonl(args.output_file, records)
            print(f"generate: wrote {len(records)} completions to {args.output_file}")
        else:
            for record in records:
                print(json.dumps(record, ensure_ascii=False))
    stop_process_groups()


if __name__ == "__main__":
    main()
