"""DPO (--dpo): preference pairs rendered with the chat template, and the first step's loss and gradients equal to
TRL's DPOTrainer on the same tiny Llama (exported to Hugging Face) and the same pairs, for the sigmoid and IPO losses.
"""
import dataclasses
import json

import pytest
import torch

from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.data.preference_dataset import PreferenceDataError, PreferenceDataset, encode_answer, parse_pair
from megatron_llama.data.tokenizer import build_tokenizer
from megatron_llama.data_loader import collate
from megatron_llama.hf_conversion import save_hf_checkpoint, to_hf_state_dict
from megatron_llama.model.llama import build_model
from megatron_llama.objectives.dpo import DPOObjective
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import forward_backward
from test_hf_conversion import BASE, write_tokenizer  # tests/ is on sys.path under pytest
from test_model import sharpen_

CONFIG = dataclasses.replace(BASE, untie_embeddings_and_output_weights=True, num_query_groups=2)
SEQ_LENGTH = 24
# Some responses hold ids past 256, so at tp=2 (300 padded to 512) some labels sit on tensor rank 1.
PAIRS = [
    {"prompt": "w3 w4 w5", "chosen": "w10 w271", "rejected": "w12 w288 w14"},
    {"messages": [{"role": "user", "content": "w20"}, {"role": "assistant", "content": "w21 w22"},
                  {"role": "user", "content": "w23 w24"}], "chosen": "w30", "rejected": "w31 w32 w33 w34"},
    {"prompt": [{"role": "user", "content": "w40 w41"}], "chosen": [{"role": "assistant", "content": "w42 w43 w44"}],
     "rejected": [{"role": "assistant", "content": "w45"}]},
    {"prompt": "w50", "chosen": "w51 w52 w263 w54 w55", "rejected": "w299 w57"},
]


def write_jsonl(path, records):
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("dpo") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return build_tokenizer("HuggingFaceTokenizer", str(tokenizer_folder))


def test_a_pair_is_two_adjacent_rows_masked_on_the_answers_only(tmp_path, tokenizer):
    dataset = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", PAIRS[:1]), tokenizer, get_chat_template("openllama"),
                                SEQ_LENGTH, num_samples=2, seed=0)
    tokens, labels = collate([dataset[0], dataset[1]])
    assert tokens.shape == labels.shape == (4, SEQ_LENGTH)
    assert torch.equal(tokens[0], tokens[2]) and torch.equal(tokens[1], tokens[3])  # chosen, rejected, chosen, ...
    answers = [labels[row][labels[row] != -100].tolist() for row in range(2)]
    assert answers == [[10, 271, tokenizer.eod], [12, 288, 14, tokenizer.eod]]


def test_pairs_too_long_are_left_out_and_counted(tmp_path, tokenizer):
    long_pair = {"prompt": " ".join(["w5"] * 30), "chosen": "w6", "rejected": "w7"}
    dataset = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", PAIRS + [long_pair]), tokenizer,
                                get_chat_template("openllama"), SEQ_LENGTH, num_samples=4, seed=0)
    assert len(dataset.pairs) == len(PAIRS) and dataset.too_long == 1
    assert "1 longer than --seq-length + 1 tokens left out" in dataset.describe()


def test_pairs_whose_chosen_equals_rejected_are_counted_and_reported(tmp_path, tokenizer):
    same = {"prompt": "w7", "chosen": "w8 w9", "rejected": [{"role": "assistant", "content": "w8 w9"}]}
    dataset = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", PAIRS[:2] + [same, same]), tokenizer,
                                get_chat_template("openllama"), SEQ_LENGTH, num_samples=4, seed=0)
    assert len(dataset.pairs) == 4 and dataset.identical == 2
    assert f"in 2 of them (the first at {tmp_path / 'p.jsonl'} line 3) chosen equals rejected" in dataset.describe()


def test_a_file_whose_every_pair_has_chosen_equal_to_rejected_is_refused(tmp_path, tokenizer):
    same = [dict(pair, rejected=pair["chosen"]) for pair in PAIRS]
    with pytest.raises(PreferenceDataError, match="p.jsonl: in all 4 pairs the chosen and rejected answers are the "
                                                  "same"):
        PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", same), tokenizer, get_chat_template("openllama"),
                          SEQ_LENGTH, num_samples=4, seed=0)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: malformed JSON"),
    (json.dumps({"prompt": "w3", "chosen": "w4"}), "line 2: \"rejected\" must be a non-empty string"),
    (json.dumps({"chosen": "w4", "rejected": "w5"}), "line 2: needs a \"prompt\""),
    (json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}), "line 2: message 0"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, tokenizer, line, message):
    with pytest.raises(PreferenceDataError, match=message):
        PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], line]), tokenizer,
                          get_chat_template("openllama"), SEQ_LENGTH, num_samples=2, seed=0)


def our_first_step(tmp_path, tokenizer, policy, reference, loss_type: str, beta: float):
    """Loss and gradients (by our parameter names) of one DPO step over PAIRS, as two micro-batches of two pairs."""
    dataset = PreferenceDataset(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tokenizer, get_chat_template("openllama"),
                                SEQ_LENGTH, num_samples=len(PAIRS), seed=0)
    order = [dataset._pair_index(index) for index in range(len(PAIRS))]
    assert sorted(order) == list(range(len(PAIRS)))
    samples = [{"text": text, "loss_mask": mask} for text, mask in dataset.pairs]
    batches = [collate(samples[:2]), collate(samples[2:])]
    buffers = DataParallelBuffers(policy)
    optimizer, _ = build_optimizer(policy, buffers, state.current_layout(),
                                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                   clip_grad=0.0)
    objective = DPOObjective(ParallelLayout.single_process(), reference, beta, loss_type,
                             pairs_in_global_batch=len(PAIRS))
    optimizer.zero_grad()
    loss = forward_backward(policy, optimizer, objective.prepare(batches), buffers, objective.loss_fn,
                            ParallelLayout.single_process())
    grads = {name: param.main_grad.clone() for name, param in policy.named_parameters()}
    return float(loss), to_hf_state_dict(CONFIG, grads), objective.metrics(torch.device("cpu"))


def trl_first_step(tmp_path, tokenizer, tokenizer_folder, policy, reference, loss_type: str, beta: float):
    """TRL's DPOTrainer loss and gradients on the same pairs: its collator over our tokenization, its loss."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    for name, model in (("policy", policy), ("reference", reference)):
        save_hf_checkpoint(tmp_path / name, CONFIG, model.state_dict())
    hf_policy = LlamaForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    hf_reference = LlamaForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, bf16=False, dataset_num_proc=None)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_reference, args=args,
                         train_dataset=Dataset.from_list([{"prompt": "w3", "chosen": "w4", "rejected": "w5"}]),
                         processing_class=AutoTokenizer.from_pretrained(tokenizer_folder))
    template = get_chat_template("openllama")
    examples = []
    for number, record in enumerate(PAIRS):
        prompt, chosen, rejected = parse_pair(record, f"pair {number}")
        (chosen_ids, start), (rejected_ids, rejected_start) = (encode_answer(prompt, answer, template, tokenizer)
                                                               for answer in (chosen, rejected))
        assert start == rejected_start
        examples.append({"prompt_ids": chosen_ids[:start], "chosen_ids": chosen_ids[start:],
                         "rejected_ids": rejected_ids[start:]})
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.eod)(examples)
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), {name: param.grad for name, param in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_first_step_loss_and_gradients_equal_trl_dpo_trainer(tmp_path, tokenizer, tokenizer_folder, loss_type, beta):

    def models():  # the policy and the reference differ, so the rewards are not zero
        return sharpen_(build_model(CONFIG, seed=1), seed=1, std=0.05), sharpen_(build_model(CONFIG, seed=2), seed=2,
                                                                                std=0.05)

    ours_loss, ours_grads, metrics = our_first_step(tmp_path, tokenizer, *models(), loss_type, beta)
    trl_loss, trl_grads = trl_first_step(tmp_path, tokenizer, tokenizer_folder, *models(), loss_type, beta)
    assert ours_loss == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
    assert set(ours_grads) == set(trl_grads)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # the mean margin against the difference of the mean rewards: float32 rounds each operand to about 1e-7 of
    # itself, and the difference of two close numbers keeps that absolute error
    chosen, rejected = metrics["rewards_chosen"], metrics["rewards_rejected"]
    assert metrics["reward_margin"] == pytest.approx(chosen - rejected, rel=1e-6,
                                                     abs=1e-6 * max(abs(chosen), abs(rejected)))
    assert metrics["reward_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
