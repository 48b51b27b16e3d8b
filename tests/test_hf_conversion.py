"""Hugging Face conversion: logits parity with transformers.LlamaForCausalLM (fp32, max abs diff
1e-4) in both directions, tied and untied, GQA and MHA, rope base != 10000, a vocabulary that is
not a multiple of 128; refusals; sharded export; the two command-line tools."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from megatron_llama.checkpoint import read_model_checkpoint, write_model_checkpoint
from megatron_llama.config import DataConfig, ModelConfig, RunConfig
from megatron_llama.hf_conversion import (ConversionError, load_hf_checkpoint, load_hf_weights, model_config_from_hf,
                                          save_hf_checkpoint)
from megatron_llama.model.llama import LlamaModel, build_model
from test_model import sharpen_, tokens  # tests/ is on sys.path under pytest

VOCAB = 300  # padded to 384: the export must strip the padding rows
BASE = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, vocab_size=VOCAB,
                   rotary_base=5000.0, norm_epsilon=1e-6)
LAYOUTS = [pytest.param(tied, groups, id=f"{'tied' if tied else 'untied'}-{'gqa' if groups else 'mha'}")
           for tied in (False, True) for groups in (None, 2)]
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def config_for(tied: bool, groups: int | None) -> ModelConfig:
    return dataclasses.replace(BASE, untie_embeddings_and_output_weights=not tied, num_query_groups=groups)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_logits(folder, x) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(x).logits


def our_logits(model: LlamaModel, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[..., :VOCAB]


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor):
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied, groups", LAYOUTS)
def test_export_logits_match_transformers(tmp_path, tied, groups):
    config = config_for(tied, groups)
    model = sharpen_(build_model(config, seed=1))
    save_hf_checkpoint(tmp_path / "hf", config, model.state_dict())
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["vocab_size"] == VOCAB and hf_config["tie_word_embeddings"] == tied
    assert hf_config["num_key_value_heads"] == (groups or 4) and hf_config["rope_theta"] == 5000.0
    x = tokens(seq=24, vocab=VOCAB)
    assert_parity(our_logits(model, x), hf_logits(tmp_path / "hf", x))


@pytest.mark.parametrize("tied, groups", LAYOUTS)
def test_import_logits_match_transformers(tmp_path, tied, groups):
    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=groups or 4, rms_norm_eps=1e-6,
                            rope_theta=5000.0, tie_word_embeddings=tied, max_position_embeddings=128)
    torch.manual_seed(0)
    hf_model = sharpen_(LlamaForCausalLM(hf_config))
    hf_model.save_pretrained(tmp_path / "hf")
    config, state_dict, _ = load_hf_checkpoint(tmp_path / "hf")
    assert config == dataclasses.replace(config_for(tied, groups), max_position_embeddings=128)
    assert torch.count_nonzero(state_dict["embedding.weight"][VOCAB:]) == 0  # zero padding rows
    model = LlamaModel(config)
    model.load_state_dict(state_dict)
    x = tokens(seq=24, vocab=VOCAB)
    with torch.no_grad():
        assert_parity(our_logits(model, x), hf_model(x).logits)


def test_export_then_import_restores_every_weight(tmp_path):
    config = config_for(tied=False, groups=2)
    original = build_model(config, seed=2).state_dict()
    save_hf_checkpoint(tmp_path / "hf", config, original)
    restored_config, restored, _ = load_hf_checkpoint(tmp_path / "hf")
    assert restored_config == config and set(restored) == set(original)
    for name, value in original.items():
        rows = VOCAB if name in ("embedding.weight", "output.weight") else value.shape[0]
        assert torch.equal(restored[name][:rows], value[:rows]), name


def test_export_of_a_stable_embedding_model_is_refused(tmp_path):
    config = dataclasses.replace(BASE, use_stable_embedding=True)
    with pytest.raises(ConversionError, match="stable embedding"):
        save_hf_checkpoint(tmp_path / "hf", config, build_model(config, seed=3).state_dict())
    assert not (tmp_path / "hf").exists()


def test_sharded_export_writes_an_index_that_transformers_loads(tmp_path):
    config = config_for(tied=False, groups=2)
    model = sharpen_(build_model(config, seed=4))
    save_hf_checkpoint(tmp_path / "hf", config, model.state_dict(), max_shard_size="40KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {path.name for path in shards}
    assert set(load_hf_weights(tmp_path / "hf")) == set(index["weight_map"])
    x = tokens(seq=12, vocab=VOCAB)
    assert_parity(our_logits(model, x), hf_logits(tmp_path / "hf", x))


def test_export_in_bfloat16_writes_bfloat16_weights(tmp_path):
    config = config_for(tied=True, groups=None)
    save_hf_checkpoint(tmp_path / "hf", config, build_model(config, seed=5).state_dict(), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_hf_weights(tmp_path / "hf").values())


def test_export_into_a_folder_with_files_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("keep me")
    config = config_for(tied=True, groups=None)
    with pytest.raises(ConversionError, match="already holds files"):
        save_hf_checkpoint(tmp_path / "hf", config, build_model(config, seed=5).state_dict())


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "mistral"}, "only 'llama'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' scales the rotary embeddings"),
    ({"sliding_window": 64, "max_position_embeddings": 128}, "sliding_window 64 limits attention to the last 64"),
    ({"mlp_bias": True}, "mlp_bias True adds biases to the MLP"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 rotates only part of each head"),
    ({"rope_theta": "10000"}, "rope_theta '10000' should be a positive number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps -1e-06 should be a positive number"),
])
def test_hf_configs_our_model_cannot_express_are_refused(change, message):
    hf_config = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                     num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf({**hf_config, **change})


@pytest.mark.parametrize("change", [{"sliding_window": 4096, "max_position_embeddings": 4096},
                                    {"sliding_window": 64, "use_sliding_window": False}, {"sliding_window": None},
                                    {"rope_scaling": {"rope_type": "default"}}, {"hidden_act": "swish"}],
                         ids=["window_covers_the_context", "window_switched_off", "no_window", "default_rope",
                              "swish_is_silu"])
def test_hf_config_fields_that_leave_the_math_unchanged_are_accepted(change):
    hf_config = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
                     num_hidden_layers=2, num_attention_heads=4)
    assert model_config_from_hf({**hf_config, **change}).hidden_size == 64


def tied_config_folder(tmp_path, head_equals_embedding: bool) -> Path:
    """A Hugging Face folder whose config.json says tie_word_embeddings but whose weights hold lm_head.weight."""
    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000.0,
                            tie_word_embeddings=False)
    torch.manual_seed(2)
    hf_model = sharpen_(LlamaForCausalLM(hf_config))
    if head_equals_embedding:
        with torch.no_grad():
            hf_model.lm_head.weight.copy_(hf_model.model.embed_tokens.weight)
    hf_model.save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), tie_word_embeddings=True)))
    return tmp_path / "hf"


def test_a_tied_config_whose_file_holds_a_different_head_converts_untied_with_transformers_logits(tmp_path):
    folder = tied_config_folder(tmp_path, head_equals_embedding=False)
    with pytest.warns(UserWarning, match="tie_word_embeddings is true but lm_head.weight differs"):
        config, state_dict, _ = load_hf_checkpoint(folder)
    assert config.untie_embeddings_and_output_weights and "output.weight" in state_dict
    model = LlamaModel(config)
    model.load_state_dict(state_dict)
    x = tokens(seq=16, vocab=VOCAB)
    assert_parity(our_logits(model, x), hf_logits(folder, x))


def test_a_tied_config_whose_file_repeats_the_embedding_as_the_head_stays_tied(tmp_path):
    config, state_dict, _ = load_hf_checkpoint(tied_config_folder(tmp_path, head_equals_embedding=True))
    assert not config.untie_embeddings_and_output_weights and "output.weight" not in state_dict


def test_import_of_weights_that_do_not_match_config_names_the_tensor(tmp_path):
    config = config_for(tied=False, groups=None)
    save_hf_checkpoint(tmp_path / "hf", config, build_model(config, seed=6).state_dict())
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(hf_config, num_hidden_layers=3)))
    with pytest.raises(ConversionError, match="model.layers.2.self_attn.q_proj.weight"):
        load_hf_checkpoint(tmp_path / "hf")


def write_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}))
    return folder


def test_convert_to_hf_cli_exports_a_parallel_checkpoint_with_its_tokenizer(tmp_path):
    config = config_for(tied=False, groups=2)
    model = sharpen_(build_model(config, seed=7))
    tokenizer_folder = write_tokenizer(tmp_path / "tokenizer")
    recorded = RunConfig(data=DataConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tokenizer_folder)))
    write_model_checkpoint(str(tmp_path / "ckpt"), 5, config, model.state_dict(), recorded,
                           tensor_parallel_size=2, pipeline_parallel_size=2)
    load_tool("convert_to_hf").main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")])
    x = tokens(seq=16, vocab=VOCAB)
    assert_parity(our_logits(model, x), hf_logits(tmp_path / "hf", x))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("w7 w299 w3", add_special_tokens=False)["input_ids"] == [7, 299, 3]


def test_convert_to_hf_cli_refuses_stable_embedding_with_a_message(tmp_path, capsys):
    config = dataclasses.replace(BASE, use_stable_embedding=True)
    write_model_checkpoint(str(tmp_path / "ckpt"), 1, config, build_model(config, seed=8).state_dict())
    with pytest.raises(SystemExit, match="stable embedding"):
        load_tool("convert_to_hf").main(["--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_convert_from_hf_cli_writes_a_tp2_checkpoint_with_transformers_logits(tmp_path):
    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000.0)
    torch.manual_seed(1)
    hf_model = sharpen_(LlamaForCausalLM(hf_config))
    hf_model.save_pretrained(tmp_path / "hf")
    write_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    load_tool("convert_from_hf").main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt"),
                                       "--target-tensor-parallel-size", "2"])
    config, state_dict, saved = read_model_checkpoint(str(tmp_path / "ckpt"))
    assert saved.parallel.tensor_model_parallel_size == 2 and saved.data.tokenizer_type == "HuggingFaceTokenizer"
    model = LlamaModel(config)
    model.load_state_dict(state_dict)
    x = tokens(seq=16, vocab=VOCAB)
    with torch.no_grad():
        assert_parity(our_logits(model, x), hf_model(x).logits)
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        load_tool("convert_from_hf").main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")])
