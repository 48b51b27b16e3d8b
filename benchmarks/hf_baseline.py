"""Reference measurement on one GPU (the reference script the project measures against, kept as received): Hugging Face transformers' own Llama training step, and the bf16 matmul ceiling.

Run it in the same command as our own benchmark, on the same GPU, and quote ratios.

Shapes: Llama-2-7B layer dims (h=4096, ffn=11008, 32 heads, vocab 32000), L layers, seq S.
Model FLOPs per token (PaLM/torchtitan convention): 6*N_matmul + 12*L*h*S, N_matmul = all matmul weights incl. LM head.
"""
import argparse, json, os, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=8)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--mbs", type=int, default=4)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
p.add_argument("--mode", default="amp", choices=["amp", "bf16"])
p.add_argument("--compile", action="store_true")
p.add_argument("--ckpt", action="store_true")
p.add_argument("--liger", action="store_true", help="Liger Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross entropy)")
p.add_argument("--float8", default="none", choices=["none", "tensorwise", "rowwise"],
               help="torchao float8 training of the blocks' linears (needs torchao; use with --mode bf16 --compile)")
a = p.parse_args()

dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = True
props = torch.cuda.get_device_properties(0)
print("gpu", props.name, props.total_memory // 2**20, "MiB", "torch", torch.__version__)

# matmul ceiling on random data
def mm_peak(n=8192, reps=20):
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16); y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3): x @ y
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): x @ y
    e.record(); torch.cuda.synchronize()
    return 2 * n**3 * reps / (s.elapsed_time(e) / 1e3) / 1e12
print("bf16 matmul TFLOP/s", round(mm_peak(), 1))

import transformers
from transformers import LlamaConfig, LlamaForCausalLM
if a.liger:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama()
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  num_hidden_layers=a.layers, vocab_size=32000, max_position_embeddings=a.seq, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device(dev):
    model = LlamaForCausalLM(cfg)
if a.mode == "bf16":
    model = model.to(torch.bfloat16)
if a.ckpt:
    model.gradient_checkpointing_enable()
if a.float8 != "none":
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(a.float8),
                               module_filter_fn=lambda m, fqn: fqn != "lm_head")
model.train()
n_params = sum(p.numel() for p in model.parameters())
n_matmul = n_params - model.model.embed_tokens.weight.numel() - sum(p.numel() for n_, p in model.named_parameters() if "norm" in n_)
flops_tok = 6 * n_matmul + 12 * a.layers * 4096 * a.seq
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
fwd = torch.compile(model) if a.compile else model

def step():
    for _ in range(a.accum):
        ids = torch.randint(0, 32000, (a.mbs, a.seq), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(a.mode == "amp")):
            out = fwd(input_ids=ids, labels=ids)
        (out.loss / a.accum).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    return out.loss

for _ in range(3): step()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(a.steps): loss = step()
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / a.steps
tps = a.accum * a.mbs * a.seq / dt
res = dict(impl="hf-transformers-" + transformers.__version__, mode=a.mode, compile=a.compile, ckpt=a.ckpt, liger=a.liger, float8=a.float8, layers=a.layers, seq=a.seq, mbs=a.mbs, accum=a.accum,
           params=n_params, step_s=round(dt, 4), tokens_per_s=round(tps), mfu_989=round(tps * flops_tok / 989e12, 4),
           tflops=round(tps * flops_tok / 1e12, 1), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1), loss=float(loss))
print("RESULT", json.dumps(res))
