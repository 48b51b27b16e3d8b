"""The run's datasets from its configuration: pretraining token files (one or a blend, split or given per split),
mock tokens, SFT records or DPO preference pairs, each holding at least the samples the run will draw.

    datasets = build_datasets(config, tokenizer, log=print)     # Datasets(train, valid, test); valid/test may be None

Which kind: --dpo -> data/preference_dataset.py; --sft -> data/sft_dataset.py; --mock-data -> data_loader's
data/mock_dataset.py; else data/blended_dataset.py over the --data-path prefixes (their tokenizer checked against the
run's first), wrapped by data/packing.EodDocuments when documents restart positions, attention or the loss.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from megatron_llama.data.blended_dataset import build_train_valid_test_datasets, parse_data_path
from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.data.mock_dataset import MockGPTDataset
from megatron_llama.data.dataset_tokenizer import check_dataset_tokenizer
from megatron_llama.data.packing import EodDocuments
from megatron_llama.data.preference_dataset import PreferenceDataset
from megatron_llama.data.sft_dataset import build_sft_datasets, is_jsonl


class Datasets(NamedTuple):
    train: object
    valid: object | None
    test: object | None


def build_datasets(config, tokenizer, log: Callable[[str], None]) -> Datasets:
    """The (train, valid, test) datasets of `config` (a config.RunConfig; see the module docstring); `log` prints a
    line."""
    training, data = config.training, config.data
    train_samples = training.train_iters * training.global_batch_size
    eval_samples = config.logging.eval_iters * training.global_batch_size
    if data.dpo:
        template = get_chat_template(data.chat_template)
        train = PreferenceDataset(data.train_data_path[0], tokenizer, template, training.seq_length, train_samples,
                                  training.seed)
        log(train.describe())
        valid = None
        if data.valid_data_path and eval_samples:
            valid = PreferenceDataset(data.valid_data_path[0], tokenizer, template, training.seq_length, eval_samples,
                                      training.seed)
            log(valid.describe())
        return Datasets(train, valid, None)
    if data.sft:
        sft_paths = [data.train_data_path[0], *(data.valid_data_path or [])[:1]]
        check_dataset_tokenizer([path for path in sft_paths if not is_jsonl(path)], data.tokenizer_hash,
                                data.tokenizer_model)
        return Datasets(*build_sft_datasets(data.train_data_path[0],
                                            data.valid_data_path[0] if data.valid_data_path else None, tokenizer,
                                            training.seq_length, (train_samples, eval_samples), training.seed, log,
                                            chat_template=data.chat_template, packing=data.sft_packing))
    if data.mock_data:
        vocab = config.model.vocab_size
        return Datasets(MockGPTDataset(train_samples, training.seq_length, vocab, training.seed),
                        MockGPTDataset(eval_samples, training.seq_length, vocab, training.seed + 1)
                        if eval_samples else None, None)
    given = [paths for paths in (data.data_path, data.train_data_path, data.valid_data_path, data.test_data_path)
             if paths]
    check_dataset_tokenizer([prefix for paths in given for prefix in parse_data_path(paths)[0]],
                            data.tokenizer_hash, data.tokenizer_model)
    datasets = build_train_valid_test_datasets(
        data_path=data.data_path or None, split=data.split, seq_length=training.seq_length, seed=training.seed,
        num_samples=(train_samples, eval_samples, eval_samples), cache_path=data.data_cache_path,
        train_data_path=data.train_data_path, valid_data_path=data.valid_data_path,
        test_data_path=data.test_data_path, vocab_size=config.model.vocab_size)
    if not (data.reset_position_ids or data.reset_attention_mask or data.eod_mask_loss):
        return Datasets(*datasets)
    return Datasets(*(None if dataset is None else EodDocuments(dataset, tokenizer.eod, data.reset_position_ids,
                                                                data.reset_attention_mask, data.eod_mask_loss)
                      for dataset in datasets))
