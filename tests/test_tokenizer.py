"""Tokenizer training (tools/train_tokenizer.py) and the Tokenizer interface, incl. Hugging Face export.

`tiny_sentencepiece_model` and `load_tool` are imported by test_preprocess_data.py and test_merge_datasets.py.
"""
import importlib.util
import json
import os
import shutil
import sys

import pytest

from megatron_llama.data.tokenizer import TokenizerError, build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_DATA = os.path.join(REPO, "examples", "data")
USER_SYMBOL = "<sep>"
MIXED_TEXTS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "The quick brown fox: 1234567 jumps\tover\n\nthe lazy dog.",
    "  two leading spaces, trailing two  ",
    " 中文 and English mixed 混合 text 🙂 with an emoji and Ωmega",
    f"before{USER_SYMBOL}after {USER_SYMBOL} spaced",
    f"{USER_SYMBOL}first",
    "\nstarts with a newline",
]


def load_tool(name: str):
    """Import tools/{name}.py as a module (tools/ is not a package), registered so worker processes can unpickle it."""
    module_name = f"tool_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(REPO, "tools", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def train(prefix, *extra, vocab_size=800, seed=7, max_sentences=4000):
    argv = [
        "--input", QUICKSTART_DATA, "--json-keys", "text", "--model-prefix", str(prefix),
        "--vocab-size", str(vocab_size), "--character-coverage", "0.98", "--max-sentences", str(max_sentences),
        "--seed", str(seed), "--num-threads", "1", "--user-defined-symbols", USER_SYMBOL, *extra,
    ]  # fmt: skip
    return load_tool("train_tokenizer").main(argv)


@pytest.fixture(scope="session")
def tiny_sentencepiece_model(tmp_path_factory):
    """A SentencePiece BPE model of 800 pieces trained on the quickstart corpus (shared by the test modules)."""
    prefix = tmp_path_factory.getbasetemp() / "tiny_tokenizer" / "tokenizer"
    if not os.path.exists(f"{prefix}.model"):
        prefix.parent.mkdir(exist_ok=True)
        assert train(prefix) == 0
    return f"{prefix}.model"


def test_training_twice_with_one_seed_gives_identical_model_bytes(tmp_path, tiny_sentencepiece_model):
    assert train(tmp_path / "again") == 0
    with open(tiny_sentencepiece_model, "rb") as first, open(tmp_path / "again.model", "rb") as second:
        assert first.read() == second.read()


def test_another_seed_samples_other_sentences_and_gives_another_vocabulary(tmp_path):
    assert train(tmp_path / "seed1", seed=1, max_sentences=1500) == 0
    assert train(tmp_path / "seed2", seed=2, max_sentences=1500) == 0
    vocab1 = (tmp_path / "seed1.vocab").read_text(encoding="utf-8")
    vocab2 = (tmp_path / "seed2.vocab").read_text(encoding="utf-8")
    assert vocab1 != vocab2


def test_trained_model_has_llama_ids_and_no_pad(tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    assert tokenizer.vocab_size == 800
    assert (tokenizer.unk, tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, None)


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_detokenize_gives_the_text_back_exactly(tiny_sentencepiece_model, text):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    ids = tokenizer.tokenize(text)
    assert tokenizer.unk not in ids  # byte fallback: rare characters become bytes, never <unk>
    assert tokenizer.bos not in ids and tokenizer.eod not in ids
    assert tokenizer.detokenize(ids) == text


def test_user_defined_symbol_is_one_piece(tiny_sentencepiece_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    symbol_ids = tokenizer.tokenize(USER_SYMBOL)
    symbol_id = symbol_ids[-1]
    assert tokenizer.tokenize(f"a{USER_SYMBOL}b").count(symbol_id) == 1
    assert tokenizer.detokenize([symbol_id]) == USER_SYMBOL


def test_vocabulary_too_small_for_the_coverage_says_what_to_change(tmp_path, capsys):
    argv = ["--input", QUICKSTART_DATA, "--model-prefix", str(tmp_path / "small"), "--vocab-size", "400", "--max-sentences", "2000"]
    assert load_tool("train_tokenizer").main(argv) == 1
    message = capsys.readouterr().err
    assert "raise --vocab-size" in message and "--character-coverage 0.98" in message
    assert not os.path.exists(tmp_path / "small.model")


def test_bad_line_in_tokenizer_input_is_named_by_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "wrong key"}\n', encoding="utf-8")
    argv = ["--input", str(corpus), "--model-prefix", str(tmp_path / "model"), "--vocab-size", "300"]
    assert load_tool("train_tokenizer").main(argv) == 1
    assert f"{corpus}:3: missing key" in capsys.readouterr().err


def test_missing_input_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("train_tokenizer").main(["--input", str(tmp_path / "absent"), "--model-prefix", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_or_unknown_tokenizer_raises_with_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="absent.model does not exist"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "absent.model"))
    with pytest.raises(TokenizerError, match="tokenizer.json does not exist"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path))


def test_hf_export_of_sentencepiece_gives_identical_ids_in_transformers(tmp_path, tiny_sentencepiece_model):
    from transformers import AutoTokenizer

    ours = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    ours.save_hf_files(tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos, ours.eod)
    for text in MIXED_TEXTS:
        ids = ours.tokenize(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert theirs(text).input_ids == [ours.bos] + ids  # BOS added like Llama's tokenizer
        assert theirs.decode(ids) == ours.detokenize(ids)


def test_huggingface_tokenizer_json_loads_round_trips_and_copies(tmp_path, tiny_sentencepiece_model):
    from transformers import AutoTokenizer

    sentencepiece = build_tokenizer("SentencePieceTokenizer", tiny_sentencepiece_model)
    sentencepiece.save_hf_files(tmp_path / "source")
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "source"))
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.bos, tokenizer.pad) == (800, 2, 1, None)
    for text in MIXED_TEXTS:
        assert tokenizer.tokenize(text) == sentencepiece.tokenize(text)
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text

    tokenizer.save_hf_files(tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "copy")
    assert reloaded.encode(MIXED_TEXTS[3], add_special_tokens=False) == tokenizer.tokenize(MIXED_TEXTS[3])

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(tmp_path / "source" / "tokenizer.json", bare / "tokenizer.json")
    from_file_only = build_tokenizer("HuggingFaceTokenizer", str(bare / "tokenizer.json"))
    assert from_file_only.eod == 2  # found as "</s>" without a tokenizer_config.json
    from_file_only.save_hf_files(tmp_path / "bare_copy")
    config = json.loads((tmp_path / "bare_copy" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>"
    assert AutoTokenizer.from_pretrained(tmp_path / "bare_copy").eos_token_id == 2
