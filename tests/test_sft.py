"""Instruction tuning: response-only loss masks, masked-mean loss, record errors, and a short --sft run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed  # tests/ is on sys.path under pytest
from trainer_runs import assert_same_run, metrics, run_in_process
from megatron_llama.config import ModelConfig
from megatron_llama.data.chat_template import CHAT_TEMPLATES
from megatron_llama.data.sft_dataset import SFTDataError, SFTDataset
from megatron_llama.data.dataset_tokenizer import tokenizer_record_path
from megatron_llama.data.tokenizer import build_tokenizer, tokenizer_hash
from megatron_llama.data_loader import collate
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.pretrain import EXIT_BAD_DATA, main
from megatron_llama.objectives.language_model import loss_token_count, token_mean_loss
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "sft_sample.jsonl")  # outside examples/data, which the quickstart reads whole
SEQ_LENGTH = 48


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A SentencePiece model (bos 1, eos 2, no pad) trained on the sample's text, as the quickstart's would be."""
    import sentencepiece

    texts = []
    with open(SAMPLE, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            texts += [record["prompt"], record["response"]] if "prompt" in record else [
                message["content"] for message in record["messages"]]
    prefix = tmp_path_factory.mktemp("sft_tokenizer") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return build_tokenizer("SentencePieceTokenizer", tokenizer_path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def learned_and_prompt(sample):
    """(tokens the mask learns, tokens it does not) of a sample, padding cut off."""
    text, mask = sample["text"], sample["loss_mask"].astype(bool)
    return text[mask].tolist(), text[~mask].tolist()


def test_record_is_rendered_with_the_openllama_template_and_only_the_answer_and_its_eos_are_learned(tmp_path,
                                                                                                     tokenizer):
    prompt, response = "What does len() return?", "The number of items."
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": prompt, "response": response}])
    sample = SFTDataset(path, tokenizer, SEQ_LENGTH, num_samples=1, seed=0)[0]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ids = CHAT_TEMPLATES["openllama"].encode(messages, tokenizer, add_generation_prompt=False)
    assert ids[0] == tokenizer.bos and ids[-1] == tokenizer.eod and len(ids) < SEQ_LENGTH + 1
    assert sample["text"][:len(ids)].tolist() == ids
    learned, _ = learned_and_prompt(sample)
    assert learned[-1] == tokenizer.eod and tokenizer.detokenize(learned[:-1]).strip() == response
    prompt_ids = CHAT_TEMPLATES["openllama"].encode(messages[:1], tokenizer, add_generation_prompt=True)
    assert sample["loss_mask"][:len(ids)].tolist() == [0] * (len(ids) - len(learned)) + [1] * len(learned)
    assert ids[:len(ids) - len(learned)] == prompt_ids[:len(ids) - len(learned)]  # the prompt and "system:" unlearned
    assert not sample["loss_mask"][len(ids):].any()

    tokens, labels = collate([sample])
    assert tokens[0].tolist() == sample["text"][:-1].tolist()
    assert labels[0][labels[0] != -100].tolist() == learned


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_messages_record_learns_exactly_the_assistant_turns_and_their_end_markers(tmp_path, tokenizer, template):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "good day"}, {"role": "user", "content": "unanswered"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    sample = SFTDataset(path, tokenizer, 4 * SEQ_LENGTH, num_samples=1, seed=0, chat_template=template)[0]
    ids = CHAT_TEMPLATES[template].encode(messages[:5], tokenizer, add_generation_prompt=False)
    assert sample["text"][:len(ids)].tolist() == ids  # the trailing user turn teaches nothing: left out
    mask = sample["loss_mask"]
    assert not mask[len(ids):].any()
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # [start, end) of each learned stretch
    answers = [tokenizer.detokenize(sample["text"][start:end].tolist()) for start, end in spans.reshape(-1, 2)]
    assert len(answers) == 2
    for answer, expected in zip(answers, ("hello there", "good day")):  # the answer, none of the prompt
        assert answer.strip().startswith(expected) and "hi" not in answer and "bye" not in answer
    if template != "chatml":  # openllama and llama2 end an answer with </s>
        assert [sample["text"][end - 1] for _, end in spans.reshape(-1, 2)] == [tokenizer.eod] * 2


def test_long_record_is_cut_after_its_last_answer_that_fits_and_one_whose_first_answer_cannot_is_dropped(
        tmp_path, tokenizer):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "moon"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "moon light " * 100}]
    records = [{"messages": turns}, {"prompt": "Hi", "response": "moon"},
               {"prompt": "word " * 200, "response": "a"}]
    dataset = SFTDataset(write_jsonl(tmp_path / "long.jsonl", records), tokenizer, SEQ_LENGTH, num_samples=2, seed=0)
    assert len(dataset.records) == 2 and dataset.truncated == 1 and dataset.dropped == 1
    first_turn = CHAT_TEMPLATES["openllama"].encode(turns[:2], tokenizer, add_generation_prompt=False)
    kept = sorted(len(ids) for ids, _ in dataset.records)
    assert kept == [len(first_turn)] * 2  # the cut record is its first exchange, exactly as the short record
    for index in range(2):
        sample = dataset[index]
        assert sample["text"].shape == sample["loss_mask"].shape == (SEQ_LENGTH + 1,)
        assert sample["text"][sample["loss_mask"].nonzero()[0][-1]] == tokenizer.eod  # every answer keeps its </s>
    assert "1 longer than --seq-length + 1 = 49 tokens cut after their last assistant turn" in dataset.describe()
    assert "1 left out: their first answer does not fit with its end marker" in dataset.describe()
    assert f"--seq-length {dataset.longest - 1} keeps all whole" in dataset.describe()


def test_file_whose_every_record_is_too_long_says_to_raise_seq_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi", "response": "moon light " * 100}])
    with pytest.raises(SFTDataError, match="the first answer of all 1 records does not fit"):
        SFTDataset(path, tokenizer, SEQ_LENGTH, num_samples=3, seed=0)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "malformed JSON"),
    (json.dumps({"prompt": "q"}), "response"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "assistant"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "needs a user message before it"),
    (json.dumps({"messages": [{"role": "robot", "content": "a"}]}), "role"),
    (json.dumps({"prompt": "q", "response": ""}), "non-empty string \"response\""),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
     "assistant message 1 has an empty \"content\""),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": "q2"}, {"role": "assistant", "content": ""}]}),
     "assistant message 3 has an empty \"content\""),
])
def test_bad_record_error_names_file_and_line(tmp_path, tokenizer, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, "", bad_line])
    with pytest.raises(SFTDataError, match=f"bad.jsonl line 3: .*{message}"):
        SFTDataset(path, tokenizer, SEQ_LENGTH, num_samples=1, seed=0)


def test_train_step_loss_is_the_masked_mean_cross_entropy_over_the_global_batch(tokenizer):
    dataset = SFTDataset(SAMPLE, tokenizer, SEQ_LENGTH, num_samples=4, seed=3)
    tokens, labels = collate([dataset[index] for index in range(4)])
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                         vocab_size=tokenizer.vocab_size)
    model = build_model(config, seed=7)
    buffers = DataParallelBuffers(model)
    optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                   clip_grad=0.0)
    batches = [(tokens[:2], labels[:2]), (tokens[2:], labels[2:])]  # two micro-batches of unequal response counts
    count = loss_token_count(batches, ParallelLayout.single_process(), torch.device("cpu"))
    assert count == int((labels != -100).sum()) < labels.numel()
    loss, _ = train_step(model, optimizer, batches, lr=1e-2, buffers=buffers, loss_fn=token_mean_loss(count),
                         layout=ParallelLayout.single_process())

    with torch.no_grad():
        logits = build_model(config, seed=7)(tokens).float()[..., :tokenizer.vocab_size]  # [b, s, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [b, s]
    by_hand = float(-(picked * mask).sum() / mask.sum())
    assert loss == pytest.approx(by_hand, rel=1e-5)
    assert by_hand == pytest.approx(float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)),
                                    rel=1e-5)


def test_sft_run_from_the_command_line_lowers_the_response_loss(tmp_path, tokenizer_path):
    metrics = tmp_path / "metrics.jsonl"
    argv = ("--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --device cpu "
            f"--seq-length {SEQ_LENGTH} --micro-batch-size 4 --global-batch-size 8 --train-iters 40 --lr 1e-2 --min-lr 3e-3 "
            "--lr-warmup-iters 3 --log-interval 1 --eval-iters 1 --eval-interval 40 --seed 5").split() + [
        "--sft", "--train-data-path", SAMPLE, "--valid-data-path", SAMPLE, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tokenizer_path, "--metrics-path", str(metrics)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in open(metrics)]
    train = [row["loss"] for row in rows if row["kind"] == "train"]
    valid = [row["loss"] for row in rows if row["kind"] == "valid"]
    assert len(train) == 40 and len(valid) == 1
    assert sum(train[-3:]) / 3 < 0.5 * sum(train[:3]) / 3
    assert valid[0] < 0.5 * train[0]  # the validation file is the training file: its responses were learned


def sft_layout_flags(tokenizer_path, save, *layout):
    return ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --device cpu "
            f"--seq-length {SEQ_LENGTH} --micro-batch-size 2 --global-batch-size 8 --train-iters 3 --lr 1e-2 "
            "--log-interval 1 --eval-iters 1 --eval-interval 3 --seed 5").split() + [
        "--sft", "--train-data-path", SAMPLE, "--valid-data-path", SAMPLE, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", tokenizer_path, "--save", save, *layout]


def assert_layout_losses_equal_one_process(tmp_path, tokenizer_path, layouts: dict, *common: str):
    """Run one process, then each layout on 2 ranks (sft_layout_flags + `common`); the losses, gradient norms and
    final weights must agree."""
    def run_layouts():
        return [main(sft_layout_flags(tokenizer_path, str(tmp_path / name), *flags, *common))
                for name, flags in layouts.items()]

    run_in_process([sft_layout_flags(tokenizer_path, str(tmp_path / "one"), *common)])
    assert run_distributed(run_layouts, world_size=2) == [[0] * len(layouts)] * 2
    assert len(metrics(tmp_path / "one")) == 4
    for name in layouts:
        assert_same_run(tmp_path / name, tmp_path / "one")


def test_sft_losses_with_data_and_pipeline_parallelism_equal_one_process(tmp_path, tokenizer_path):
    """The response-token count is summed over data-parallel ranks and known on every pipeline stage."""
    assert_layout_losses_equal_one_process(tmp_path, tokenizer_path,
                                           {"dp2": [], "pp2": ["--pipeline-model-parallel-size", "2"]})


def test_packed_sft_losses_at_tensor_pipeline_and_data_parallel_layouts_equal_one_process(tmp_path, tokenizer_path,
                                                                                        tokenizer):
    """Document ids and positions reach every pipeline stage and tensor rank with the micro-batch."""
    rows = SFTDataset(SAMPLE, tokenizer, 4 * SEQ_LENGTH, num_samples=8, seed=5, packing=True)
    for row in (rows[index] for index in range(8)):  # each row holds two or more records with answers
        assert len(set(row["document_ids"][row["loss_mask"] == 1].tolist())) >= 2
    layouts = {"dp2": [], "pp2": ["--pipeline-model-parallel-size", "2"],
               "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"]}
    assert_layout_losses_equal_one_process(tmp_path, tokenizer_path, layouts,
                                           "--sft-packing", "--seq-length", str(4 * SEQ_LENGTH))


def test_sft_flag_rejects_a_binary_corpus_and_a_missing_file(tmp_path, tokenizer_path, capsys):
    base = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 1 "
            "--train-iters 1 --lr 1e-3 --device cpu --sft --tokenizer-type SentencePieceTokenizer").split() + [
        "--tokenizer-model", tokenizer_path]
    assert main(base + ["--data-path", str(tmp_path / "corpus_text_document")]) == 2
    assert "--sft takes --train-data-path" in capsys.readouterr().err
    assert main(base + ["--train-data-path", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err


def run_preprocess_sft(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_sft.py"), *argv],
                          capture_output=True, text=True)


def test_preprocessed_files_give_the_samples_of_the_jsonl_file_packed_or_not(tmp_path, tokenizer_path, tokenizer):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "moon"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "moon light " * 40}]
    records = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")] + [
        {"messages": turns}, {"prompt": "word " * 200, "response": "a"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    prefix = str(tmp_path / "out" / "sft")
    done = run_preprocess_sft("--input", path, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                              "--tokenizer-model", tokenizer_path, "--chat-template", "llama2", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert f"{len(records)} records" in done.stdout
    for packing in (False, True):
        options = dict(num_samples=40, seed=4, chat_template="llama2", packing=packing)
        from_jsonl = SFTDataset(path, tokenizer, 3 * SEQ_LENGTH, **options)
        from_files = SFTDataset(prefix, tokenizer, 3 * SEQ_LENGTH, **options)
        assert (from_files.truncated, from_files.dropped, from_files.longest) == \
            (from_jsonl.truncated, from_jsonl.dropped, from_jsonl.longest)
        assert from_jsonl.truncated >= 1 and from_jsonl.dropped == 1
        for index in range(40):
            expected, got = from_jsonl[index], from_files[index]
            assert set(got) == set(expected)
            for field in expected:
                assert got[field].tolist() == expected[field].tolist(), (packing, index, field)


def test_preprocess_sft_names_the_file_and_line_of_a_bad_record_and_leaves_no_output(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q"}])
    prefix = tmp_path / "out" / "sft"
    done = run_preprocess_sft("--input", path, "--output-prefix", str(prefix), "--tokenizer-type",
                              "SentencePieceTokenizer", "--tokenizer-model", tokenizer_path)
    assert done.returncode == 1 and f"{path} line 2: needs a string \"prompt\"" in done.stderr
    assert os.listdir(prefix.parent) == []


def test_preprocess_sft_refuses_an_empty_assistant_turn_naming_the_file_and_line(tmp_path, tokenizer_path):
    empty_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, empty_answer])
    prefix = tmp_path / "out" / "sft"
    done = run_preprocess_sft("--input", path, "--output-prefix", str(prefix), "--tokenizer-type",
                              "SentencePieceTokenizer", "--tokenizer-model", tokenizer_path)
    assert done.returncode == 1 and f"{path} line 2: assistant message 1 has an empty \"content\"" in done.stderr
    assert os.listdir(prefix.parent) == []


def test_preprocessed_sft_files_record_their_tokenizer_and_another_one_is_refused(tmp_path, tokenizer_path,
                                                                                   tokenizer, capsys):
    prefix = str(tmp_path / "sft")
    done = run_preprocess_sft("--input", SAMPLE, "--output-prefix", prefix, "--tokenizer-type",
                              "SentencePieceTokenizer", "--tokenizer-model", tokenizer_path)
    assert done.returncode == 0, done.stderr
    record_path = tokenizer_record_path(prefix)
    with open(record_path) as handle:
        record = json.load(handle)
    assert record["tokenizer_hash"] == tokenizer_hash(tokenizer)
    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 160 --micro-batch-size 2 "
            "--train-iters 1 --lr 1e-3 --device cpu --eval-iters 0 --sft --tokenizer-type SentencePieceTokenizer"
            ).split() + [
        "--tokenizer-model", tokenizer_path, "--train-data-path", prefix]
    assert main(argv) == 0
    with open(record_path, "w") as handle:  # as if another tokenizer of the same size had made the files
        json.dump(dict(record, tokenizer_hash="0" * 64, tokenizer_model="other.model"), handle)
    assert main(argv) == EXIT_BAD_DATA
    assert f"{prefix} was tokenized with" in capsys.readouterr().err
