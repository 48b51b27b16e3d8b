"""Generation against transformers: greedy completions of tools/generate.py's model equal generate(do_sample=False)
on the convert_to_hf.py export token for token, and the export's chat template renders our conversations."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from inference_helpers import sentencepiece_tokenizer, small_model, write_checkpoint
from megatron_llama.data.chat_template import CHAT_TEMPLATES
from megatron_llama.data.sft_dataset import SFTDataset
from megatron_llama.inference.generator import Generator, encode_prompt
from megatron_llama.inference.loading import ModelSource, load_for_inference

TOOLS = Path(__file__).resolve().parent.parent / "tools"
PROMPTS = ["The quick brown fox", "床前明月光，", "A journey of a thousand miles", "Numbers 0 1 2"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "I am fine, thank you"}, {"role": "user", "content": "how are you?"}]
NEW_TOKENS = 20


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our checkpoint saved at tp=2, its Hugging Face export)."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = write_checkpoint(root / "ckpt", small_model(), sentencepiece_tokenizer(root / "tokenizer"),
                                  tensor_parallel_size=2)
    load_tool("convert_to_hf").main(["--load", checkpoint, "--save", str(root / "hf")])
    return checkpoint, str(root / "hf")


def transformers_greedy(folder: str, prompt_ids: list[int]) -> list[int]:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_completions_equal_transformers_on_the_export_token_for_token(exported):
    checkpoint, hf = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    for source in (ModelSource(load=checkpoint), ModelSource(hf=hf)):
        model, tokenizer = load_for_inference(source, device="cpu", dtype=torch.float32)
        prompts = [encode_prompt(tokenizer, text) for text in PROMPTS]
        assert prompts == [hf_tokenizer(text)["input_ids"] for text in PROMPTS]  # BOS first, as transformers
        completions = Generator(model, tokenizer).generate(prompts, NEW_TOKENS)
        assert [c.tokens for c in completions] == [transformers_greedy(hf, prompt) for prompt in prompts]


def test_export_chat_template_renders_our_conversation_text_and_ids(exported, tmp_path):
    _, hf = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    _, tokenizer = load_for_inference(ModelSource(hf=hf), device="cpu", dtype=torch.float32)
    rendered = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == CHAT_TEMPLATES["openllama"].render(MESSAGES, "<s>", "</s>")
    assert rendered == "<s>Be brief.\nuser: hello there<s>system: I am fine, thank you</s>user: how are you?<s>system: "
    for name, template in CHAT_TEMPLATES.items():
        hf_tokenizer.chat_template = template.jinja()
        for generation_prompt in (True, False):
            text = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
            assert text == template.render(MESSAGES, "<s>", "</s>", generation_prompt), name
            ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert ids == template.encode(MESSAGES, tokenizer, generation_prompt), name


def test_generate_tool_writes_completions_for_prompts_and_conversations(exported, tmp_path):
    checkpoint, hf = exported
    records = [{"prompt": text} for text in PROMPTS] + [{"messages": MESSAGES, "id": 7}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    load_tool("generate").main(["--load", checkpoint, "--input-file", str(tmp_path / "prompts.jsonl"),
                                "--output-file", str(tmp_path / "out.jsonl"), "--max-new-tokens", str(NEW_TOKENS),
                                "--batch-size", "3"])
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    model, tokenizer = load_for_inference(ModelSource(load=checkpoint), device="cpu", dtype=torch.float32)
    prompts = [encode_prompt(tokenizer, text) for text in PROMPTS]
    prompts.append(CHAT_TEMPLATES["openllama"].encode(MESSAGES, tokenizer))
    expected = Generator(model, tokenizer).generate(prompts, NEW_TOKENS)
    assert [record["completion"] for record in written] == [c.text for c in expected]
    assert written[-1]["id"] == 7 and written[-1]["messages"] == MESSAGES
    assert [record["completion_tokens"] for record in written[:4]] == [
        len(transformers_greedy(hf, prompt)) for prompt in prompts[:4]]


def test_generate_tool_names_the_line_of_a_bad_record(exported, tmp_path):
    checkpoint, _ = exported
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    with pytest.raises(SystemExit, match="prompts.jsonl line 2"):
        load_tool("generate").main(["--load", checkpoint, "--input-file", str(tmp_path / "prompts.jsonl")])


def test_sft_records_are_the_token_ids_of_the_exports_apply_chat_template(exported, tmp_path):
    """SFT trains on exactly what the exported tokenizer renders (data/sft_dataset.py), every template."""
    _, hf = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    _, tokenizer = load_for_inference(ModelSource(hf=hf), device="cpu", dtype=torch.float32)
    conversation = MESSAGES + [{"role": "assistant", "content": "fine, and you?"}]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    for name, template in CHAT_TEMPLATES.items():
        hf_tokenizer.chat_template = template.jinja()
        text = hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        sample = SFTDataset(str(path), tokenizer, 256, num_samples=1, seed=0, chat_template=name)[0]
        assert sample["text"][:len(expected)].tolist() == expected, name
        assert sample["loss_mask"][len(expected):].sum() == 0 and sample["loss_mask"][len(expected) - 1] == 1, name
