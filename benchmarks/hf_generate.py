"""Reference measurement on one GPU (the reference script the project measures against, kept as received): Hugging Face transformers' generate() on a Llama of Llama-2-7B layer dims.

Greedy decoding of --new-tokens tokens after a --prompt-len-token prompt, for each batch size; bf16 weights.
Prints one RESULT line per batch size: time to first token (prefill), decode tokens/s (all sequences), total.
--cache static --compile reduce-overhead is transformers' fastest documented path (a static KV cache with torch.compile).
Run it in the same command as our own generation benchmark, on the same GPU, and quote ratios.
"""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM, GenerationConfig
import transformers

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=8)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--new-tokens", type=int, default=256)
p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
p.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default="none")
a = p.parse_args()
dev = "cuda"
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  num_hidden_layers=a.layers, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device(dev):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
if a.compile != "none":
    model.forward = torch.compile(model.forward, mode=a.compile, fullgraph=True)
for b in a.batch:
    ids = torch.randint(3, 32000, (b, a.prompt_len), device=dev)
    gen = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                           cache_implementation=a.cache if a.cache == "static" else None, pad_token_id=0, eos_token_id=None)
    one = GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=False,
                           cache_implementation=a.cache if a.cache == "static" else None, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for _ in range(2):
            model.generate(ids, generation_config=gen)
        torch.cuda.synchronize(); t = time.perf_counter()
        model.generate(ids, generation_config=one); torch.cuda.synchronize(); ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, generation_config=gen); torch.cuda.synchronize(); total = time.perf_counter() - t
    new = out.shape[1] - a.prompt_len
    print("RESULT", json.dumps(dict(impl="hf-transformers-" + transformers.__version__, cache=a.cache, compile=a.compile,
          layers=a.layers, batch=b, prompt_len=a.prompt_len, new_tokens=new, ttft_s=round(ttft, 4), total_s=round(total, 3),
          decode_tokens_per_s=round(b * (new - 1) / max(total - ttft, 1e-9)))), flush=True)
