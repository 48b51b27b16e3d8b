"""Tokenize SFT jsonl records once, with their loss masks, into indexed files the trainer reads at any size.

    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --chat-template openllama --workers 16
    python -m megatron_llama.pretrain --sft --train-data-path data/sft --chat-template openllama ...

writes data/sft.bin/.idx (token ids) and data/sft_loss_mask.bin/.idx (uint8 loss masks, the same layout): one
document per record, rendered with the chat template (megatron_llama/data/sft_records.py), its sequences cut after
each assistant turn, so the trainer can cut a record that is longer than its --seq-length at a turn boundary without
the jsonl. Records are stored whole; truncation and packing happen in the trainer (data/sft_dataset.py), so one set
of files serves every --seq-length. Give the trainer the same --chat-template (the files hold rendered tokens).
`data/sft.tokenizer.json` records the tokenizer (data/dataset_tokenizer.py): the trainer refuses to read the files
with another one.

The main process reads the lines in order, worker processes (--workers) parse, render and tokenize chunks of them,
and the main process writes the results in input order. A bad record stops the run with an error naming the file
and line, and no output is left (files are written under temporary names and renamed when complete); so does a
failed write (disk full, no permission), with one line naming the file and the system's reason.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_llama.data.chat_template import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE, get_chat_template  # noqa: E402
from megatron_llama.data.corpus import iter_raw_lines  # noqa: E402
from megatron_llama.data.dataset_tokenizer import write_tokenizer_record  # noqa: E402
from megatron_llama.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, index_file_path  # noqa: E402
from megatron_llama.data.output_files import OutputWriteError, remove_outputs, writing  # noqa: E402
from megatron_llama.data.sft_dataset import LOSS_MASK_SUFFIX  # noqa: E402
from megatron_llama.data.sft_records import SFTDataError, encode_conversation, parse_record  # noqa: E402
from megatron_llama.data.tokenizer import TOKENIZER_TYPES, build_tokenizer, tokenizer_hash  # noqa: E402

CHUNK_LINES = 256
_worker: dict = {}  # the tokenizer and template of a worker process


def _start_worker(tokenizer_type: str, tokenizer_model: str, chat_template: str) -> None:
    _worker.update(tokenizer=build_tokenizer(tokenizer_type, tokenizer_model), template=get_chat_template(chat_template))


def _encode_chunk(chunk: list[tuple[str, int, bytes]]) -> list:
    """Per line: (ids, mask, turn lengths), or the SFTDataError's message for a bad record."""
    encoded = []
    for path, line_number, raw_line in chunk:
        where = f"{path} line {line_number}"
        try:
            record = encode_conversation(parse_record(raw_line, where), _worker["template"], _worker["tokenizer"], where)
        except SFTDataError as error:
            encoded.append(str(error))
            continue
        encoded.append((record.ids, record.loss_mask, np.diff(record.turn_ends, prepend=0)))
    return encoded


def _chunks(paths: list[str]):
    lines = ((path, number, raw) for path in paths for number, raw in iter_raw_lines(path) if raw.strip())
    while chunk := list(itertools.islice(lines, CHUNK_LINES)):
        yield chunk


def preprocess(paths: list[str], output_prefix: str, tokenizer_type: str, tokenizer_model: str,
               chat_template: str = DEFAULT_CHAT_TEMPLATE, workers: int = 1) -> int:
    """Write the token and mask files of every record of `paths` (in order); returns the number of records.
    SFTDataError (naming file and line) on the first bad record, OutputWriteError when a write fails; either leaves
    no output."""
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    builders = []
    try:
        return _write(paths, output_prefix, tokenizer, (tokenizer_type, tokenizer_model, chat_template), workers,
                      builders)
    except BaseException:  # a bad record, a failed write, Ctrl-C: nothing of the run is left
        remove_outputs(builders, [output_prefix, output_prefix + LOSS_MASK_SUFFIX])
        raise


def _write(paths: list[str], output_prefix: str, tokenizer, arguments: tuple, workers: int,
           builders: list[IndexedDatasetBuilder]) -> int:
    """preprocess's writing; the builders it opens are added to `builders`."""
    tokenizer_type, tokenizer_model, _ = arguments
    with writing(output_prefix + ".bin"):
        os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
        builders.append(IndexedDatasetBuilder(output_prefix + ".bin", best_dtype(tokenizer.vocab_size)))
    with writing(output_prefix + LOSS_MASK_SUFFIX + ".bin"):
        builders.append(IndexedDatasetBuilder(output_prefix + LOSS_MASK_SUFFIX + ".bin", np.uint8))
    tokens, masks = builders
    count = 0
    if workers > 1:
        pool = multiprocessing.Pool(workers, _start_worker, arguments)
        results = pool.imap(_encode_chunk, _chunks(paths), chunksize=1)
    else:
        pool = None
        _start_worker(*arguments)
        results = map(_encode_chunk, _chunks(paths))
    try:
        for result in itertools.chain.from_iterable(results):
            if isinstance(result, str):
                raise SFTDataError(result)
            ids, mask, lengths = result
            with writing(tokens.bin_path):
                tokens.add_document(ids, lengths.tolist())
            with writing(masks.bin_path):
                masks.add_document(mask, lengths.tolist())
            count += 1
    finally:
        if pool is not None:
            pool.terminate()
    if count == 0:
        raise SFTDataError(f"{', '.join(paths)} hold no records; give jsonl files with one record per line")
    with writing(f"{output_prefix}.bin/.idx"):
        write_tokenizer_record(output_prefix, tokenizer_type, tokenizer_model, tokenizer_hash(tokenizer))
    with writing(f"{output_prefix}{LOSS_MASK_SUFFIX}.bin/.idx"):
        masks.finalize(index_file_path(output_prefix + LOSS_MASK_SUFFIX))
    with writing(f"{output_prefix}.bin/.idx"):
        tokens.finalize(index_file_path(output_prefix))
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl files of SFT records, read in this order")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx and PREFIX_loss_mask.bin/.idx")
    parser.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, required=True)
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--chat-template", choices=tuple(CHAT_TEMPLATES), default=DEFAULT_CHAT_TEMPLATE)
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        count = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                           args.chat_template, max(args.workers, 1))
    except (SFTDataError, OutputWriteError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{count:,} records -> {args.output_prefix}.bin/.idx and {args.output_prefix}{LOSS_MASK_SUFFIX}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
