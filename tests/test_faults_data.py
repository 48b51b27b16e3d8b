"""Data faults, as a hostile or unlucky user meets them: each gives a clear error naming the file, or the right result.

Truncated or corrupt .jsonl.zst inputs (preprocessing, tokenizer training), lone surrogate escapes, a dataset
rebuilt under a cached index, a stale cache found anyway, token ids beyond the vocabulary, a dataset of 0
documents, SFT records too long for --seq-length, the trainer's exit status on bad data, kill -9 at random
moments of preprocessing, DPO pairs whose answers are all the same, and a full disk under the Hugging Face
converters (writes limited by RLIMIT_FSIZE in the child, failing with EFBIG).
"""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard
from test_dpo import PAIRS as DPO_PAIRS
from test_dpo_layouts import dpo_flags
from test_preprocess_data import documents, output_files, run, write_jsonl, write_zst
from test_tokenizer import REPO, load_tool, tiny_sentencepiece_model  # noqa: F401 (fixture)

from megatron_llama.data.errors import DataError
from megatron_llama.data.gpt_dataset import GPTDataset
from megatron_llama.data.index_cache import IndexCacheError
from megatron_llama.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_llama.data.sft_dataset import SFTDataError, SFTDataset
from megatron_llama.data.tokenizer import build_tokenizer
from megatron_llama.pretrain import EXIT_BAD_DATA, main

LONE_SURROGATE_LINE = b'{"text": "before \\ud800 after"}\n'
RECORDS = [{"text": f"record {i}: the quick brown fox {i * 7} jumps over the lazy dog"} for i in range(400)]
TRAINER_FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
                 "--train-iters 1 --lr 1e-3 --device cpu --tokenizer-type SentencePieceTokenizer").split()


def cut(path, keep_bytes):
    """A copy of `path` holding its first `keep_bytes` bytes, as a failed download leaves it."""
    data = open(path, "rb").read()
    target = f"{path[:-len('.jsonl.zst')]}_cut.jsonl.zst"
    with open(target, "wb") as output:
        output.write(data[:keep_bytes])
    return target


@pytest.fixture
def two_frame_zst(tmp_path):
    """A .jsonl.zst of two frames of 200 records each, and the compressed size of its first frame."""
    path = write_zst(tmp_path / "corpus.jsonl.zst", RECORDS, frames=2)
    first_frame = len(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(record) + "\n" for record in RECORDS[:200]).encode()))
    return path, first_frame


# ---- 1. a .jsonl.zst cut short ----------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip_bad_lines"])
@pytest.mark.parametrize("where", ["first_block", "second_frame"])
def test_preprocessing_a_cut_zst_fails_naming_file_and_line_even_when_skipping(
        tmp_path, capsys, tiny_sentencepiece_model, two_frame_zst, where, skip):
    path, first_frame = two_frame_zst
    truncated = cut(path, 40 if where == "first_block" else first_frame + 60)
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(truncated, folder / "a.jsonl.zst")  # sorted first: the whole folder must fail, not drop the file
    write_jsonl(folder / "b.jsonl", RECORDS[:10])
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--skip-bad-lines"] if skip else []
    assert run(tiny_sentencepiece_model, [folder], out / "data", *flags) == 1
    error = capsys.readouterr().err
    line = 1 if where == "first_block" else 201
    assert f"{folder / 'a.jsonl.zst'}:{line}: truncated" in error and "download or compress the file again" in error
    assert "malformed JSON" not in error and "UTF-8" not in error
    assert output_files(out) == []


def test_preprocessing_corrupt_zst_bytes_fail_naming_the_file(tmp_path, capsys, tiny_sentencepiece_model, two_frame_zst):
    path, _ = two_frame_zst
    data = bytearray(open(path, "rb").read())
    data[30:60] = b"\xff" * 30
    open(path, "wb").write(bytes(data))
    assert run(tiny_sentencepiece_model, [path], tmp_path / "out", "--skip-bad-lines") == 1
    assert f"{path}:1: not zstd data" in capsys.readouterr().err
    assert output_files(tmp_path) == []


@pytest.mark.parametrize("where", ["first_block", "second_frame"])
def test_tokenizer_training_on_a_cut_zst_fails_naming_file_and_line(tmp_path, capsys, two_frame_zst, where):
    path, first_frame = two_frame_zst
    truncated = cut(path, 40 if where == "first_block" else first_frame + 60)
    argv = ["--input", truncated, "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300",
            "--num-threads", "1", "--skip-bad-lines"]
    assert load_tool("train_tokenizer").main(argv) == 1
    assert f"{truncated}:{1 if where == 'first_block' else 201}: truncated" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "tok.model")


def test_a_whole_multi_frame_zst_still_reads_every_record(tmp_path, tiny_sentencepiece_model, two_frame_zst):
    path, _ = two_frame_zst
    assert run(tiny_sentencepiece_model, [path], tmp_path / "out") == 0
    assert len(documents(tmp_path / "out_text_document")) == len(RECORDS)


# ---- 5. a lone surrogate escape ----------------------------------------------------------------------------


def test_lone_surrogate_stops_preprocessing_naming_file_and_line(tmp_path, capsys, tiny_sentencepiece_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + LONE_SURROGATE_LINE + b'{"text": "fine too"}\n')
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert f"{corpus}:2: not encodable text: key 'text' holds the lone surrogate escape \\ud800" in error
    assert "TypeError" not in error and output_files(tmp_path) == []


def test_skip_bad_lines_skips_and_counts_a_lone_surrogate(tmp_path, capsys, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + LONE_SURROGATE_LINE + b'{"text": "fine too"}\n')
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "out", "--skip-bad-lines") == 0
    assert [tokenizer.detokenize(tokens) for tokens in documents(tmp_path / "out_text_document")] == ["fine", "fine too"]
    assert f"not encodable text: 1 (first at {corpus}:2)" in capsys.readouterr().err


def test_lone_surrogate_in_tokenizer_training_and_sft_names_file_and_line(tmp_path, capsys, tiny_sentencepiece_model):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n' + LONE_SURROGATE_LINE)
    argv = ["--input", str(corpus), "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "300", "--num-threads", "1"]
    assert load_tool("train_tokenizer").main(argv) == 1
    assert f"{corpus}:2: not encodable text" in capsys.readouterr().err
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": "q \\udfff", "response": "a"}\n')
    with pytest.raises(SFTDataError, match=r"sft.jsonl line 2: not encodable text: turn 0 holds .*\\udfff"):
        SFTDataset(str(sft), build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model), 16, 1, 0)


# ---- 4. the dataset index cache ----------------------------------------------------------------------------


def gpt_dataset(prefix, cache, **overrides):
    settings = dict(seq_length=8, num_samples=60, seed=3, cache_path=str(cache))
    return GPTDataset(str(prefix), (0, len(IndexedDataset(str(prefix)).document_indices) - 1), **{**settings, **overrides})


def all_samples(dataset):
    return np.stack([dataset[i]["text"] for i in range(len(dataset))])


def test_dataset_rebuilt_at_the_same_prefix_gets_a_fresh_index(tmp_path, tiny_sentencepiece_model):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", RECORDS[:80])
    prefix = tmp_path / "data"
    assert run(tiny_sentencepiece_model, [corpus], prefix, "--append-eod") == 0
    before = gpt_dataset(f"{prefix}_text_document", tmp_path / "cache")
    reordered = write_jsonl(tmp_path / "corpus.jsonl", RECORDS[:80][::-1])  # same lines, another order
    assert run(tiny_sentencepiece_model, [reordered], prefix, "--append-eod") == 0
    after = gpt_dataset(f"{prefix}_text_document", tmp_path / "cache")
    fresh = gpt_dataset(f"{prefix}_text_document", tmp_path / "fresh_cache")
    assert after.cache_key != before.cache_key and after.cache_key == fresh.cache_key
    np.testing.assert_array_equal(all_samples(after), all_samples(fresh))


def test_cache_entry_describing_other_data_is_named_not_used(tmp_path):
    prefix = write_documents(tmp_path / "data", [[5, 6, 7, 8, 9]] * 12)
    dataset = gpt_dataset(prefix, tmp_path / "cache")
    description_path = f"{dataset.cache_entry}-description.json"
    stored = json.load(open(description_path))
    stored["data_identity"]["bin_bytes"] += 2  # as an entry copied from another dataset would say
    json.dump(stored, open(description_path, "w"))
    with pytest.raises(IndexCacheError, match=f"{description_path} was built for other data .*data_identity.* delete"):
        gpt_dataset(prefix, tmp_path / "cache")


def test_stale_arrays_found_under_the_right_name_are_named_when_opened_or_read(tmp_path):
    prefix = write_documents(tmp_path / "data", [[5, 6, 7, 8, 9]] * 12)
    entry = gpt_dataset(prefix, tmp_path / "cache").cache_entry
    doc_idx, shuffle_idx = np.load(f"{entry}-doc_idx.npy"), np.load(f"{entry}-shuffle_idx.npy")
    np.save(f"{entry}-shuffle_idx.npy", shuffle_idx[:10])
    with pytest.raises(IndexCacheError, match=f"index cache {entry} does not fit .*shuffle_idx has shape"):
        gpt_dataset(prefix, tmp_path / "cache")
    np.save(f"{entry}-shuffle_idx.npy", shuffle_idx)
    np.save(f"{entry}-doc_idx.npy", doc_idx + 100)  # sequences that do not exist in this data
    dataset = gpt_dataset(prefix, tmp_path / "cache")
    with pytest.raises(IndexCacheError, match=f"sample 0: index cache {entry} does not fit"):
        dataset[0]


# ---- token ids beyond the vocabulary, 0 documents ----------------------------------------------------------


def write_documents(prefix, token_lists):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for tokens in token_lists:
        builder.add_document(np.array(tokens, dtype=np.uint16))
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_token_id_at_the_vocabulary_size_is_refused_when_the_dataset_opens(tmp_path):
    prefix = write_documents(tmp_path / "data", [[1, 2, 3, 4]] * 10 + [[1, 2, 800, 3]])
    assert len(gpt_dataset(prefix, tmp_path / "cache", vocab_size=801)) >= 60
    with pytest.raises(DataError, match=f"{prefix}.bin holds token ids from 1 to 800, but the model's vocabulary "
                                         f"has 800 entries"):
        gpt_dataset(prefix, tmp_path / "cache", vocab_size=800)


def trainer_run(capsys, tokenizer_model, *flags):
    """(exit status, stderr) of pretrain.main with a tiny model."""
    status = main([*TRAINER_FLAGS, "--tokenizer-model", tokenizer_model, *flags])
    return status, capsys.readouterr().err


def assert_one_line_error(stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", ["zero_documents", "token_id_too_large", "sft_record"])
def test_trainer_exits_with_the_bad_data_status_and_one_line(tmp_path, capsys, tiny_sentencepiece_model, case):
    if case == "sft_record":
        sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"}])
        status, stderr = trainer_run(capsys, tiny_sentencepiece_model, "--sft", "--train-data-path", sft)
        expected = (f"{sft} line 2", "response")
    else:
        documents_ = [] if case == "zero_documents" else [[1, 2, 3]] * 30 + [[4, 5000, 6]]
        prefix = write_documents(tmp_path / "data", documents_)
        status, stderr = trainer_run(capsys, tiny_sentencepiece_model, "--data-path", prefix,
                                     "--data-cache-path", str(tmp_path / "cache"))
        expected = ((f"{prefix} holds 0 documents",) if case == "zero_documents"
                    else (f"{prefix}.bin holds token ids from 1 to 5000", "800 entries"))
    assert status == EXIT_BAD_DATA != 1
    assert_one_line_error(stderr, *expected)


def test_dpo_run_on_pairs_whose_chosen_always_equals_rejected_exits_with_the_bad_data_status(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [dict(pair, rejected=pair["chosen"]) for pair in DPO_PAIRS])
    status = main(dpo_flags(tmp_path, str(tmp_path / "run")))
    assert status == EXIT_BAD_DATA
    assert_one_line_error(capsys.readouterr().err, f"{pairs}: in all {len(DPO_PAIRS)} pairs the chosen and rejected")
    assert not (tmp_path / "run" / "latest_checkpointed_iteration.txt").exists()


# ---- SFT records that do not fit ---------------------------------------------------------------------------


def test_sft_record_too_long_is_left_out_and_counted_with_its_eod_never_dropped(tmp_path, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "long answer " * 40},
                                                {"prompt": "q", "response": "short"}])
    dataset = SFTDataset(path, tokenizer, seq_length=40, num_samples=4, seed=0)
    assert dataset.dropped == 1 and "1 left out: their first answer does not fit" in dataset.describe()
    for index in range(4):
        sample = dataset[index]
        assert sample["text"][sample["loss_mask"].nonzero()[0][-1]] == tokenizer.eod


# ---- kill -9 at random moments of preprocessing ------------------------------------------------------------


def preprocess_command(model, corpus, prefix):
    return [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus, "--output-prefix",
            str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod"]


def start_and_wait_for_writing(command, output):
    """Start preprocessing; return (process, time.time() when its temporary .bin appeared, or None if it ended first)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(f"{output}.bin.tmp"):
        if process.poll() is not None:
            return process, None
        assert time.time() < deadline
        time.sleep(0.005)
    return process, time.time()


def test_kill_9_at_random_moments_never_leaves_a_loadable_half_file_and_a_rerun_succeeds(
        tmp_path, tiny_sentencepiece_model):
    """Seed 0 kills at start-up; the others at a random moment from the first token written to a little after
    the reference run ended (mid-write, in finalize, or after the files are published)."""
    lines = [{"text": f"{RECORDS[i % 400]['text']} 床前明月光 {i}" * (1 + i % 4)} for i in range(12000)]
    corpus = write_zst(tmp_path / "corpus.jsonl.zst", lines, frames=3)
    reference = f"{tmp_path / 'reference'}_text_document"
    process, writing_started = start_and_wait_for_writing(
        preprocess_command(tiny_sentencepiece_model, corpus, tmp_path / "reference"), reference)
    assert process.wait() == 0 and writing_started is not None
    writing_time = time.time() - writing_started
    expected = [tokens.tolist() for tokens in documents(reference)]
    for seed in range(5):
        prefix = tmp_path / f"seed{seed}"
        output = f"{prefix}_text_document"
        command = preprocess_command(tiny_sentencepiece_model, corpus, prefix)
        if seed == 0:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            process, _ = start_and_wait_for_writing(command, output)
            time.sleep(random.Random(seed).uniform(0.0, 1.2 * writing_time))
        process.kill()
        process.wait()
        if os.path.exists(f"{output}.idx"):  # killed after the .idx was published: the pair must be whole
            assert [tokens.tolist() for tokens in documents(output)] == expected, seed
        else:
            with pytest.raises(ValueError, match="does not exist"):
                IndexedDataset(output)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert [tokens.tolist() for tokens in documents(output)] == expected, seed


# ---- a full disk under the Hugging Face converters ---------------------------------------------------------

FILE_SIZE_LIMIT = 64 * 1024  # bytes: config files fit, the tiny model's weights (~0.5 MB) do not


def limit_file_size():
    """In the child: writes beyond FILE_SIZE_LIMIT bytes fail with EFBIG ("File too large"), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def run_tool_on_a_full_disk(tool: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *argv], cwd=REPO,
                          preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_converter_on_a_full_disk_says_so_in_one_line_and_leaves_no_partial_files(tmp_path, tool):
    from megatron_llama.checkpoint import write_model_checkpoint
    from megatron_llama.hf_conversion import save_hf_checkpoint
    from megatron_llama.model.llama import build_model
    from test_hf_conversion import BASE

    source = tmp_path / "source"
    if tool == "convert_to_hf":
        write_model_checkpoint(str(source), 1, BASE, build_model(BASE, seed=1).state_dict())
    else:
        save_hf_checkpoint(source, BASE, build_model(BASE, seed=1).state_dict())
    output = tmp_path / "out" / "model"
    output.parent.mkdir()
    done = run_tool_on_a_full_disk(tool, "--load", str(source), "--save", str(output))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith(f"{tool}: error: could not write --save {output} (") and "File too large" in done.stderr
    assert os.listdir(output.parent) == []  # no folder, no .tmp or partial files
    load_tool(tool).main(["--load", str(source), "--save", str(output)])  # with room on the disk, the same command
    assert os.listdir(output.parent) == ["model"]
