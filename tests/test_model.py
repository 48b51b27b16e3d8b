"""Llama model: attention backends against the eager reference, GQA, tied/untied heads, stable
embedding, vocabulary padding, layout-independent initialisation and pipeline-style splits."""
import dataclasses
import math

import pytest
import torch

from megatron_llama.config import ModelConfig
from megatron_llama.model.attention import AttentionBackendError, get_core_attention, xformers_unavailable_reason
from megatron_llama.model.llama import LlamaModel, RMSNorm, build_model
from megatron_llama.model.rotary import RotaryEmbedding, apply_rotary

TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                   vocab_size=300)


def tokens(batch=2, seq=16, vocab=300, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sharpen_(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Larger random weights than the 0.02 init, and random norm scales, so attention is far from
    uniform and a wrong head, rotary or norm would move the logits well beyond the tolerances."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)
    return model


def with_backend(config: ModelConfig, backend: str) -> ModelConfig:
    return dataclasses.replace(config, attention_backend=backend)


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_sdpa_logits_equal_eager_reference(groups):
    config = dataclasses.replace(TINY, num_query_groups=groups)
    eager = sharpen_(build_model(with_backend(config, "eager"), seed=1))
    sdpa = build_model(with_backend(config, "sdpa"), seed=1)
    sdpa.load_state_dict(eager.state_dict())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), eager(x), rtol=0, atol=1e-5)


def test_xformers_logits_equal_eager_or_selection_explains_why_not():
    reason = xformers_unavailable_reason()
    if reason is not None:
        with pytest.raises(AttentionBackendError) as error:
            build_model(with_backend(TINY, "xformers"), seed=1)
        assert reason in str(error.value) and "--attention-backend sdpa" in str(error.value)
        return
    config = with_backend(TINY, "xformers")
    model = build_model(config, seed=1, device="cuda", dtype=torch.float16)
    eager = build_model(with_backend(config, "eager"), seed=1, device="cuda", dtype=torch.float16)
    x = tokens().cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=2e-2)


def test_unknown_attention_backend_lists_the_choices():
    with pytest.raises(ValueError, match="sdpa, xformers, eager"):
        get_core_attention("flash")


def test_grouped_query_attention_equals_mha_with_repeated_kv_weights():
    gqa = sharpen_(build_model(with_backend(TINY, "eager"), seed=2))
    mha_config = dataclasses.replace(TINY, num_query_groups=None)
    mha = build_model(mha_config, seed=2)
    state = gqa.state_dict()
    groups, heads, d, h = TINY.kv_heads, TINY.num_attention_heads, TINY.head_dim, TINY.hidden_size
    per_group = heads // groups
    for i in range(TINY.num_layers):
        name = f"layers.{i}.attention.qkv.weight"
        grouped = state[name].view(groups, per_group + 2, d, h)  # per group: [q heads, k, v]
        rows = [torch.stack([grouped[j // per_group, j % per_group], grouped[j // per_group, per_group],
                             grouped[j // per_group, per_group + 1]]) for j in range(heads)]
        state[name] = torch.stack(rows).reshape(3 * heads * d, h)  # per head: [q_j, k_(its group), v_(its group)]
    mha.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(mha(x), gqa(x), rtol=0, atol=1e-5)


def test_tied_head_has_no_output_weight_and_equals_untied_head_holding_the_embedding():
    tied_config = dataclasses.replace(TINY, untie_embeddings_and_output_weights=False)
    tied = sharpen_(build_model(tied_config, seed=3))
    assert "output.weight" not in tied.state_dict()
    untied = build_model(TINY, seed=3)
    state = dict(tied.state_dict(), **{"output.weight": tied.state_dict()["embedding.weight"].clone()})
    untied.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(tied(x), untied(x), rtol=0, atol=0)
        untied.output.weight.add_(0.1)
        assert not torch.allclose(tied(x), untied(x), atol=1e-3)


def test_stable_embedding_adds_a_layernorm_that_changes_the_output():
    stable_config = dataclasses.replace(TINY, use_stable_embedding=True)
    stable = sharpen_(build_model(stable_config, seed=4))
    assert {"embedding_norm.weight", "embedding_norm.bias"} <= set(stable.state_dict())
    plain = build_model(TINY, seed=4)
    plain.load_state_dict({k: v for k, v in stable.state_dict().items() if not k.startswith("embedding_norm")})
    x = tokens()
    with torch.no_grad():
        assert (stable(x) - plain(x)).abs().max() > 1e-2
        # With the LayerNorm folded into the embedding rows, the plain model computes the same thing.
        plain.embedding.weight.copy_(stable.embedding_norm(stable.embedding.weight))
        torch.testing.assert_close(stable(x), plain(x), rtol=0, atol=1e-5)


def test_vocab_padding_does_not_change_the_loss():
    padded = sharpen_(build_model(TINY, seed=5))
    assert padded.embedding.weight.shape[0] == 384 and padded.output.weight.shape[0] == 384
    unpadded = build_model(dataclasses.replace(TINY, make_vocab_size_divisible_by=1), seed=5)
    assert unpadded.output.weight.shape[0] == 300
    unpadded.load_state_dict({name: value[:300] if name in ("embedding.weight", "output.weight") else value
                              for name, value in padded.state_dict().items()})
    with torch.no_grad():
        padded.output.weight[300:] = 10.0  # large padding logits must still not leak into the softmax
        x = tokens(seq=17)
        torch.testing.assert_close(padded(x[:, :-1], x[:, 1:]), unpadded(x[:, :-1], x[:, 1:]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_initialisation_is_the_same_whatever_the_stage_layout(tied):
    config = dataclasses.replace(TINY, num_layers=4, untie_embeddings_and_output_weights=not tied)
    full = dict(build_model(config, seed=6).named_parameters())
    stages = [build_model(config, seed=6, pre_process=True, post_process=False, layer_range=(0, 1)),
              build_model(config, seed=6, pre_process=False, post_process=False, layer_range=(1, 3)),
              build_model(config, seed=6, pre_process=False, post_process=True, layer_range=(3, 4))]
    seen = set()
    for stage in stages:
        for name, param in stage.named_parameters():
            assert torch.equal(param, full[name]), name
            seen.add(name)
    assert seen == set(full)
    assert "layers.3.mlp.down.weight" in dict(stages[2].named_parameters())
    assert ("embedding.weight" in dict(stages[2].named_parameters())) == tied  # the last stage's tied head


def test_output_projections_have_std_scaled_by_inverse_sqrt_of_twice_the_layers():
    config = dataclasses.replace(TINY, num_layers=8, init_method_std=0.02)
    model = build_model(config, seed=7)
    scaled = 0.02 / math.sqrt(16)
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        expected = scaled if name.endswith(("attention.dense.weight", "mlp.down.weight")) else 0.02
        assert abs(param.std().item() - expected) < 0.1 * expected, name
        assert abs(param.mean().item()) < 0.1 * expected, name


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_compose_to_the_full_model(tied):
    config = dataclasses.replace(TINY, untie_embeddings_and_output_weights=not tied)
    full = sharpen_(build_model(config, seed=8))
    first = LlamaModel(config, pre_process=True, post_process=False, layer_range=(0, 1))
    last = LlamaModel(config, pre_process=False, post_process=True, layer_range=(1, 2))
    state = full.state_dict()
    for stage in (first, last):
        stage.load_state_dict({name: state[name] for name in stage.state_dict()})
    x = tokens(seq=17)
    with torch.no_grad():
        hidden = first(x[:, :-1])
        assert hidden.shape == (2, 16, config.hidden_size)
        torch.testing.assert_close(last(hidden), full(x[:, :-1]), rtol=0, atol=0)
        torch.testing.assert_close(last(hidden, x[:, 1:]), full(x[:, :-1], x[:, 1:]), rtol=0, atol=0)


def test_every_parameter_gets_a_gradient_from_the_loss():
    model = build_model(dataclasses.replace(TINY, use_stable_embedding=True), seed=9)
    x = tokens(seq=9)
    loss = model(x[:, :-1], x[:, 1:])
    assert loss.shape == (2, 8) and loss.dtype == torch.float32
    loss.mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_layer_range_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="--num-layers"):
        LlamaModel(TINY, layer_range=(1, 3))


def test_rotary_equals_complex_rotation_by_position_times_frequency():
    d, s, base = 8, 5, 500.0
    cos, sin = RotaryEmbedding(d, base)(s, "cpu", torch.float64)
    x = torch.randn(1, s, 3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rotated = apply_rotary(x, cos, sin)
    as_complex = torch.complex(x[..., : d // 2], x[..., d // 2:])  # pairs (i, i + d/2)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2) / d)
    expected = as_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    # the angle tables are fp32 (then cast), hence fp32-level agreement
    torch.testing.assert_close(rotated, torch.cat([expected.real, expected.imag], dim=-1), rtol=0, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = RotaryEmbedding(16, 10000.0)(12, "cpu", torch.float32)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    rotated_q = apply_rotary(q.expand(1, 12, 1, 16), cos, sin)[0, :, 0]  # q at every position
    rotated_k = apply_rotary(k.expand(1, 12, 1, 16), cos, sin)[0, :, 0]
    torch.testing.assert_close(rotated_q[7] @ rotated_k[4], rotated_q[3] @ rotated_k[0])
    assert not torch.allclose(rotated_q[7] @ rotated_k[4], rotated_q[7] @ rotated_k[5])


def test_rmsnorm_of_bf16_inputs_is_the_exact_result_rounded_once_to_bf16():
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    x = (torch.randn(4, 64) * 300).to(torch.bfloat16)
    reference = x.double() / x.double().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(norm(x), reference.to(torch.bfloat16), rtol=2**-8, atol=0)


def test_bf16_model_computes_rotary_angles_in_fp32_and_rounds_only_the_tables():
    model = build_model(TINY, seed=10, dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    logits = model(tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    cos, sin = model.rotary(2048, "cpu", torch.bfloat16)  # bf16 positions would be off by up to 8 at 2047
    d = TINY.head_dim
    angles = torch.arange(2048, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    assert cos.dtype == torch.bfloat16
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2**-8)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2**-8)


def reference_logits(model: LlamaModel, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The Llama forward written out from the paper's formulas over the model's weights, in float64, with rotary
    embeddings as complex rotation of the pairs (i, i + d/2) by position * base^(-2i/d): no code of model/ runs."""
    config, weights = model.config, {name: value.double() for name, value in model.state_dict().items()}
    heads, groups, d = config.num_attention_heads, config.kv_heads, config.head_dim
    b, s = input_ids.shape

    def norm(x, weight):
        return x / x.pow(2).mean(-1, keepdim=True).add(config.norm_epsilon).sqrt() * weight

    def rotate(x):  # [b, s, n, d]
        pairs = torch.complex(x[..., :d // 2], x[..., d // 2:])
        angles = position_ids.double()[..., None] * config.rotary_base ** (-torch.arange(0, d, 2).double() / d)
        turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
        return torch.cat([turned.real, turned.imag], dim=-1)

    hidden = weights["embedding.weight"][input_ids]
    for i in range(config.num_layers):
        layer = {name[len(f"layers.{i}."):]: value for name, value in weights.items() if name.startswith(f"layers.{i}.")}
        qkv = (norm(hidden, layer["input_norm.weight"]) @ layer["attention.qkv.weight"].T).view(b, s, groups, -1, d)
        q, k, v = rotate(qkv[:, :, :, :-2].reshape(b, s, heads, d)), rotate(qkv[:, :, :, -2]), qkv[:, :, :, -1]
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, -1)
        hidden = hidden + attended @ layer["attention.dense.weight"].T
        normed = norm(hidden, layer["post_attention_norm.weight"])
        gate, up = normed @ layer["mlp.gate.weight"].T, normed @ layer["mlp.up.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ layer["mlp.down.weight"].T
    return norm(hidden, weights["final_norm.weight"]) @ weights["output.weight"].T


@pytest.mark.parametrize("positions", ["plain", "restarting"])
def test_logits_equal_a_reference_forward_with_rotary_as_complex_rotation(positions):
    """Catches a wrong rotary application inside the model (wrong halves paired, keys left unrotated, positions
    ignored or shifted), which the rotary function's own tests cannot see."""
    model = sharpen_(build_model(TINY, seed=11))
    x = tokens(seq=16)
    position_ids = torch.arange(16).expand(2, 16)
    if positions == "restarting":  # --reset-position-ids without --reset-attention-mask: one row, positions restart
        position_ids = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16)
    with torch.no_grad():
        ours = model(x) if positions == "plain" else model(x, position_ids=position_ids)
        torch.testing.assert_close(ours.double(), reference_logits(model, x, position_ids), rtol=0, atol=1e-4)
