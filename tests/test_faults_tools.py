"""The preprocessing tools when writing fails: a disk that fills up (a file size limit, RLIMIT_FSIZE with SIGXFSZ
ignored, makes every write past it fail with EFBIG as a full disk fails with ENOSPC) or a folder that cannot be
created. Each tool exits 1 with one error line naming its output file and the system's reason, and leaves no file,
partial or temporary, behind."""
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from megatron_llama.data.indexed_dataset import IndexedDatasetBuilder, index_file_path
from test_tokenizer import QUICKSTART_DATA, REPO, tiny_sentencepiece_model  # noqa: F401 (fixture)

FILE_SIZE_LIMIT = 64 * 1024  # bytes; every output below is larger


def run_tool(name: str, *argv: str, file_size_limit: int | None = FILE_SIZE_LIMIT) -> subprocess.CompletedProcess:
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
                          preexec_fn=limit_file_size if file_size_limit else None)


def assert_failed_cleanly(done: subprocess.CompletedProcess, output_file: str, reason: str, folder, kept=()):
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert output_file in errors[0] and reason in errors[0], errors
    assert sorted(os.listdir(folder)) == sorted(kept)


def test_preprocess_data_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, tiny_sentencepiece_model):
    out = tmp_path / "out"
    out.mkdir()
    done = run_tool("preprocess_data", "--input", QUICKSTART_DATA, "--json-keys", "text", "--output-prefix",
                    str(out / "corpus"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                    tiny_sentencepiece_model, "--append-eod", "--workers", "1")
    assert_failed_cleanly(done, str(out / "corpus_text_document.bin"), "File too large", out)


def test_preprocess_sft_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, tiny_sentencepiece_model):
    records = tmp_path / "records.jsonl"
    with open(os.path.join(REPO, "examples", "sft_sample.jsonl")) as sample:
        records.write_text(sample.read() * 200)  # about 800 KB of records, far over the limit in tokens
    out = tmp_path / "out"
    out.mkdir()
    done = run_tool("preprocess_sft", "--input", str(records), "--output-prefix", str(out / "sft"),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tiny_sentencepiece_model)
    assert_failed_cleanly(done, str(out / "sft"), "File too large", out)


def test_merge_datasets_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    inputs = []
    for shard in range(2):
        prefix = str(tmp_path / f"shard{shard}")
        with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
            for _ in range(20):
                builder.add_document(np.arange(1000) % 500)
            builder.finalize(index_file_path(prefix))  # 40 KB of tokens each
        inputs.append(prefix)
    out = tmp_path / "out"
    out.mkdir()
    done = run_tool("merge_datasets", "--input", *inputs, "--output-prefix", str(out / "merged"))
    assert_failed_cleanly(done, str(out / "merged.bin"), "File too large", out)


@pytest.mark.parametrize("tool", ["preprocess_data", "preprocess_sft"])
def test_an_output_folder_that_cannot_be_created_is_one_error_line(tool, tmp_path, tiny_sentencepiece_model):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder under a regular file cannot be created, not even by root
    keys = ["--json-keys", "text"] if tool == "preprocess_data" else []
    inputs = QUICKSTART_DATA if tool == "preprocess_data" else os.path.join(REPO, "examples", "sft_sample.jsonl")
    done = run_tool(tool, "--input", inputs, *keys, "--output-prefix", str(blocker / "out" / "corpus"),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tiny_sentencepiece_model,
                    file_size_limit=None)
    assert_failed_cleanly(done, str(blocker), "Not a directory", tmp_path, kept=["a_file"])
    assert blocker.read_text() == ""
