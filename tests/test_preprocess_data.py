"""tools/preprocess_data.py: text -> .bin/.idx round trips, inputs, outputs, bad input, interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from megatron_llama.data.indexed_dataset import IndexedDataset
from megatron_llama.data.tokenizer import build_tokenizer
from test_tokenizer import MIXED_TEXTS, REPO, load_tool, tiny_sentencepiece_model  # noqa: F401 (fixture)

preprocess = load_tool("preprocess_data")
WUDAO_RECORDS = [
    {"id": 1, "dataType": "百科", "title": "明月", "content": "床前明月光，疑是地上霜。"},
    {"id": 2, "dataType": "新闻", "title": "", "content": "Only content, the title is empty."},
    {"id": 3, "dataType": "博客", "title": "Mixed 标题", "content": "正文 with English."},
]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as output:
        for record in records:
            output.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_zst(path, records, frames=2):
    """A .jsonl.zst file of several zstd frames (as pzstd and zstd -T write)."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    step = -(-len(lines) // frames)
    with open(path, "wb") as output:
        for start in range(0, len(lines), step):
            output.write(zstandard.ZstdCompressor().compress("".join(lines[start : start + step]).encode("utf-8")))
    return str(path)


def run(model, inputs, prefix, *extra):
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", model, *extra]  # fmt: skip
    return preprocess.main(argv)


def documents(prefix):
    dataset = IndexedDataset(str(prefix))
    assert len(dataset.document_indices) == len(dataset) + 1  # one sequence per document
    return [np.array(dataset[i]) for i in range(len(dataset))]


def output_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith((".bin", ".idx", ".tmp")))


def test_round_trip_gives_the_text_back_with_eod_where_asked(tmp_path, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text, "meta": {"n": i}} for i, text in enumerate(MIXED_TEXTS)])
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "eod", "--append-eod") == 0
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "plain") == 0

    with_eod, without_eod = documents(tmp_path / "eod_text_document"), documents(tmp_path / "plain_text_document")
    assert IndexedDataset(str(tmp_path / "eod_text_document")).dtype == np.uint16
    assert len(with_eod) == len(without_eod) == len(MIXED_TEXTS)
    for text, eod_tokens, plain_tokens in zip(MIXED_TEXTS, with_eod, without_eod):
        assert eod_tokens[-1] == tokenizer.eod and tokenizer.eod not in plain_tokens
        assert tokenizer.detokenize(eod_tokens[:-1]) == text
        assert tokenizer.detokenize(plain_tokens) == text


def test_several_json_keys_give_one_output_each(tmp_path, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    corpus = write_jsonl(tmp_path / "wudao.jsonl", WUDAO_RECORDS[:1] + WUDAO_RECORDS[2:])
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "out", "--json-keys", "title", "content") == 0
    titles, contents = documents(tmp_path / "out_title_document"), documents(tmp_path / "out_content_document")
    assert [tokenizer.detokenize(t) for t in titles] == ["明月", "Mixed 标题"]
    assert [tokenizer.detokenize(t) for t in contents] == ["床前明月光，疑是地上霜。", "正文 with English."]


def test_join_keys_make_one_document_of_title_and_content(tmp_path, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    corpus = write_jsonl(tmp_path / "wudao.jsonl", WUDAO_RECORDS)
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "wudao", "--join-keys", "title", "content", "--join-separator", "\\n") == 0
    joined = [tokenizer.detokenize(tokens) for tokens in documents(tmp_path / "wudao_title_content_document")]
    assert joined == ["明月\n床前明月光，疑是地上霜。", "Only content, the title is empty.", "Mixed 标题\n正文 with English."]
    assert output_files(tmp_path) == ["wudao_title_content_document.bin", "wudao_title_content_document.idx"]

    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "named", "--join-keys", "title", "content", "--join-name", "text") == 0
    assert [tokenizer.detokenize(tokens) for tokens in documents(tmp_path / "named_text_document")] == joined


def test_zst_directory_and_glob_inputs_give_the_plain_file_result(tmp_path, tiny_sentencepiece_model):
    records = [{"text": text} for text in MIXED_TEXTS]
    plain = write_jsonl(tmp_path / "all.jsonl", records)
    shards = tmp_path / "shards"
    (shards / "nested").mkdir(parents=True)
    write_zst(shards / "a.jsonl.zst", records[:3])
    write_jsonl(shards / "b.json", records[3:5])
    write_zst(shards / "nested" / "c.zst", records[5:], frames=1)
    (shards / "README.md").write_text("not an input")

    assert run(tiny_sentencepiece_model, [plain], tmp_path / "plain") == 0
    assert run(tiny_sentencepiece_model, [shards], tmp_path / "directory") == 0
    assert run(tiny_sentencepiece_model, [shards / "*.json*", shards / "nested" / "*.zst"], tmp_path / "glob") == 0
    expected = [tokens.tolist() for tokens in documents(tmp_path / "plain_text_document")]
    assert [tokens.tolist() for tokens in documents(tmp_path / "directory_text_document")] == expected
    assert [tokens.tolist() for tokens in documents(tmp_path / "glob_text_document")] == expected


def test_two_workers_write_the_same_files_as_one(tmp_path, tiny_sentencepiece_model):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": f"{i}: {MIXED_TEXTS[i % len(MIXED_TEXTS)]}"} for i in range(300)])
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "one", "--append-eod") == 0
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "two", "--append-eod", "--workers", "2", "--chunk-size", "7") == 0
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"two_text_document{suffix}").read_bytes()


def test_vocabulary_of_65500_or_more_gives_int32_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "w69999 w0 w65600"}])
    argv = ["--input", corpus, "--output-prefix", str(tmp_path / "big"), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tmp_path), "--append-eod"]  # fmt: skip
    assert preprocess.main(argv) == 0
    dataset = IndexedDataset(str(tmp_path / "big_text_document"))
    assert dataset.dtype == np.int32
    assert dataset[0].tolist() == [70001, 2, 65602, 1]


BAD_LINES = {
    "invalid_json": (b'{"text": "unterminated}\n', "malformed JSON"),
    "invalid_utf8": (b'{"text": "caf\xe9"}\n', "not UTF-8"),
    "missing_key": (b'{"body": "no text key"}\n', "missing key: no key 'text'"),
    "not_a_string": (b'{"text": ["a", "list"]}\n', "not a string"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_stops_the_run_naming_file_and_line_and_leaves_no_files(tmp_path, capsys, tiny_sentencepiece_model, kind):
    good = "".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1200)).encode()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(good + BAD_LINES[kind][0] + good)  # the bad line is line 1201, after the first chunks
    out = tmp_path / "out"
    out.mkdir()
    assert run(tiny_sentencepiece_model, [corpus], out / "data", "--chunk-size", "100") == 1
    error = capsys.readouterr().err
    assert f"{corpus}:1201: " in error and BAD_LINES[kind][1] in error and "--skip-bad-lines" in error
    assert output_files(out) == []


def test_skip_bad_lines_counts_each_kind_and_keeps_good_lines(tmp_path, capsys, tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    lines = [b'{"text": "first"}\n'] + [bad for bad, _ in BAD_LINES.values()] + [BAD_LINES["missing_key"][0], b'{"text": "last"}\n']
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"".join(lines))
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "out", "--skip-bad-lines") == 0
    assert [tokenizer.detokenize(tokens) for tokens in documents(tmp_path / "out_text_document")] == ["first", "last"]
    summary = capsys.readouterr().err
    assert f"malformed JSON: 1 (first at {corpus}:2)" in summary
    assert f"not UTF-8: 1 (first at {corpus}:3)" in summary
    assert f"missing key: 2 (first at {corpus}:4, {corpus}:6)" in summary
    assert f"value is not a string: 1 (first at {corpus}:5)" in summary


def test_empty_documents_are_counted_and_not_written(tmp_path, capsys, tiny_sentencepiece_model):
    records = [{"text": "kept"}, {"text": ""}, {"text": "  \n "}, {"text": "also kept"}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    with open(corpus, "a") as output:
        output.write("\n")  # a blank line is passed over, not an error
    assert run(tiny_sentencepiece_model, [corpus], tmp_path / "out", "--append-eod") == 0
    assert len(documents(tmp_path / "out_text_document")) == 2
    summary = capsys.readouterr().err
    assert "2 documents" in summary and "2 empty documents skipped" in summary and "blank lines passed over: 1" in summary


@pytest.mark.parametrize(
    "argv_change, message",
    [
        ({"--bogus-flag": []}, "unrecognized arguments: --bogus-flag"),
        ({"--input": ["absent/*.jsonl"]}, "glob absent/*.jsonl holds no file"),
        ({"--input": ["absent.jsonl"]}, "input absent.jsonl does not exist"),
        ({"--tokenizer-model": ["absent.model"]}, "SentencePiece model absent.model does not exist"),
        ({"--tokenizer-type": ["GPT2BPETokenizer"]}, "invalid choice: 'GPT2BPETokenizer'"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, tiny_sentencepiece_model, argv_change, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "x"}])
    arguments = {"--input": [corpus], "--output-prefix": [str(tmp_path / "out")], "--tokenizer-type": ["SentencePieceTokenizer"],
                 "--tokenizer-model": [tiny_sentencepiece_model], **argv_change}  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main([item for flag, values in arguments.items() for item in (flag, *values)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert output_files(tmp_path) == []


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory):
    """About 12 MB of JSON lines, enough that preprocessing takes seconds."""
    path = tmp_path_factory.mktemp("large") / "large.jsonl"
    line = json.dumps({"text": " ".join(MIXED_TEXTS[:4]) * 4}, ensure_ascii=False) + "\n"
    path.write_text(line * (12_000_000 // len(line.encode())), encoding="utf-8")
    return str(path)


def start_and_wait_for_tokens(model, corpus, prefix):
    """Start preprocess_data.py in a subprocess; return once its temporary .bin holds tokens."""
    command = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", corpus, "--output-prefix",
               str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    temporary_bin = f"{prefix}_text_document.bin.tmp"
    deadline = time.time() + 30
    while not (os.path.exists(temporary_bin) and os.path.getsize(temporary_bin) > 0):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    assert process.poll() is None  # still running: the signal arrives mid-run
    return process


def test_kill_9_mid_run_never_leaves_an_idx_beside_a_partial_bin(tmp_path, tiny_sentencepiece_model, large_corpus):
    process = start_and_wait_for_tokens(tiny_sentencepiece_model, large_corpus, tmp_path / "out")
    process.kill()
    process.wait()
    process.stderr.close()
    assert [name for name in output_files(tmp_path) if not name.endswith(".tmp")] == []


def test_ctrl_c_mid_run_removes_every_partial_file(tmp_path, tiny_sentencepiece_model, large_corpus):
    process = start_and_wait_for_tokens(tiny_sentencepiece_model, large_corpus, tmp_path / "out")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr.decode()
    assert "no output written" in stderr.decode()
    assert output_files(tmp_path) == []
