"""The typed run configuration: a JSON round trip gives the same configuration, unknown sections or fields are
named, and the flat argument record of older checkpoints maps onto the sections."""
import json
import os

import pytest

from megatron_llama.arguments import parse_args
from megatron_llama.config import ModelConfig, RunConfig

FLAGS = ("--model-preset tiny --seq-length 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 5 "
         "--lr 1e-3 --mock-data --device cpu --num-layers 4").split()


def test_json_round_trip_gives_the_same_configuration():
    config, _ = parse_args(FLAGS + ["--recompute-granularity", "full", "--recompute-method", "uniform"])
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
    config, _ = parse_args(FLAGS)
    config.parallel.pipeline_model_parallel_size = 2
    config.parallel.num_layers_per_virtual_pipeline_stage = 1
    assert config.stage_split().ranges == (((0, 1), (2, 3)), ((1, 2), (3, 4)))
