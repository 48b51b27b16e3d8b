"""Train a SentencePiece tokenizer (BPE by default) on a Chinese + English corpus.

    python tools/train_tokenizer.py --input data/shards/ 'more/*.jsonl.zst' notes.txt --json-keys text \
        --vocab-size 32000 --model-prefix out/tokenizer --max-sentences 5000000 --seed 1234

writes out/tokenizer.model and out/tokenizer.vocab. Inputs are files, globs or directories of .jsonl /
.json / .jsonl.zst / .zst (the --json-keys values of each line) and .txt / .txt.zst (each line). Every text
is split into its lines; SentencePiece trains on at most --max-sentences of them, drawn by reservoir sampling
(Vitter's algorithm R) with --seed, so memory stays bounded by the sample, not the corpus, and the same
inputs and seed always give the same .model bytes. A bad line (not UTF-8, malformed JSON, a missing or
non-string key, a lone surrogate escape) stops the run naming file and line, or with --skip-bad-lines is
skipped and counted; a damaged .zst input (cut short, or not zstd data) always stops it.

Defaults follow the Llama tokenizer: byte fallback (no unknown tokens: a character outside the vocabulary
becomes its UTF-8 bytes), digits split, no normalisation and no whitespace folding (decoding gives the text
back exactly), ids unk 0, bos 1, eos 2 and no pad piece. Character coverage 0.9995 keeps the common
Chinese characters as pieces of their own.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import sys
import time
from collections import Counter
from itertools import accumulate

import sentencepiece

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_llama.data.corpus import (  # noqa: E402
    BAD_LINE_KINDS,
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    BadLineError,
    CorpusInputError,
    DamagedFileError,
    expand_inputs,
    iter_texts,
)

SPECIAL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256
MIN_CHARACTER_COVERAGE = 0.98


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="files, globs or directories of .jsonl/.json/.zst/.txt")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text is used from each JSON line")
    group.add_argument("--max-sentences", type=int, default=10_000_000, help="cap on the lines sampled for training (they are held in memory)")
    group.add_argument("--seed", type=int, default=1234, help="seed of the sentence sample and of SentencePiece")
    group.add_argument("--skip-bad-lines", action="store_true", help="skip and count unreadable lines instead of stopping")
    group = parser.add_argument_group("model")
    group.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    group.add_argument("--vocab-size", type=int, default=32000)
    group.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    group.add_argument("--character-coverage", type=float, default=0.9995, help="share of characters kept as pieces")
    group.add_argument("--user-defined-symbols", nargs="*", default=[], help="pieces never split, e.g. <|im_start|>")
    group.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines (bytes) are left out of training")
    group.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    if args.vocab_size < SPECIAL_PIECES + BYTE_PIECES + len(args.user_defined_symbols) + 1:
        parser.error(
            f"--vocab-size {args.vocab_size} is too small: {SPECIAL_PIECES} special, {BYTE_PIECES} byte-fallback and "
            f"{len(args.user_defined_symbols)} user-defined pieces come first; use at least "
            f"{SPECIAL_PIECES + BYTE_PIECES + len(args.user_defined_symbols) + 1}"
        )
    if args.max_sentences < 1:
        parser.error(f"--max-sentences must be positive, got {args.max_sentences}")
    if not MIN_CHARACTER_COVERAGE <= args.character_coverage <= 1.0:
        parser.error(f"--character-coverage must lie in [{MIN_CHARACTER_COVERAGE}, 1] (SentencePiece's range), got {args.character_coverage}")
    try:
        args.input_files = expand_inputs(args.input, JSON_SUFFIXES + TEXT_SUFFIXES)
    except CorpusInputError as error:
        parser.error(str(error))
    model_folder = os.path.dirname(os.path.abspath(args.model_prefix))
    if not os.path.isdir(model_folder):
        parser.error(f"--model-prefix {args.model_prefix}: folder {model_folder} does not exist")
    return args


def sample_sentences(texts, max_sentences: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of at most `max_sentences` non-blank lines of `texts`, in corpus order, and the line count."""
    generator = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(reservoir) < max_sentences:
                reservoir.append((seen, line))
            else:
                slot = generator.randrange(seen + 1)
                if slot < max_sentences:
                    reservoir[slot] = (seen, line)
            seen += 1
    reservoir.sort()
    return [line for _, line in reservoir], seen


def cumulative_character_counts(sentences: list[str]) -> list[int]:
    """Running totals of the character counts, from the most to the least frequent character."""
    counts = Counter()
    for sentence in sentences:
        counts.update(sentence.replace(" ", "▁"))
    return list(accumulate(count for _, count in counts.most_common()))


def vocabulary_advice(sentences: list[str], args: argparse.Namespace, reserved_pieces: int) -> str:
    """What to change when the characters for --character-coverage do not fit in --vocab-size."""
    cumulative = cumulative_character_counts(sentences)
    total = cumulative[-1]

    def pieces_for(coverage: float) -> int:
        return reserved_pieces + next(i + 1 for i, covered in enumerate(cumulative) if covered / total >= coverage)

    room = args.vocab_size - reserved_pieces
    fitting_coverage = cumulative[min(room, len(cumulative)) - 1] / total if room > 0 else 0.0
    fitting_coverage = math.floor(fitting_coverage * 1e4) / 1e4  # printed with 4 decimals: never round up
    advice = (
        f"The sample has {len(cumulative):,} distinct characters: raise --vocab-size well above "
        f"{pieces_for(args.character_coverage):,}"
    )
    if fitting_coverage >= MIN_CHARACTER_COVERAGE:
        return advice + f", or lower --character-coverage to {fitting_coverage:.4f} (rarer characters then fall back to bytes)"
    return advice + f" (or above {pieces_for(MIN_CHARACTER_COVERAGE):,} with --character-coverage {MIN_CHARACTER_COVERAGE})"


def train(args: argparse.Namespace, sentences: list[str]) -> bytes:
    sentencepiece.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=args.user_defined_symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=args.max_sentence_length,
        num_threads=args.num_threads,
        minloglevel=1,
    )
    return model.getvalue()


def write_outputs(model_bytes: bytes, prefix: str) -> None:
    """PREFIX.model (written to a temporary name, then renamed) and PREFIX.vocab (piece, score per line)."""
    temporary = prefix + ".model.tmp"
    with open(temporary, "wb") as output:
        output.write(model_bytes)
    os.replace(temporary, prefix + ".model")
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    with open(prefix + ".vocab", "w", encoding="utf-8") as vocab:
        for piece_id in range(processor.get_piece_size()):
            vocab.write(f"{processor.id_to_piece(piece_id)}\t{processor.get_score(piece_id)}\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    bad_line_counts: dict[str, int] = {}
    texts = iter_texts(args.input_files, args.json_keys, args.skip_bad_lines, bad_line_counts)
    try:
        sentences, total_lines = sample_sentences(texts, args.max_sentences, args.seed)
    except BadLineError as error:
        print(f"error: {error}\n(use --skip-bad-lines to skip and count such lines)", file=sys.stderr)
        return 1
    except DamagedFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not sentences:
        print(f"error: no text found in {len(args.input_files)} input files under keys {args.json_keys}", file=sys.stderr)
        return 1
    print(
        f"sampled {len(sentences):,} of {total_lines:,} lines from {len(args.input_files)} files "
        f"in {time.time() - started:.1f}s",
        file=sys.stderr,
    )
    for kind, count in sorted(bad_line_counts.items()):
        print(f"skipped {count:,} lines: {BAD_LINE_KINDS[kind]}", file=sys.stderr)

    try:
        model_bytes = train(args, sentences)
    except RuntimeError as error:
        if "Vocabulary size is smaller than required_chars" not in str(error):
            raise
        reserved = SPECIAL_PIECES + BYTE_PIECES + len(args.user_defined_symbols)
        print(
            f"error: --character-coverage {args.character_coverage} needs more single-character pieces than "
            f"--vocab-size {args.vocab_size} holds (SentencePiece: {str(error).split('] ')[-1]}). "
            f"{vocabulary_advice(sentences, args, reserved)}",
            file=sys.stderr,
        )
        return 1
    write_outputs(model_bytes, args.model_prefix)
    print(f"wrote {args.model_prefix}.model ({args.vocab_size} pieces) in {time.time() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
