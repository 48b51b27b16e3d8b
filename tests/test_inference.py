"""KV-cache generation (megatron_llama.inference): the cache gives the logits of a full recompute, left padding
changes no completion, sampling follows its seed, stops and streaming behave, and tensor-parallel generation
(gloo) gives the tokens of one process."""
import copy
import dataclasses

import pytest
import torch

from distributed import run_distributed
from inference_helpers import CONFIG, sentencepiece_tokenizer, small_model, tied, write_checkpoint
from megatron_llama.data.tokenizer import build_tokenizer
from megatron_llama.inference.generator import Generator, encode_prompt
from megatron_llama.inference import kv_cache
from megatron_llama.inference.kv_cache import KVCache
from megatron_llama.inference.loading import ModelSource, load_for_inference
from megatron_llama.inference.sampling import SamplingParams, sample
from megatron_llama.parallel import state

PROMPTS = ["The quick brown fox", "床前明月光，", "A journey of a thousand miles begins", "user: hello"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer("SentencePieceTokenizer", sentencepiece_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def incremental_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    batch, length = ids.shape
    cache = KVCache.for_model(model.config, model.layout, batch, length, device="cpu", dtype=torch.float32)
    positions = torch.arange(length).expand(batch, length)
    with torch.no_grad():
        cache.begin_step(torch.ones(batch, prefill, dtype=torch.bool))
        steps = [model.forward_with_cache(ids[:, :prefill], positions[:, :prefill], cache)]
        for slot in range(prefill, length):
            cache.begin_step(torch.ones(batch, 1, dtype=torch.bool))
            steps.append(model.forward_with_cache(ids[:, slot:slot + 1], positions[:, slot:slot + 1], cache))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("config", [CONFIG, tied(dataclasses.replace(CONFIG, num_query_groups=None))],
                         ids=["untied-gqa", "tied-mha"])
def test_kv_cache_decoding_gives_the_logits_of_a_full_recompute(config):
    model = small_model(config)
    ids = torch.randint(0, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
    assert (incremental_logits(model, ids, prefill=7) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("granule", [4, 128])
def test_static_decode_steps_give_the_logits_of_dynamic_ones(granule, monkeypatch):
    """The static mode of CUDA graphs (a fixed mask grown one slot per decode step, attended over the written slots
    rounded up to the span granule) attends to exactly what the dynamic mode does, with left-padded rows, also
    after a reset."""
    monkeypatch.setattr(kv_cache, "SPAN_GRANULE", granule)
    model = small_model()
    spans = []
    ids = torch.randint(1, CONFIG.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    real = torch.ones(2, 6, dtype=torch.bool)
    real[0, :3] = False  # row 0: a prompt of 3 tokens left-padded to 6
    positions = (real.long().cumsum(1) - 1).clamp(min=0)

    def decode(cache: KVCache) -> torch.Tensor:
        cache.reset()
        cache.begin_step(real)
        steps = [model.forward_with_cache(ids[:, :6], positions, cache)[:, -1:]]
        for step in range(8):
            cache.begin_decode_step()
            position = positions[:, -1:] + 1 + step
            steps.append(model.forward_with_cache(ids[:, 6 + step:7 + step], position, cache))
            spans.append(cache.span)
        return torch.cat(steps, dim=1)

    dynamic = KVCache.for_model(model.config, model.layout, 2, 14, device="cpu", dtype=torch.float32)
    static = KVCache.for_model(model.config, model.layout, 2, 14, device="cpu", dtype=torch.float32)
    static.use_static_step_buffers(1)
    with torch.no_grad():
        expected = decode(dynamic)
        # measured 1.3e-6: the static step sums over every slot (masked ones too), in another order
        assert (decode(static) - expected).abs().max() <= 1e-5
        assert static.static_mask_slot == 13
        # decode steps end at 7..14 written slots; the static spans round that up to the granule, within the cache
        assert spans[:8] == list(range(7, 15))
        assert spans[8:16] == ([8, 8, 12, 12, 12, 12, 14, 14] if granule == 4 else [14] * 8)
        assert (decode(static) - expected).abs().max() <= 1e-5  # after reset, the mask is rebuilt first


def test_left_padding_gives_each_prompt_the_logits_and_tokens_it_gets_alone(tokenizer):
    generator = Generator(small_model(), tokenizer)
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS]
    assert len({len(prompt) for prompt in prompts}) > 1
    together = generator.generate(prompts, max_new_tokens=12)
    alone = [generator.generate([prompt], max_new_tokens=12)[0] for prompt in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    model = generator.model
    short, long = prompts[0], prompts[2]
    padded = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    real = padded != 0
    real[1] = True
    cache = KVCache.for_model(model.config, model.layout, 2, len(long), device="cpu", dtype=torch.float32)
    cache.begin_step(real)
    with torch.no_grad():
        logits = model.forward_with_cache(padded, (real.long().cumsum(1) - 1).clamp(min=0), cache)
        reference = model(torch.tensor([short]))
    assert (logits[0, -len(short):] - reference[0]).abs().max() <= 1e-5


def test_warm_up_leaves_nothing_behind_that_changes_a_generation(tokenizer):
    generator = Generator(small_model(), tokenizer)
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS]
    cold = generator.generate(prompts, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=7))
    generator.warm_up()
    warm = generator.generate(prompts, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, seed=7))
    assert [c.tokens for c in warm] == [c.tokens for c in cold]


def test_sampling_is_reproducible_from_its_seed_and_top_k_1_is_greedy(tokenizer):
    generator = Generator(small_model(), tokenizer)
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS[:2]]

    def tokens(**sampling):
        return [c.tokens for c in generator.generate(prompts, 16, SamplingParams(**sampling))]

    assert tokens(temperature=1.5, top_p=0.9, seed=3) == tokens(temperature=1.5, top_p=0.9, seed=3)
    assert tokens(temperature=1.5, seed=3) != tokens(temperature=1.5, seed=4)
    assert tokens(temperature=1.5, top_k=1, seed=5) == tokens(temperature=0.0)
    assert tokens(temperature=1.5, top_p=1e-6, seed=5) == tokens(temperature=0.0)


def test_top_k_and_top_p_only_draw_from_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, 5)
    drawn = sample(logits, SamplingParams(temperature=1.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    # probabilities 0.64, 0.24, 0.09, ...: the smallest set reaching 0.8 is the first two tokens
    drawn = sample(logits, SamplingParams(temperature=1.0, top_p=0.8), torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}


def test_stop_strings_end_the_text_before_them_and_streaming_adds_up_to_the_text(tokenizer):
    generator = Generator(small_model(), tokenizer)
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS]
    free = generator.generate(prompts, 24)
    row = next(i for i, c in enumerate(free) if len(c.text.strip()) > 6)
    stop = free[row].text.strip()[3:6]
    generation = generator.start(prompts, 24, stop=[stop])
    streamed = [""] * len(prompts)
    reasons = [None] * len(prompts)
    for deltas in generation:
        for delta in deltas:
            assert reasons[delta.row] is None, "no delta after a row's last one"
            streamed[delta.row] += delta.text
            reasons[delta.row] = delta.finish_reason
    completions = generation.completions
    assert streamed == [c.text for c in completions]
    assert reasons == [c.finish_reason for c in completions]
    assert completions[row].finish_reason == "stop" and stop not in completions[row].text
    assert free[row].text.startswith(completions[row].text + stop)
    assert all(c.finish_reason in ("stop", "length") for c in completions)
    assert all(len(c.tokens) == 24 for c in completions if c.finish_reason == "length")


def test_end_of_document_ends_a_completion_and_stays_out_of_its_text(tokenizer):
    model, prompt = small_model(), encode_prompt(tokenizer, "The quick")
    [free] = Generator(model, tokenizer).generate([prompt], 10)
    ending = copy.copy(tokenizer)
    ending.eod = free.tokens[3]  # a tokenizer whose end-of-document id is the 4th token generated
    [completion] = Generator(model, ending).generate([prompt], 10)
    assert completion.tokens == free.tokens[:4] and completion.finish_reason == "stop"
    assert completion.text == tokenizer.detokenize(prompt[-1:] + free.tokens[:3])[len(tokenizer.detokenize(prompt[-1:])):]


def test_requests_beyond_the_context_or_below_one_token_are_refused_with_the_numbers(tokenizer):
    generator = Generator(small_model(), tokenizer)
    with pytest.raises(ValueError, match="exceeds the context of 128 tokens"):
        generator.generate([[1] * 100], max_new_tokens=29)
    with pytest.raises(ValueError, match="at least 1"):
        generator.generate([[1, 5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate([[1, 5]], 4, SamplingParams(temperature=1.0, top_p=0.0))


def generate_at_layout(checkpoint: str, prompts: list[str], sampling: SamplingParams):
    with state.parallel_layout(torch.distributed.get_world_size()):
        model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
        generator = Generator(model, tokenizer)
        completions = generator.generate([encode_prompt(tokenizer, text) for text in prompts], 16, sampling)
        return [c.tokens for c in completions]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, top_k=40, seed=9)],
                         ids=["greedy", "sampled"])
def test_tp2_generates_the_tokens_of_one_process_from_a_checkpoint_saved_at_another_layout(tmp_path, sampling):
    tokenizer_path = sentencepiece_tokenizer(tmp_path / "tokenizer")
    checkpoint = write_checkpoint(tmp_path / "ckpt", small_model(), tokenizer_path, pipeline_parallel_size=2)
    single = run_distributed(generate_at_layout, 1, args=(checkpoint, PROMPTS, sampling))[0]
    both = run_distributed(generate_at_layout, 2, args=(checkpoint, PROMPTS, sampling))
    assert both[0] == both[1] == single


def test_pipeline_parallel_generation_is_refused_with_a_message(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", small_model(), sentencepiece_tokenizer(tmp_path / "tok"))

    def load_at_pp2():
        with state.parallel_layout(1, 2):
            load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)

    with pytest.raises(AssertionError, match="pipeline-parallel inference is not supported"):
        run_distributed(load_at_pp2, 2)
