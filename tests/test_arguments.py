"""Command-line parsing onto the typed run configuration: presets and overrides, derived values, every bad
combination's message; and the setup's checks that need files (tokenizer vocabulary, the --load checkpoint)."""
import os

import pytest
import torch

from megatron_llama.arguments import parse_args
from megatron_llama.checkpoint import CheckpointError, find_resume_checkpoint, write_model_checkpoint
from megatron_llama.config import ModelConfig, RunConfig
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args, default_ffn_hidden_size, open_tokenizer, resolve
from megatron_llama.model.llama import build_model

BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --vocab-size 128 --seq-length 16 "
        "--micro-batch-size 2 --train-iters 4 --lr 1e-3 --mock-data --device cpu").split()


def without(*flags: str) -> list[str]:
    """BASE minus `flags` and their values."""
    words, kept = list(BASE), []
    while words:
        word = words.pop(0)
        if word in flags:
            if words and not words[0].startswith("--"):
                words.pop(0)
        else:
            kept.append(word)
    return kept


def parse_with_notes(*extra: str, base=BASE) -> tuple[RunConfig, list[str]]:
    config, notes, _ = config_from_args(list(base) + [word for item in extra for word in item.split()])
    return config, notes


def parse(*extra: str, base=BASE) -> RunConfig:
    return parse_with_notes(*extra, base=base)[0]


def error_of(*extra: str, base=BASE) -> str:
    with pytest.raises(ArgumentsError) as caught:
        parse(*extra, base=base)
    return str(caught.value)


def test_preset_gives_the_model_and_explicit_flags_override_it():
    config = config_from_args("--model-preset llama2-7b --num-layers 3 --seq-length 64 --micro-batch-size 1 "
                              "--train-iters 1 --lr 1e-4 --mock-data --device cpu".split())[0].model
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size, config.vocab_size) == (3, 4096, 11008, 32000)
    assert config.untie_embeddings_and_output_weights and not config.use_stable_embedding


def test_open_llama_preset_ties_the_head_unless_untie_is_given():
    common = "--seq-length 64 --micro-batch-size 1 --train-iters 1 --lr 1e-4 --mock-data --device cpu".split()
    tied = config_from_args(["--model-preset", "openllama-7b"] + common)[0].model
    assert not tied.untie_embeddings_and_output_weights and tied.use_stable_embedding
    untied = config_from_args(["--model-preset", "openllama-7b", "--untie-embeddings-and-output-weights"] + common)[0]
    assert untied.model.untie_embeddings_and_output_weights


def test_derived_values_global_batch_micro_batches_decay_iters_and_ffn():
    config = parse("--global-batch-size 8")
    assert config.num_micro_batches == 4 and config.training.lr_decay_iters == 4
    assert config.parallel.data_parallel_size == 1
    assert parse().training.global_batch_size == 2
    assert default_ffn_hidden_size(4096) == 11008
    assert config.model.ffn_hidden_size == default_ffn_hidden_size(32)
    assert config.model.max_position_embeddings == 16


def test_num_query_groups_turns_on_grouped_query_attention():
    assert parse("--num-query-groups 2").model.kv_heads == 2
    assert parse("--group-query-attention").model.kv_heads == 1
    assert parse().model.kv_heads == 4


def test_bf16_on_cpu_trains_in_fp32_and_says_so():
    config, notes = parse_with_notes("--bf16")
    assert config.training.params_dtype == torch.float32 and config.training.precision == "fp32"
    assert any("--bf16 ignored" in note and "fp32" in note for note in notes)


def test_metrics_path_defaults_to_the_save_directory_else_the_tensorboard_directory(tmp_path):
    assert parse(f"--save {tmp_path}").logging.metrics_path == os.path.join(str(tmp_path), "metrics.jsonl")
    assert parse(f"--tensorboard-dir {tmp_path}/tb").logging.metrics_path == \
        os.path.join(f"{tmp_path}/tb", "metrics.jsonl")
    assert parse().logging.metrics_path is None


@pytest.mark.parametrize("extra, message", [
    ("--global-batch-size 5", "global batch 5 is not divisible by micro-batch 2 x data-parallel 1 = 2; "
                              "use a multiple of 2"),
    ("--num-query-groups 3", "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    ("--hidden-size 30", "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    ("--bf16 --fp16", "--bf16 and --fp16 were both given; choose one"),
    ("--tensor-model-parallel-size 2", "world size 1 is not divisible by --tensor-model-parallel-size 2"),
    ("--pipeline-model-parallel-size 2", "world size 1 is not divisible by --tensor-model-parallel-size 1 x "
                                         "--pipeline-model-parallel-size 2 = 2"),
    ("--overlap-param-gather", "--overlap-param-gather overlaps the all-gather of the distributed optimizer's "
                               "updated params; add --use-distributed-optimizer"),
    ("--recompute-method uniform", "--recompute-method apply to --recompute-granularity full only (got None)"),
    ("--recompute-granularity selective --recompute-num-layers 2",
     "--recompute-num-layers apply to --recompute-granularity full only (got selective)"),
    ("--recompute-granularity full", "--recompute-granularity full needs --recompute-method uniform"),
    ("--ddp-bucket-size 0", "--ddp-bucket-size must be positive, got 0"),
    ("--max-position-embeddings 8", "--seq-length 16 exceeds --max-position-embeddings 8"),
    ("--min-lr 0.1", "--min-lr 0.1 must lie between 0 and --lr 0.001"),
    ("--lr-warmup-iters 4", "--lr-warmup-iters 4 must be below --lr-decay-iters 4"),
    ("--tokenizer-type HuggingFaceTokenizer", "--tokenizer-type and --tokenizer-model go together"),
    ("--save-interval 2", "--save-interval needs --save DIR"),
    ("--exit-signal-handler", "--exit-signal-handler needs --save DIR"),
    ("--async-save", "--async-save needs --save DIR"),
    ("--loss-scale 128", "--loss-scale applies only to --fp16"),
    ("--tie-embeddings-and-output-weights --untie-embeddings-and-output-weights", "were both given; choose one"),
    ("--micro-batch-size 0", "--micro-batch-size must be positive, got 0"),
    ("--finetune", "--finetune needs --load"),
    ("--adam-beta2 1.0", "--adam-beta2 1.0 must lie in [0, 1)"),
    ("--data-path somewhere", "--mock-data and --data-path were both given; choose one"),
    ("--load /nonexistent/checkpoints", "--load /nonexistent/checkpoints does not exist"),
    ("--sft-packing", "--sft-packing and --chat-template apply to --sft (--chat-template also to --dpo) only"),
    ("--chat-template chatml", "--sft-packing and --chat-template apply to --sft (--chat-template also to --dpo) only"),
    ("--reset-attention-mask", "--reset-attention-mask find documents by their end-of-document tokens, which "
                               "--mock-data has none of"),
    ("--reset-position-ids --eod-mask-loss", "--reset-position-ids, --eod-mask-loss find documents"),
])
def test_bad_flag_combination_gives_its_message(extra, message):
    assert message in error_of(extra)


def test_missing_model_size_flags_without_a_preset_are_named():
    base = without("--num-layers")
    assert "--num-layers required without --model-preset" in error_of(base=base)


def test_unknown_vocabulary_is_an_error():
    base = without("--vocab-size")
    assert "vocabulary size is unknown" in error_of(base=base)


def test_no_training_data_is_an_error():
    base = without("--mock-data")
    assert "no training data" in error_of(base=base)


def test_data_path_with_missing_files_names_the_prefix(tmp_path, hf_tokenizer):
    base = without("--mock-data", "--vocab-size")
    message = error_of(f"--data-path {tmp_path}/absent --tokenizer-type HuggingFaceTokenizer "
                       f"--tokenizer-model {hf_tokenizer}", base=base)
    assert f"{tmp_path}/absent" in message and ".bin" in message


def test_parsing_opens_no_file_and_the_setup_takes_the_vocabulary_from_the_tokenizer(hf_tokenizer, monkeypatch):
    base = without("--vocab-size")
    tokenizer_flags = f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {hf_tokenizer}".split()

    def no_open(*args, **kwargs):
        raise AssertionError("parse_args opened a file")

    with monkeypatch.context() as patched:
        patched.setattr("builtins.open", no_open)
        arguments = parse_args(base + tokenizer_flags)
        resolve(parse_args(BASE), None, world_size=1)  # without a tokenizer, resolving opens no file either
    tokenizer = open_tokenizer(arguments.tokenizer_type, arguments.tokenizer_model)
    config, _ = resolve(arguments, tokenizer, world_size=1)
    assert tokenizer.vocab_size == 102 and config.model.vocab_size == 102
    with pytest.raises(ArgumentsError, match="--vocab-size 128 disagrees with the tokenizer"):
        parse(*tokenizer_flags)


def test_cuda_device_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = error_of(base=without("--device") + ["--device", "cuda"])
    assert "--device cuda was given but torch sees no CUDA GPU" in message


def test_load_of_a_checkpoint_of_another_model_shape_names_the_differences(tmp_path):
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=96, num_attention_heads=4, vocab_size=128)
    write_model_checkpoint(str(tmp_path), 0, config, build_model(config, seed=1).state_dict())
    with pytest.raises(CheckpointError) as caught:
        find_resume_checkpoint(parse(f"--load {tmp_path} --ffn-hidden-size 64"), [])
    assert "ffn_hidden_size: checkpoint 96, this run 64" in str(caught.value)


def test_load_of_an_empty_save_directory_starts_fresh_but_elsewhere_is_an_error(tmp_path):
    notes = []
    assert find_resume_checkpoint(parse(f"--load {tmp_path} --save {tmp_path}"), notes) is None
    assert any("starting from iteration 0" in note for note in notes)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint at all"):
        find_resume_checkpoint(parse(f"--load {tmp_path} --save {other}"), [])


@pytest.fixture
def hf_tokenizer(tmp_path):
    """A 102-entry word-level tokenizer.json (t0..t99, </s>, <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(100)}
    vocab.update({"</s>": 100, "<unk>": 101})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)
