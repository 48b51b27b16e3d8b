"""Tensor and sequence parallelism give the numbers of one process.

One spawn per layout (tp=2 on 2 gloo ranks, tp=4 on 4) runs every check of that layout:
the parallel layers against plain layers, vocab-parallel cross entropy against torch's,
the seeding, and three training steps of the Llama model for each combination of
sequence parallelism, tied/untied embeddings and key/value heads equal to / larger than tp.
The module-scoped fixture keeps the results; each test asserts one property of them.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import build_model
from megatron_llama.parallel import comm, layers, state
from megatron_llama.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_llama.parallel.random import checkpoint, set_random_seeds
from megatron_llama.parallel.state import ParallelLayout

SEED = 1234
CE_VOCAB = 37  # real vocabulary of the cross-entropy checks; logits carry padding up to a multiple of 8 * tp
MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, vocab_size=200,
                    make_vocab_size_divisible_by=128, max_position_embeddings=64, attention_backend="eager")
STEPS, BATCH, SEQ = 3, 2, 8
# Agreement measured in fp32 at tp 2 and 4 (differences as a fraction of the reference tensor's largest value,
# tests/agreement.py); each bound stands 3-10x above. Losses: 1.8e-7 relative. First-step gradients: 6.0e-7 (the
# matmul sums split across ranks round differently). Later steps also carry that rounding through the update:
# 3.1e-6 after SGD, 2.4e-5 after Adam (its first update lr * g / (|g| + eps) is lr * sign(g), so the rounding of
# a gradient near zero can move a weight by lr). A gradient off by a factor (1 + 1e-5) fails the first step.
LOSS_RTOL = 1e-6
FIRST_STEP_GRAD_TOL = 3e-6
LATER_STEP_GRAD_TOL = {"sgd": 1.5e-5, "adam": 1e-4}
# The layers against F.linear / F.embedding: at most 3.1e-7 where a rank's partial sums are reduced (column input
# grads, row outputs); 20 to 24 of the 32 values per rank, the rest, are bitwise equal.
LAYER_TOL = 1e-6
# Vocab-parallel cross entropy: losses measured bitwise equal, logit gradients 1.1e-7; both bounded by about 2 ulps.
CROSS_ENTROPY_TOL = 3e-7


# ---------------------------------------------------------------- a trainer's math, in miniature

def model_cases(tp: int) -> list[dict]:
    """Every combination the issue asks for at this tp: SP, tied (Open-Llama style) or not, kv heads == tp or > tp."""
    cases = []
    for kv_heads in (tp, 2 * tp):
        for tied in (False, True):
            for sequence_parallel in (False, True):
                config = dataclasses.replace(MODEL, num_query_groups=kv_heads, use_stable_embedding=tied,
                                             untie_embeddings_and_output_weights=not tied)
                cases.append(dict(config=config, sequence_parallel=sequence_parallel,
                                  optimizer="adam" if kv_heads > tp else "sgd",
                                  name=f"tp{tp} kv{kv_heads} {'tied' if tied else 'untied'} sp={sequence_parallel}"))
    return cases


def training_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]


def train(config: ModelConfig, optimizer_name: str) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Three steps; returns the losses and, per step, every gradient gathered to its full shape."""
    model = build_model(config, seed=SEED)
    parameters = list(model.parameters())
    optimizer = (torch.optim.Adam(parameters, lr=1e-3) if optimizer_name == "adam"
                 else torch.optim.SGD(parameters, lr=0.5))
    losses, gradients = [], []
    for tokens in training_batches():
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()  # mean over every token of the global batch
        loss.backward()
        layers.allreduce_sequence_parallel_grads(model, model.layout)
        losses.append(loss.item())
        gradients.append({name: gather_full(param.grad, param) for name, param in model.named_parameters()})
        optimizer.step()
    return losses, gradients


def gather_full(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None:
        return tensor.clone()
    return comm.all_gather_along(tensor, dim, state.current_layout().tensor_group).clone()


def compare_to_reference(losses, gradients, reference, optimizer: str) -> list[str]:
    """Problems found: losses beyond LOSS_RTOL, gradients beyond their step's bound (on the scale of each reference
    gradient); [] when equal."""
    problems = []
    ref_losses, ref_gradients = reference
    for step, (loss, ref) in enumerate(zip(losses, ref_losses)):
        if abs(loss - ref) > LOSS_RTOL * abs(ref):
            problems.append(f"step {step}: loss {loss!r} != {ref!r}")
    for step, (grads, ref_grads) in enumerate(zip(gradients, ref_gradients)):
        if grads.keys() != ref_grads.keys():
            problems.append(f"step {step}: parameter names differ: {sorted(grads.keys() ^ ref_grads.keys())}")
        for name in ref_grads.keys() & grads.keys():
            rows = min(grads[name].shape[0], ref_grads[name].shape[0])  # vocabulary padding grows with tp
            difference = scaled_difference(grads[name][:rows], ref_grads[name][:rows])
            bound = FIRST_STEP_GRAD_TOL if step == 0 else LATER_STEP_GRAD_TOL[optimizer]
            if not difference <= bound:
                problems.append(f"step {step}: gradient of {name} differs by {difference:.2e} of its scale "
                                f"(bound {bound:.0e})")
    return problems


# ---------------------------------------------------------------- checks that run on every rank

def _full_and_local(generator, shape, dim, tp, rank):
    full = torch.randn(shape, generator=generator)
    return full, full.chunk(tp, dim)[rank].clone()


def check_layers(tp: int) -> dict[str, float]:
    """Difference to the plain computation (on the scale of its values), per layer and setting."""
    layout, diffs = state.current_layout(), {}
    rank = layout.tensor_rank
    b, s, h_in, h_out, vocab = 2, 8, 8, 12 * tp, 16 * tp
    for sequence_parallel in (False, True):
        with state.use_layout(dataclasses.replace(layout, sequence_parallel=sequence_parallel)):
            generator = torch.Generator().manual_seed(3)
            x_full = torch.randn(b, s, h_in, generator=generator)
            upstream_full = torch.randn(b, s, h_out, generator=generator)
            tag = f" sp={sequence_parallel}"
            shard = (lambda t: t.chunk(tp, 1)[rank]) if sequence_parallel else (lambda t: t)

            weight, local_weight = _full_and_local(generator, (h_out, h_in), 0, tp, rank)
            bias, local_bias = _full_and_local(generator, (h_out,), 0, tp, rank)
            reference = _reference_grads(lambda x, w, c: F.linear(x, w, c), x_full, weight, bias, upstream_full)
            layer = layers.ColumnParallelLinear(h_in, h_out, bias=True)
            layer.weight.data.copy_(local_weight)
            layer.bias.data.copy_(local_bias)
            x = shard(x_full).clone().requires_grad_()
            y = layer(x)
            y.backward(upstream_full.chunk(tp, -1)[rank])
            name = f"column{tag}"
            diffs[name + " output"] = scaled_difference(y, reference["y"].chunk(tp, -1)[rank])
            diffs[name + " input grad"] = scaled_difference(x.grad, shard(reference["x"]))
            diffs[name + " weight grad"] = scaled_difference(gather_full(layer.weight.grad, layer.weight),
                                                             reference["w"])
            diffs[name + " bias grad"] = scaled_difference(gather_full(layer.bias.grad, layer.bias), reference["b"])

            weight, local_weight = _full_and_local(generator, (h_in, h_out), 1, tp, rank)
            bias = torch.randn(h_in, generator=generator)
            upstream_row = torch.randn(b, s, h_in, generator=generator)
            x_row = torch.randn(b, s, h_out, generator=generator)
            reference = _reference_grads(lambda x, w, c: F.linear(x, w, c), x_row, weight, bias, upstream_row)
            layer = layers.RowParallelLinear(h_out, h_in, bias=True)
            layer.weight.data.copy_(local_weight)
            layer.bias.data.copy_(bias)
            x = x_row.chunk(tp, -1)[rank].clone().requires_grad_()
            y = layer(x)
            y.backward(shard(upstream_row))
            layers.allreduce_sequence_parallel_grads(layer, layer.layout)  # the bias saw only this rank's tokens
            name = f"row{tag}"
            diffs[name + " output"] = scaled_difference(y, shard(reference["y"]))
            diffs[name + " input grad"] = scaled_difference(x.grad, reference["x"].chunk(tp, -1)[rank])
            diffs[name + " weight grad"] = scaled_difference(gather_full(layer.weight.grad, layer.weight),
                                                             reference["w"])
            diffs[name + " bias grad"] = scaled_difference(layer.bias.grad, reference["b"])

            weight, local_weight = _full_and_local(generator, (vocab, h_in), 0, tp, rank)
            ids = torch.randint(0, vocab, (b, s), generator=generator)
            upstream_embedding = torch.randn(b, s, h_in, generator=generator)
            reference = _reference_grads(lambda i, w, _: F.embedding(i, w), ids, weight, None, upstream_embedding)
            layer = layers.VocabParallelEmbedding(vocab, h_in)
            layer.weight.data.copy_(local_weight)
            y = layer(ids)
            y.backward(shard(upstream_embedding))
            diffs["embedding output" + tag] = scaled_difference(y, shard(reference["y"]))
            diffs["embedding weight grad" + tag] = scaled_difference(gather_full(layer.weight.grad, layer.weight),
                                                                     reference["w"])
    return diffs


def _reference_grads(function, x, weight, bias, upstream) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(x.is_floating_point())
    weight = weight.clone().requires_grad_()
    bias = bias.clone().requires_grad_() if bias is not None else None
    y = function(x, weight, bias)
    y.backward(upstream)
    return dict(y=y.detach(), x=x.grad, w=weight.grad, b=bias.grad if bias is not None else None)


def check_cross_entropy(tp: int) -> dict[str, float]:
    layout = state.current_layout()
    rank = layout.tensor_rank
    padded = -(-CE_VOCAB // (8 * tp)) * 8 * tp  # the last rank(s) hold padding columns
    generator = torch.Generator().manual_seed(5)
    logits_full = torch.randn(2, 6, padded, generator=generator) * 3
    labels = torch.randint(0, CE_VOCAB, (2, 6), generator=generator)
    labels[0, 0], labels[1, -1] = -100, CE_VOCAB - 1  # torch's ignore_index, and the last real token
    weights = torch.rand(2, 6, generator=generator)
    reference_logits = logits_full.clone().requires_grad_()
    reference = F.cross_entropy(reference_logits[..., :CE_VOCAB].reshape(-1, CE_VOCAB), labels.view(-1),
                                reduction="none").view(2, 6)
    (reference * weights).sum().backward()
    local = logits_full.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, CE_VOCAB, layout.tensor_group)
    (loss * weights).sum().backward()
    real_columns = min(max(CE_VOCAB - rank * local.shape[-1], 0), local.shape[-1])
    padding_grad = local.grad[..., real_columns:]
    return {"loss": scaled_difference(loss, reference.detach()),
            "logit grad": scaled_difference(local.grad, reference_logits.grad.chunk(tp, -1)[rank]),
            "padding grad": padding_grad.abs().max().item() if padding_grad.numel() else 0.0}


def cross_entropy_agrees(diffs: dict[str, float]) -> bool:
    return (diffs["loss"] <= CROSS_ENTROPY_TOL and diffs["logit grad"] <= CROSS_ENTROPY_TOL
            and diffs["padding grad"] == 0)


def check_initialisation() -> dict[str, torch.Tensor]:
    """This rank's initial values of a model with padding, gathered to full shape."""
    model = build_model(dataclasses.replace(MODEL, num_query_groups=state.current_layout().tensor_size), seed=SEED)
    return {name: gather_full(param.data, param) for name, param in model.named_parameters()}


def check_random_states() -> torch.Tensor:
    set_random_seeds(SEED, state.current_layout())
    return torch.rand(16)


def run_layout(tp: int, references: dict[str, tuple]) -> dict:
    """Everything checked at this layout; model runs are compared on the rank, only problems return."""
    results = {"training": {}}
    if tp == 2:  # tp=1 inside a process group (two data-parallel copies) must also be the single process
        with state.parallel_layout(1, 1):
            for case in model_cases(1):
                results["training"][case["name"]] = compare_to_reference(*train(case["config"], case["optimizer"]),
                                                                         references[case["name"]], case["optimizer"])
    with state.parallel_layout(tp, 1) as layout:
        results["layers"] = check_layers(tp)
        results["cross entropy"] = check_cross_entropy(tp)
        results["init"] = check_initialisation()
        results["rng"] = check_random_states()
        for case in model_cases(tp):
            with state.use_layout(dataclasses.replace(layout, sequence_parallel=case["sequence_parallel"])):
                losses, gradients = train(case["config"], case["optimizer"])
            results["training"][case["name"]] = compare_to_reference(losses, gradients, references[case["name"]],
                                                                     case["optimizer"])
    return results


def layout_cases(tp: int) -> list[dict]:
    return model_cases(tp) + (model_cases(1) if tp == 2 else [])


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def layout(request):
    tp = request.param
    references = {case["name"]: train(case["config"], case["optimizer"]) for case in layout_cases(tp)}
    return tp, run_distributed(run_layout, world_size=tp, args=(tp, references))


# ---------------------------------------------------------------- the properties

def test_parallel_layers_match_plain_layers_outputs_and_gathered_grads(layout):
    tp, ranks = layout
    for rank, results in enumerate(ranks):
        too_far = {name: diff for name, diff in results["layers"].items() if not diff <= LAYER_TOL}
        assert not too_far, f"tp={tp} rank {rank}: {too_far}"


def test_vocab_parallel_cross_entropy_equals_torch_values_and_grads_with_padding(layout):
    tp, ranks = layout
    for rank, results in enumerate(ranks):
        diffs = results["cross entropy"]
        assert cross_entropy_agrees(diffs), (tp, rank, diffs)


def test_parallel_initialisation_is_a_slice_of_single_process_initialisation(layout):
    tp, ranks = layout
    reference = build_model(dataclasses.replace(MODEL, num_query_groups=tp), seed=SEED)
    for name, param in reference.named_parameters():
        full = ranks[0]["init"][name]
        rows = min(full.shape[0], param.shape[0])  # the vocabulary padding grows with tp
        assert torch.equal(full[:rows], param.data[:rows]), name
        for other in ranks[1:]:
            assert torch.equal(other["init"][name], full), f"{name}: replicated values differ across tensor ranks"


def test_seeded_random_numbers_agree_across_tensor_ranks(layout):
    _, ranks = layout
    defaults = [results["rng"] for results in ranks]
    assert all(torch.equal(value, defaults[0]) for value in defaults)


def test_three_training_steps_give_single_process_losses_and_gradients(layout):
    tp, ranks = layout
    for rank, results in enumerate(ranks):
        assert sorted(results["training"]) == sorted(case["name"] for case in layout_cases(tp))
        failures = {name: problems for name, problems in results["training"].items() if problems}
        assert not failures, f"rank {rank}: {failures}"


# ---------------------------------------------------------------- single process, no process group

def test_reference_training_actually_learns():
    losses, _ = train(model_cases(1)[0]["config"], "sgd")
    assert losses[-1] < losses[0] - 1e-3, losses  # otherwise equal losses would prove little


def test_cross_entropy_without_process_group_equals_torch_and_ignores_padding():
    diffs = check_cross_entropy(1)
    assert cross_entropy_agrees(diffs), diffs


def test_initial_rows_of_the_real_vocabulary_do_not_depend_on_padding():
    embeddings = [layers.VocabParallelEmbedding(rows, 16) for rows in (200, 256, 512)]
    for embedding in embeddings:
        layers.initialize_parameters(torch.nn.ModuleDict({"embedding": embedding}), SEED, embedding.layout)
    assert all(torch.equal(e.weight[:200], embeddings[0].weight) for e in embeddings[1:])
    other_seed = layers.VocabParallelEmbedding(200, 16)
    layers.initialize_parameters(torch.nn.ModuleDict({"embedding": other_seed}), SEED + 1, other_seed.layout)
    assert not torch.equal(other_seed.weight, embeddings[0].weight)
    assert abs(embeddings[2].weight.std().item() - 0.02) < 0.002


def test_recompute_replays_the_random_state():
    linear = torch.nn.Linear(16, 16)

    def block(x):
        return torch.tanh(F.dropout(linear(x), p=0.5))

    x = torch.randn(4, 16)
    results = []
    for recompute in (False, True):
        set_random_seeds(SEED, ParallelLayout.single_process())
        linear.zero_grad()
        inputs = x.clone().requires_grad_()
        y = checkpoint(block, inputs) if recompute else block(inputs)
        y.sum().backward()
        after = torch.rand(1)  # the generator advanced exactly once
        results.append((y.detach(), inputs.grad, linear.weight.grad.clone(), after))
    (y0, gx0, gw0, after0), (y1, gx1, gw1, after1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gw0, gw1)
    assert torch.equal(after0, after1)
