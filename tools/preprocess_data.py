"""Tokenize JSON-lines corpora into Megatron-compatible .bin/.idx token files.

    python tools/preprocess_data.py --input 'pile/*.jsonl.zst' --output-prefix data/pile \
        --json-keys text --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model \
        --append-eod --workers 16

writes data/pile_text_document.bin/.idx: one document per JSON line, the tokens of its "text" value
(followed by the end-of-document id with --append-eod), dtype uint16 below 65,500 tokens, else int32.
Several --json-keys give one output per key. To make one document of several fields (WuDao's title and
content), join them:

    --join-keys title content --join-separator '\\n'    ->  {prefix}_title_content_document.bin/.idx

(--join-name names that output instead; empty fields are left out of the join; with --join-keys, --json-keys
defaults to none). Inputs are files, globs or directories of .jsonl / .json / .jsonl.zst / .zst, read in
sorted order as a stream, so memory stays flat whatever their size. The main process reads lines in
chunks, worker processes (--workers) parse and tokenize them, and the main process writes the results in
input order (at most a few chunks per worker in flight).

Bad input: a line that is not UTF-8, malformed JSON, a record without a requested key, or whose value is not
a string or holds a lone surrogate escape ("\\ud800": valid JSON, not text) stops the run with an error naming
file and line, and no output file is left. With --skip-bad-lines such lines are skipped and counted by kind;
the summary prints the first locations. A damaged .zst input (cut short, or not zstd data) always stops the
run, naming the file and the line where the damage begins: it is not a bad line, and skipping it would lose
the rest of the file.
Empty documents are never written; they are counted. Files are written under temporary names and renamed
when complete (.bin, then .idx), so an interrupted run (Ctrl-C, kill -9) never leaves an .idx beside a
partial .bin. Before them, `{prefix}.tokenizer.json` records the tokenizer (data/dataset_tokenizer.py): the trainer
refuses to read the ids with another one. A failed write (disk full, no permission) stops the run with one line
naming the file and the system's reason, exit status 1, and removes every partial and temporary file.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_llama.data.corpus import (  # noqa: E402
    BAD_LINE_KINDS,
    BadLineError,
    CorpusInputError,
    DamagedFileError,
    expand_inputs,
    iter_raw_lines,
    parse_json_record,
    record_text,
)
from megatron_llama.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron_llama.data.dataset_tokenizer import write_tokenizer_record  # noqa: E402
from megatron_llama.data.output_files import OutputWriteError, remove_outputs, writing  # noqa: E402
from megatron_llama.data.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer, tokenizer_hash  # noqa: E402

LOCATIONS_SHOWN = 5
ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: stop, remove partial outputs."""


@dataclass(frozen=True)
class DocumentSpec:
    """Which outputs each line produces: one per json key, plus one joined document when join_keys is set."""

    json_keys: tuple[str, ...]
    join_keys: tuple[str, ...]
    join_separator: str
    join_name: str | None

    @property
    def output_names(self) -> list[str]:
        return list(self.json_keys) + ([self.join_name] if self.join_keys else [])

    def texts(self, record: dict) -> list[str]:
        texts = [record_text(record, key) for key in self.json_keys]
        if self.join_keys:
            fields = [record_text(record, key) for key in self.join_keys]
            texts.append(self.join_separator.join(text for text in fields if text))
        return texts


@dataclass
class ChunkResult:
    """What a worker made of one chunk: the documents of every output (None for an empty one), in line order."""

    documents: list[list[np.ndarray | None]]
    bad_lines: list[tuple[str, str, int, int]] = field(default_factory=list)  # (kind, detail, file index, line)
    blank_lines: int = 0
    input_bytes: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="files, globs or directories of .jsonl/.json/.jsonl.zst/.zst")
    group.add_argument("--json-keys", nargs="*", default=None, help="keys to tokenize, one output each (default: text)")
    group.add_argument("--join-keys", nargs="+", default=None, help="keys joined into one document per line, e.g. title content")
    group.add_argument("--join-separator", default="\n", help="text between joined fields; \\n and \\t are understood")
    group.add_argument("--join-name", default=None, help="output name of the joined document (default: the keys joined by _)")
    group.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad lines instead of stopping")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model, or tokenizer.json / its folder")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="outputs are {prefix}_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes (1: tokenize in the main process)")
    group.add_argument("--chunk-size", type=int, default=512, help="lines handed to a worker at a time")
    group.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    args = parser.parse_args(argv)

    if args.json_keys is None:
        args.json_keys = [] if args.join_keys else ["text"]
    for separator, character in ESCAPES.items():
        args.join_separator = args.join_separator.replace(separator, character)
    args.spec = DocumentSpec(
        tuple(args.json_keys),
        tuple(args.join_keys or ()),
        args.join_separator,
        args.join_name or "_".join(args.join_keys or ()),
    )
    names = args.spec.output_names
    if not names:
        parser.error("nothing to tokenize: give --json-keys and/or --join-keys")
    if len(set(names)) != len(names):
        parser.error(f"output names {names} repeat; give --join-name a name that is not one of --json-keys")
    for name in names:
        if not name or "/" in name or os.sep in name:
            parser.error(f"output name {name!r} cannot be part of a file name; rename it with --join-name")
    for flag in ("workers", "chunk_size", "log_interval"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:
        args.input_files = expand_inputs(args.input)
    except CorpusInputError as error:
        parser.error(str(error))
    try:
        args.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    except TokenizerError as error:
        parser.error(str(error))
    if os.path.isdir(args.output_prefix):
        parser.error(f"--output-prefix {args.output_prefix} is a directory; give a path prefix such as {args.output_prefix}/corpus")
    return args


def output_prefix(prefix: str, name: str) -> str:
    return f"{prefix}_{name}_document"


# ---- worker side -------------------------------------------------------------------------------------------

_worker: dict = {}


def init_worker(tokenizer_type: str, tokenizer_model: str, spec: DocumentSpec, append_eod: bool) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler: Pool.terminate must end workers
    set_up_tokenizing(build_tokenizer(tokenizer_type, tokenizer_model), spec, append_eod)


def set_up_tokenizing(tokenizer, spec: DocumentSpec, append_eod: bool) -> None:
    _worker.update(tokenizer=tokenizer, spec=spec, append_eod=append_eod, dtype=best_dtype(tokenizer.vocab_size))


def process_chunk(lines: list[tuple[int, int, bytes]]) -> ChunkResult:
    """Parse and tokenize (file index, line number, raw line) triples."""
    tokenizer, spec, dtype = _worker["tokenizer"], _worker["spec"], _worker["dtype"]
    outputs = len(spec.output_names)
    result = ChunkResult(documents=[[] for _ in range(outputs)])
    texts_per_output: list[list[str]] = [[] for _ in range(outputs)]
    for file_index, line_number, raw_line in lines:
        result.input_bytes += len(raw_line) + 1
        if not raw_line.strip():
            result.blank_lines += 1
            continue
        try:
            texts = spec.texts(parse_json_record(raw_line))
        except BadLineError as error:
            result.bad_lines.append((error.kind, error.detail, file_index, line_number))
            continue
        for output, text in enumerate(texts):
            texts_per_output[output].append(text)

    eod = [tokenizer.eod] if _worker["append_eod"] else []
    for output, texts in enumerate(texts_per_output):
        nonempty = [text for text in texts if text.strip()]
        token_lists = iter(tokenizer.tokenize_batch(nonempty))
        for text in texts:
            tokens = next(token_lists) if text.strip() else None
            result.documents[output].append(None if not tokens else np.array(tokens + eod, dtype=dtype))
    return result


# ---- main process ------------------------------------------------------------------------------------------


def read_chunks(files: list[str], chunk_size: int):
    chunk = []
    for file_index, path in enumerate(files):
        for line_number, raw_line in iter_raw_lines(path):
            chunk.append((file_index, line_number, raw_line))
            if len(chunk) == chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def ordered_results(pool, chunks, in_flight: int):
    """Results of process_chunk over `chunks` in input order, with at most `in_flight` chunks queued.

    (Pool.imap would read the whole input ahead into its task queue; this keeps memory flat.)
    """
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(process_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class Summary:
    """Counts for the progress lines and the final report."""

    def __init__(self, names: list[str]):
        self.started = time.time()
        self.lines = self.blank_lines = self.input_bytes = 0
        self.documents = dict.fromkeys(names, 0)
        self.tokens = dict.fromkeys(names, 0)
        self.empty = dict.fromkeys(names, 0)
        self.bad_counts: dict[str, int] = {}
        self.bad_locations: dict[str, list[str]] = {}
        self._next_log = 0

    def add_bad_line(self, kind: str, location: str) -> None:
        self.bad_counts[kind] = self.bad_counts.get(kind, 0) + 1
        locations = self.bad_locations.setdefault(kind, [])
        if len(locations) < LOCATIONS_SHOWN:
            locations.append(location)

    def rates(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        return (
            f"{self.lines / elapsed:,.0f} docs/s, {self.input_bytes / elapsed / 1e6:,.2f} MB/s, "
            f"{sum(self.tokens.values()) / elapsed:,.0f} tokens/s"
        )

    def maybe_log(self, interval: int) -> None:
        if self.lines >= self._next_log:
            if self._next_log:
                print(f"processed {self.lines:,} lines ({self.rates()})", file=sys.stderr, flush=True)
            self._next_log = (self.lines // interval + 1) * interval

    def report(self, prefix: str) -> str:
        elapsed = time.time() - self.started
        report = [
            f"done in {elapsed:.1f}s: {self.lines:,} lines, {self.input_bytes / 1e6:,.2f} MB of text ({self.rates()})"
        ]
        for name in self.documents:
            report.append(
                f"  {output_prefix(prefix, name)}: {self.documents[name]:,} documents, {self.tokens[name]:,} tokens, "
                f"{self.empty[name]:,} empty documents skipped"
            )
        if self.blank_lines:
            report.append(f"  blank lines passed over: {self.blank_lines:,}")
        for kind, count in sorted(self.bad_counts.items()):
            report.append(f"  bad lines skipped, {BAD_LINE_KINDS[kind]}: {count:,} (first at {', '.join(self.bad_locations[kind])})")
        return "\n".join(report)


def write_results(results, builders: dict, summary: Summary, args: argparse.Namespace) -> None:
    """Append every non-empty document to its output in input order; stop at a bad line unless skipping."""
    for result in results:
        for kind, detail, file_index, line_number in result.bad_lines:
            location = f"{args.input_files[file_index]}:{line_number}"
            if not args.skip_bad_lines:
                raise BadLineError(kind, detail, location)
            summary.add_bad_line(kind, location)
        summary.blank_lines += result.blank_lines
        summary.input_bytes += result.input_bytes
        for (name, builder), documents in zip(builders.items(), result.documents):
            for tokens in documents:
                if tokens is None:
                    summary.empty[name] += 1
                    continue
                with writing(builder.bin_path):
                    builder.add_document(tokens)
                summary.documents[name] += 1
                summary.tokens[name] += len(tokens)
        summary.lines += len(result.documents[0]) + len(result.bad_lines) + result.blank_lines
        summary.maybe_log(args.log_interval)


def run(args: argparse.Namespace) -> int:
    spec, tokenizer = args.spec, args.tokenizer
    names = spec.output_names
    dtype = best_dtype(tokenizer.vocab_size)
    builders = {}
    summary = Summary(names)
    pool = None
    print(
        f"tokenizing {len(args.input_files)} files with {args.tokenizer_type} (vocabulary {tokenizer.vocab_size:,}, "
        f"{np.dtype(dtype).name} tokens) into {', '.join(output_prefix(args.output_prefix, name) for name in names)}",
        file=sys.stderr,
    )

    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    try:
        with writing(args.output_prefix):
            os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
            for name in names:
                builders[name] = IndexedDatasetBuilder(data_file_path(output_prefix(args.output_prefix, name)), dtype)
        chunks = read_chunks(args.input_files, args.chunk_size)
        if args.workers == 1:
            set_up_tokenizing(tokenizer, spec, args.append_eod)
            results = map(process_chunk, chunks)
        else:
            pool = multiprocessing.Pool(
                args.workers, init_worker, (args.tokenizer_type, args.tokenizer_model, spec, args.append_eod)
            )
            results = ordered_results(pool, chunks, in_flight=4 * args.workers)
        write_results(results, builders, summary, args)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        identity = tokenizer_hash(tokenizer)
        for name in names:
            prefix = output_prefix(args.output_prefix, name)
            with writing(f"{prefix}.bin/.idx"):
                write_tokenizer_record(prefix, args.tokenizer_type, args.tokenizer_model, identity)  # before the data
                builders[name].finalize(index_file_path(prefix))
    except (BadLineError, DamagedFileError, Interrupted, KeyboardInterrupt) as error:
        for builder in builders.values():
            builder.abort()
        if isinstance(error, (BadLineError, DamagedFileError)):
            hint = " (use --skip-bad-lines to skip and count such lines)" if isinstance(error, BadLineError) else ""
            print(f"error: {error}\nno output written{hint}", file=sys.stderr)
            return 1
        print(f"interrupted ({error or 'Ctrl-C'}); no output written", file=sys.stderr)
        return 130
    except OutputWriteError as error:  # disk full, no permission, file size limit: nothing of the run is left
        remove_outputs(builders.values(), [output_prefix(args.output_prefix, name) for name in names])
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        signal.signal(signal.SIGTERM, previous_sigterm)
    print(summary.report(args.output_prefix), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
