"""The tokenizer recorded beside token files: preprocessing writes it, merging keeps a common one and refuses a
mix, and the trainer refuses ids made by another tokenizer of the same vocabulary size (exit status 3)."""
import json
import os

import pytest

from megatron_llama.data.dataset_tokenizer import tokenizer_record_path
from megatron_llama.data.tokenizer import build_tokenizer, tokenizer_hash
from megatron_llama.pretrain import EXIT_BAD_DATA, main
from test_faults_checkpoint import word_level_tokenizer
from test_tokenizer import load_tool

MODEL = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --seq-length 8 "
         "--make-vocab-size-divisible-by 64 --micro-batch-size 2 --train-iters 1 --lr 1e-3 --device cpu "
         "--eval-iters 0 --split 1,0,0").split()


@pytest.fixture(scope="module")
def corpus_and_tokenizers(tmp_path_factory):
    """A corpus, tokenizers A and B (same size, other ids) as flags, and the corpus preprocessed with each."""
    folder = tmp_path_factory.mktemp("dataset_tokenizer")
    first = word_level_tokenizer(folder / "a", list(range(60)))
    second = word_level_tokenizer(folder / "b", list(reversed(range(60))))
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 60}" for j in range(40))}) + "\n"
                              for i in range(20)))
    prefixes = {}
    for name, flags in (("a", first), ("b", second)):
        assert load_tool("preprocess_data").main(["--input", str(corpus), "--output-prefix", str(folder / f"data_{name}")]
                                                 + flags + ["--append-eod"]) == 0
        prefixes[name] = str(folder / f"data_{name}_text_document")
    return first, second, prefixes


def test_preprocessing_records_the_tokenizer_beside_the_token_files(corpus_and_tokenizers):
    first, _, prefixes = corpus_and_tokenizers
    with open(tokenizer_record_path(prefixes["a"])) as handle:
        record = json.load(handle)
    assert record["tokenizer_hash"] == tokenizer_hash(build_tokenizer(first[1], first[3]))
    assert record["tokenizer_model"] == os.path.abspath(first[3])


def test_training_on_ids_of_another_tokenizer_is_refused_with_both_named(corpus_and_tokenizers, tmp_path, capsys):
    first, second, prefixes = corpus_and_tokenizers
    assert main(MODEL + first + ["--data-path", prefixes["a"]]) == 0
    assert main(MODEL + second + ["--data-path", prefixes["a"]]) == EXIT_BAD_DATA
    error = capsys.readouterr().err
    assert f"{prefixes['a']} was tokenized with" in error and "a/tokenizer.json" in error
    assert "b/tokenizer.json" in error


def test_a_dataset_without_a_record_is_read_as_it_is(corpus_and_tokenizers):
    _, second, prefixes = corpus_and_tokenizers
    os.remove(tokenizer_record_path(prefixes["b"]))
    assert main(MODEL + second + ["--data-path", prefixes["b"]]) == 0


def test_merging_keeps_the_common_record_and_refuses_a_mix(corpus_and_tokenizers, tmp_path, capsys):
    _, _, prefixes = corpus_and_tokenizers
    merged = str(tmp_path / "merged")
    merge = load_tool("merge_datasets").main
    assert merge(["--input", prefixes["a"], prefixes["a"], "--output-prefix", merged]) == 0
    assert json.load(open(tokenizer_record_path(merged))) == json.load(open(tokenizer_record_path(prefixes["a"])))
    assert merge(["--input", prefixes["a"], prefixes["b"], "--output-prefix", str(tmp_path / "mixed")]) == 1
    assert "were not tokenized by the same tokenizer" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "mixed.idx"))
