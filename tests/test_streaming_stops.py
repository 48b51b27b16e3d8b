"""Streaming with stop strings, whatever the tokenizer does to their characters: with a SentencePiece tokenizer
with byte fallback ('ć' arrives as two byte tokens), the streamed deltas add up to the final text and every text
streamed so far is a start of it, for every stop string cut out of the text, across token boundaries."""
import pytest
import torch

from inference_helpers import CONFIG, sentencepiece_tokenizer
from megatron_llama.data.tokenizer import build_tokenizer
from megatron_llama.inference.generator import Generator
from megatron_llama.parallel import state

TEXT = "a >vć 床前ć>b"  # 'ć' is not a piece: it comes as the bytes <0xC4> <0x87>


class ScriptedModel(torch.nn.Module):
    """Stands in for a LlamaModel: whatever it is given, its logits pick the script's next token."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.config, self.layout = CONFIG, state.current_layout()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.script, self.calls = script, 0

    def forward_with_cache(self, ids, position_ids, cache, last_position_only=False):
        logits = torch.zeros(ids.shape[0], 1, CONFIG.vocab_size)  # [b, 1, vocab]
        logits[:, :, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer("SentencePieceTokenizer", sentencepiece_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def streamed_and_final(tokenizer, script: list[int], stop: list[str]) -> tuple[list[str], str, str]:
    generation = Generator(ScriptedModel(script), tokenizer).start([[tokenizer.bos]], len(script), stop=stop)
    so_far = []
    for deltas in generation:
        so_far += [(so_far[-1] if so_far else "") + delta.text for delta in deltas]
    [completion] = generation.completions
    return so_far, completion.text, completion.finish_reason


def test_the_text_streams_whole_and_ć_comes_as_two_byte_tokens(tokenizer):
    script = tokenizer.tokenize(TEXT)
    assert len(script) == len(TEXT) + TEXT.count("ć")  # two byte tokens for each 'ć', one piece for each other
    so_far, text, reason = streamed_and_final(tokenizer, script, [])
    assert text == TEXT and so_far[-1] == TEXT and reason == "length"


def test_streamed_deltas_add_up_to_the_final_text_for_every_stop_string(tokenizer):
    script = tokenizer.tokenize(TEXT)
    stops = sorted({TEXT[start:start + size] for size in (1, 2, 3, 4) for start in range(len(TEXT) - size + 1)})
    assert ">vć" in stops and "ć>" in stops
    for stop in stops:
        so_far, text, reason = streamed_and_final(tokenizer, script, [stop])
        assert text == TEXT[:TEXT.find(stop)] and reason == "stop", stop
        assert so_far[-1] == text, stop
        assert all(text.startswith(streamed) for streamed in so_far), (stop, so_far)


def test_a_stop_strings_start_is_held_until_it_is_ruled_out(tokenizer):
    script = tokenizer.tokenize(TEXT)
    so_far, text, _ = streamed_and_final(tokenizer, script, [">vx", "前ćX"])
    assert text == TEXT and so_far[-1] == TEXT
    assert all(not streamed.endswith((">", ">v")) for streamed in so_far[:-1])
