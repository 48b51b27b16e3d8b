"""The typed run configuration: a JSON round trip gives the same configuration, unknown sections or fields are
named, the flat argument record of older checkpoints maps onto the sections, and the model FLOPs per token (the
base of every MFU figure) equal a count made by hand."""
import dataclasses
import json
import os

import pytest

from megatron_llama.config_resolve import config_from_args
from megatron_llama.config import ModelConfig, RunConfig

FLAGS = ("--model-preset tiny --seq-length 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 5 "
         "--lr 1e-3 --mock-data --device cpu --num-layers 4").split()


def test_json_round_trip_gives_the_same_configuration():
    config, _, _ = config_from_args(FLAGS + ["--recompute-granularity", "full", "--recompute-method", "uniform"])
    restored = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.training.recompute_num_layers == 1 and restored.num_micro_batches == 4


def test_unknown_sections_and_fields_are_named():
    values = RunConfig().to_dict()
    with pytest.raises(ValueError, match="sections this version does not know: future"):
        RunConfig.from_dict({**values, "future": {}}, "config.json")
    values["training"]["warp_speed"] = 9
    with pytest.raises(ValueError, match="describes 'training' with fields this version does not know: warp_speed"):
        RunConfig.from_dict(values, "config.json")


def test_flat_argument_record_maps_onto_the_sections():
    with open(os.path.join(os.path.dirname(__file__), "data", "legacy_args.json")) as handle:
        record = json.load(handle)
    config = RunConfig.from_flat_arguments(record)
    assert config.model == ModelConfig(**record["model"])
    assert (config.training.micro_batch_size, config.training.lr_decay_iters, config.training.precision) == (2, 2, "fp32")
    assert config.parallel.data_parallel_size == 1 and config.data.mock_data and config.checkpoint.save_interval == 1


def test_stage_split_follows_the_parallel_section():
    config, _, _ = config_from_args(FLAGS)
    config = dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1))
    assert config.stage_split().ranges == (((0, 1), (2, 3)), ((1, 2), (3, 4)))


def hand_counted_flops_per_token(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab_rows: int,
                                 seq: int) -> int:
    """Model FLOPs per token of one training step, counted from the network: a matmul of a token's [n] by an
    [n, m] weight is n x m multiply-adds, 2 flops each; the backward costs twice the forward (the gradient of the
    input and of the weight). Embedding lookups, norms, rotary and softmax are not matmuls and not counted."""
    head_dim = hidden // heads
    query, key_value = heads * head_dim, kv_heads * head_dim  # GQA: fewer key/value heads, narrower k and v
    projections = hidden * query + 2 * hidden * key_value + query * hidden  # q; k and v; o
    swiglu = 3 * hidden * ffn  # gate and up [h, f], down [f, h]
    scores_and_values = 2 * seq * heads * head_dim  # q.k against s keys, then s values summed, in every query head
    output_head = hidden * vocab_rows  # the padded vocabulary's rows are computed too; tied or not, it is a matmul
    forward = 2 * (layers * (projections + swiglu + scores_and_values) + output_head)
    return 3 * forward


def test_flops_per_token_of_a_grouped_query_model_is_the_hand_count():
    llama2_70b = ModelConfig(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                             num_query_groups=8, vocab_size=32000)
    count = hand_counted_flops_per_token(80, 8192, 28672, 64, 8, 32000, seq=4096)
    assert count == 444_491_366_400  # 6 x 68,713,185,280 matmul weights + 12 x 80 x 8192 x 4096
    assert llama2_70b.flops_per_token(4096) == count


def test_flops_per_token_of_a_tied_embedding_model_counts_the_output_head_once():
    openllama_7b = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                               vocab_size=100000, untie_embeddings_and_output_weights=False, use_stable_embedding=True)
    count = hand_counted_flops_per_token(32, 4096, 11008, 32, 32, 100096, seq=2048)  # 100000 padded to 782 x 128
    assert count == 44_537_217_024  # 6 x 6,885,998,592 matmul weights + 12 x 32 x 4096 x 2048
    assert openllama_7b.flops_per_token(2048) == count
    untied = dataclasses.replace(openllama_7b, untie_embeddings_and_output_weights=True)
    assert untied.flops_per_token(2048) == count  # a separate output weight adds no matmul
