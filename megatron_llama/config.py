"""Model configuration and named presets.

`ModelConfig` holds every number that shapes the network; `PRESETS` maps a preset name
(`--model-preset` on the command line) to the values of a published model. Open-Llama's
sizes follow its configs (shared input-output embedding, stable embedding LayerNorm);
Llama-2 and Llama-3 follow Meta's released configs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: one key/value head per query head (no GQA)
    vocab_size: int = 32000  # the tokenizer's vocabulary; padded_vocab_size adds the padding
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    use_stable_embedding: bool = False  # Open-Llama: LayerNorm right after the token embedding
    init_method_std: float = 0.02
    attention_backend: str = "sdpa"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by x tp."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def matmul_params(self) -> int:
        """Weights of all matmuls, output head included (N of DESIGN.md's FLOPs formula)."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        per_layer = h * h + 2 * h * kv + h * h + 3 * h * self.ffn_hidden_size
        return self.num_layers * per_layer + h * self.padded_vocab_size()

    def flops_per_token(self, seq_length: int) -> int:
        """6 N + 12 L h s (PaLM appendix B; causal masking not discounted)."""
        return 6 * self.matmul_params() + 12 * self.num_layers * self.hidden_size * seq_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, tensor_parallel_size: int = 1, tensor_parallel_flag: str = "--tensor-model-parallel-size") -> None:
        """The model's shape rules, for the CLI, checkpoint splitting, conversion and the model itself.

        Raises ValueError naming the flag and numbers to change: positive sizes, hidden size divisible by the
        attention heads, attention heads by the key/value heads, an even head dimension (rotary embeddings),
        and heads, key/value heads and --ffn-hidden-size divisible by `tensor_parallel_size` (named by
        `tensor_parallel_flag`: each tensor rank holds whole heads and an equal share of the ffn).
        """
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_query_groups is not None and self.num_query_groups <= 0:
            raise ValueError(f"--num-query-groups must be positive, got {self.num_query_groups}")
        heads, groups = self.num_attention_heads, self.kv_heads
        if self.hidden_size % heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {heads}; "
                             f"use a multiple of {heads}")
        if heads % groups:
            raise ValueError(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; "
                             f"use a number of query groups that divides {heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} (--hidden-size / --num-attention-heads) must be "
                             f"even for rotary embeddings")
        self._check_tensor_parallel_split(tensor_parallel_size, tensor_parallel_flag)

    def _check_tensor_parallel_split(self, tensor_parallel_size: int, flag: str) -> None:
        tp = tensor_parallel_size
        sizes = (("attention heads (--num-attention-heads)", self.num_attention_heads),
                 ("key/value heads (--num-query-groups)", self.kv_heads),
                 ("--ffn-hidden-size", self.ffn_hidden_size))
        misfits = [f"{what} {value}" for what, value in sizes if value % tp]
        if misfits:
            raise ValueError(f"{' and '.join(misfits)} {'is' if len(misfits) == 1 else 'are'} not divisible by "
                             f"{flag} {tp}: each tensor rank holds 1/{tp} of them; choose a {flag} that divides "
                             f"{', '.join(str(value) for _, value in sizes)}")


def _llama(layers, hidden, ffn, heads, groups=None, vocab=32000, positions=4096, rope=10000.0, eps=1e-5, **extra):
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                num_query_groups=groups, vocab_size=vocab, max_position_embeddings=positions,
                rotary_base=rope, norm_epsilon=eps, **extra)


_OPEN_LLAMA = dict(vocab=100000, positions=2048, eps=1e-6,
                   untie_embeddings_and_output_weights=False, use_stable_embedding=True)

PRESETS: dict[str, dict] = {
    "tiny": _llama(2, 64, 176, 4, 2, vocab=1000, positions=256),
    "tiny-mha": _llama(2, 64, 176, 4, None, vocab=1000, positions=256),
    "openllama-7b": _llama(32, 4096, 11008, 32, **_OPEN_LLAMA),
    "openllama-13b": _llama(40, 5120, 13824, 40, **_OPEN_LLAMA),
    "openllama-33b": _llama(60, 6656, 17920, 52, **_OPEN_LLAMA),
    "openllama-65b": _llama(80, 8192, 22016, 64, **_OPEN_LLAMA),
    "llama2-7b": _llama(32, 4096, 11008, 32),
    "llama2-13b": _llama(40, 5120, 13824, 40),
    "llama2-70b": _llama(80, 8192, 28672, 64, 8),
    "llama3-8b": _llama(32, 4096, 14336, 32, 8, vocab=128256, positions=8192, rope=500000.0),
}


def model_config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name])
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ModelConfig(**values)
