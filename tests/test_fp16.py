"""fp16 loss scaling, on the CPU: the dynamic scaler's rules against hand-computed scales, the unscale of both
optimizers (replicated in this process, distributed over dp=2 gloo ranks), and fp16 steps equal to fp32 steps.

How the gradients are made: `backward_known_gradients` runs backward of a loss linear in the parameters, whose
gradient with respect to each fp16 parameter is a chosen fp32 tensor g times the optimizer's loss scale S, so
param.grad is fp16(S * g), with no forward pass. g is drawn so that S * g is an fp16 number: an fp16 run at scale
S and the reference, an fp32 copy of the same weights trained on g with no loss scaler, see the same gradients,
and their steps agree bit for bit (the tiny Llama's real fp16 backward, with its rounding, is tested through
`train_step`). S = 2**12 makes a missing unscale a 4096x error; Adam's update is nearly invariant to the scale,
so the tests compare what is not: plain SGD updates, Adam's exp_avg / exp_avg_sq, the reported grad norm, and
clipping at a limit between the unscaled and the scaled norm.

What the CPU covers: torch's CPU build stores float16 and runs its elementwise ops, matmuls and attention, so the
optimizers, the loss scalers and the tiny Llama's fp16 forward and backward through `train_step` all run here.
What only a GPU run covers: the CUDA fp16 kernels of a real run (cuBLAS matmuls, flash/efficient attention,
the compiled elementwise regions and the fused head + cross entropy, each on by default only on CUDA), the fused
AdamW implementations (torch's fused=True, apex FusedAdam), and --fp16 through pretrain.py, which trains a CPU
run in fp32 (arguments.py says so in the log).
"""
import copy
import math

import pytest
import torch

from data_parallel_training import BETAS, BUCKET_SIZE, EPS, LR, MODEL, SEED, WEIGHT_DECAY
from data_parallel_training import one_intra_op_thread  # noqa: F401 - a fixture, used below
from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.optim.distributed_optimizer import reshard_optimizer_state
from megatron_llama.optim.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_llama.optim.mixed_precision import MixedPrecisionOptimizer
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.objectives.language_model import token_mean_loss
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SCALE = 2.0**12  # S: fp16(S * g) stays finite for |g| < 16


# ---------------------------------------------------------------- the dynamic loss scaler, by hand


def scales_after(scaler: DynamicLossScaler, overflows: str) -> list[float]:
    """The scale after each update; `overflows` spells the steps: "x" an overflow, "." a clean step."""
    scales = []
    for step in overflows:
        scaler.update(found_overflow=step == "x")
        scales.append(scaler.scale)
    return scales


def test_scale_grows_by_the_growth_factor_after_each_window_of_clean_steps():
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    assert scales_after(scaler, ".......") == [1024, 1024, 2048, 2048, 2048, 4096, 4096]
    tripling = DynamicLossScaler(initial_scale=1024.0, growth_interval=2, growth_factor=3.0)
    assert scales_after(tripling, "....") == [1024, 3072, 3072, 9216]


def test_an_overflow_restarts_the_window_of_clean_steps():
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    # the overflow is absorbed by hysteresis (no backoff) but the two clean steps before it no longer count
    assert scales_after(scaler, "..x...") == [1024, 1024, 1024, 1024, 1024, 2048]


def test_backoff_waits_for_hysteresis_overflows_then_halves_on_each_until_a_growth_refills_it():
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=2, hysteresis=3)
    assert scales_after(scaler, "xxxx") == [1024, 1024, 512, 256]
    assert scales_after(scaler, ".x") == [256, 128]  # clean steps alone do not refill the hysteresis
    assert scales_after(scaler, "..") == [128, 256]  # a growth does
    assert scales_after(scaler, "xxx") == [256, 256, 128]
    quartering = DynamicLossScaler(initial_scale=1024.0, hysteresis=1, backoff_factor=0.25)
    assert scales_after(quartering, "xx") == [256, 64]


@pytest.mark.parametrize("initial, floor, expected", [(8.0, 2.0, [4, 2, 2]), (12.0, 5.0, [6, 5, 5])])
def test_backoff_stops_at_min_scale(initial, floor, expected):
    scaler = DynamicLossScaler(initial_scale=initial, min_scale=floor, growth_interval=2, hysteresis=1)
    assert scales_after(scaler, "xxx") == expected
    assert scales_after(scaler, "..") == [expected[-1], 2 * expected[-1]]  # and grows again from the floor


def test_a_restored_scaler_continues_its_window_and_hysteresis():
    settings = dict(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    for history, future, expected in (("x..", ".xx", [2048, 2048, 1024]),  # two clean steps of 3 count: grows at once
                                      ("..x", "x", [512])):  # one overflow of the hysteresis 2 is used up
        interrupted = DynamicLossScaler(**settings)
        scales_after(interrupted, history)
        restored = DynamicLossScaler(**settings)
        restored.load_state_dict(interrupted.state_dict())
        assert scales_after(restored, future) == scales_after(interrupted, future) == expected


def test_a_run_resumed_with_a_shorter_window_grows_at_its_next_clean_step():
    saved = DynamicLossScaler(initial_scale=1024.0, growth_interval=1000, hysteresis=2)
    scales_after(saved, "." * 500)
    resumed = DynamicLossScaler(initial_scale=1024.0, growth_interval=100, hysteresis=2)  # --loss-scale-window 100
    resumed.load_state_dict(saved.state_dict())
    assert scales_after(resumed, "." * 101) == [2048] + [2048] * 99 + [4096]


def test_resuming_across_scaler_kinds_keeps_the_flag_of_a_constant_scale_and_the_saved_dynamic_scale():
    constant_saved = ConstantLossScaler(256.0).state_dict()
    dynamic = DynamicLossScaler(initial_scale=1024.0, growth_interval=2, hysteresis=2)
    dynamic.load_state_dict(constant_saved)  # --loss-scale dropped on resume: dynamic from the saved scale
    assert scales_after(dynamic, ".x.x..") == [256, 256, 256, 128, 128, 256]
    dynamic_saved = DynamicLossScaler(initial_scale=2.0**20).state_dict()
    constant = ConstantLossScaler(128.0)
    constant.load_state_dict(dynamic_saved)  # --loss-scale 128 given on resume: the flag wins
    assert constant.scale == 128.0


def test_scales_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="initial >= min"):
        DynamicLossScaler(initial_scale=1.0, min_scale=2.0)
    with pytest.raises(ValueError, match="positive"):
        DynamicLossScaler(initial_scale=0.0)


# ---------------------------------------------------------------- gradients of known values


def known_gradients(seed: int) -> dict[str, torch.Tensor]:
    """fp32 gradients g for every parameter of MODEL, spread over four orders of magnitude (|g| < 8), each one
    that an fp16 backward at scale S delivers exactly: S * g is an fp16 number. An fp32 run on g and an fp16 run
    at scale S then see the same gradients, and their updates may differ only by fp32 rounding."""
    generator = torch.Generator().manual_seed(seed)
    gradients = {}
    for name, param in build_model(MODEL, seed=SEED).named_parameters():
        magnitude = 10.0 ** torch.empty(param.shape).uniform_(-4, 0, generator=generator)
        drawn = torch.randn(param.shape, generator=generator) * magnitude
        gradients[name] = (SCALE * drawn).half().float() / SCALE
    return gradients


def with_bad_element(gradients: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """`gradients` with one element of one weight set to `value` (inf or nan), as an overflowing backward leaves."""
    bad = {name: grad.clone() for name, grad in gradients.items()}
    bad["layers.1.mlp.down.weight"][3, 5] = value
    return bad


def backward_known_gradients(model, optimizer, gradients: dict[str, torch.Tensor]):
    """A step's backward whose fp32 main grads become S * g (through fp16 param.grad for an fp16 model), finalized.
    The loss is linear in the parameters, so its gradient is exactly g before the loss scale S multiplies it."""
    optimizer.zero_grad()
    loss = sum((param.float() * gradients[name]).sum() for name, param in model.named_parameters())
    optimizer.scale_loss(loss).backward()
    finalize_model_grads(model, optimizer.buffers, state.current_layout())


def fp16_model_and_its_fp32_copy():
    """The fp16 tiny Llama and an fp32 model holding the same (fp16-rounded) weights."""
    fp16 = build_model(MODEL, seed=SEED, dtype=torch.float16)
    fp32 = build_model(MODEL, seed=SEED)
    fp32.load_state_dict({name: value.float() for name, value in fp16.state_dict().items()})
    return fp16, fp32


def sgd(groups):
    return torch.optim.SGD(groups, lr=LR)


def adamw(groups):
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)


def replicated(model, inner, *, clip_grad: float = 0.0, loss_scaler=None) -> MixedPrecisionOptimizer:
    return MixedPrecisionOptimizer(model, DataParallelBuffers(model, bucket_size=BUCKET_SIZE), inner,
                                   weight_decay=WEIGHT_DECAY, clip_grad=clip_grad, loss_scaler=loss_scaler)


def norm_of(gradients: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(grad.double().square().sum()) for grad in gradients.values()))


def masters(optimizer: MixedPrecisionOptimizer) -> dict[str, torch.Tensor]:
    return {name: master.detach().clone() for name, master in optimizer.master_params.items()}


def adam_states(optimizer: MixedPrecisionOptimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Parameter name -> a copy of its inner optimizer state (exp_avg, exp_avg_sq, step)."""
    return {name: copy.deepcopy(optimizer.optimizer.state[master]) for name, master in optimizer.master_params.items()}


def adam_state(optimizer: MixedPrecisionOptimizer, key: str) -> dict[str, torch.Tensor]:
    return {name: optimizer.optimizer.state[master][key] for name, master in optimizer.master_params.items()}


def assert_all_equal(values: dict[str, torch.Tensor], references: dict[str, torch.Tensor]):
    assert values.keys() == references.keys()
    for name, reference in references.items():
        difference = float((values[name] - reference).abs().max())
        assert torch.equal(values[name], reference), f"{name}: largest difference {difference:.3g}"


def worst_relative_difference(values: dict[str, torch.Tensor], references: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||value - reference|| / ||reference||."""
    return max(float((values[name] - reference).norm() / reference.norm()) for name, reference in references.items())


# ---------------------------------------------------------------- the replicated optimizer's unscale


def test_main_grads_are_unscaled_to_the_fp16_gradients_divided_by_the_scale():
    model, _ = fp16_model_and_its_fp32_copy()
    optimizer = replicated(model, sgd, loss_scaler=ConstantLossScaler(SCALE))
    gradients = known_gradients(seed=0)
    backward_known_gradients(model, optimizer, gradients)
    outcome = optimizer.step(LR)
    assert not outcome.skipped
    assert all(param.grad is None for param in model.parameters())  # the hook moved every grad into main_grad
    assert_all_equal({name: param.main_grad for name, param in model.named_parameters()}, gradients)  # S = 2**12
    assert outcome.grad_norm == pytest.approx(norm_of(gradients), rel=1e-6)  # the unscaled norm (measured 1e-7)


def test_an_fp16_sgd_step_moves_the_masters_as_the_fp32_step_does():
    fp16, fp32 = fp16_model_and_its_fp32_copy()
    scaled = replicated(fp16, sgd, loss_scaler=DynamicLossScaler(initial_scale=SCALE))
    plain = replicated(fp32, sgd)
    for seed in (0, 1):
        gradients = known_gradients(seed)
        for model, optimizer in ((fp16, scaled), (fp32, plain)):
            backward_known_gradients(model, optimizer, gradients)
            optimizer.step(LR)
    # SGD's update is -lr * g (S = 4096 times too large unscaled). The same fp32 gradients reach the same fp32
    # arithmetic, so the masters agree bit for bit (measured: equal).
    assert_all_equal(masters(scaled), masters(plain))
    for name, param in fp16.named_parameters():
        assert torch.equal(param, scaled.master_params[name].half()), name


@pytest.mark.parametrize("limit", ["between the unscaled and the scaled norm", "half the unscaled norm"])
def test_clipping_compares_the_unscaled_norm_with_the_limit(limit):
    model, _ = fp16_model_and_its_fp32_copy()
    gradients = known_gradients(seed=0)
    norm = norm_of(gradients)
    clip_grad = 2 * norm if limit.startswith("between") else norm / 2
    optimizer = replicated(model, sgd, clip_grad=clip_grad, loss_scaler=ConstantLossScaler(SCALE))
    backward_known_gradients(model, optimizer, gradients)
    outcome = optimizer.step(LR)
    coefficient = min(1.0, clip_grad / (norm + 1e-6))
    clipped = {name: param.main_grad for name, param in model.named_parameters()}
    expected = {name: grad * coefficient for name, grad in gradients.items()}
    # the norm before clipping, and the clipped grads, to fp32 rounding (measured 7e-8 and 1.6e-7 relative)
    assert outcome.grad_norm == pytest.approx(norm, rel=1e-6)
    measured = worst_relative_difference(clipped, expected)
    assert measured < 1e-6, measured


def test_adam_states_of_fp16_steps_equal_the_fp32_steps():
    fp16, fp32 = fp16_model_and_its_fp32_copy()
    scaled = replicated(fp16, adamw, clip_grad=1e9, loss_scaler=DynamicLossScaler(initial_scale=SCALE))
    plain = replicated(fp32, adamw, clip_grad=1e9)
    for seed in (0, 1, 2):
        gradients = known_gradients(seed)
        for model, optimizer in ((fp16, scaled), (fp32, plain)):
            backward_known_gradients(model, optimizer, gradients)
            optimizer.step(LR)
    # exp_avg and exp_avg_sq are not scale-invariant (S and S**2 times too large unscaled); measured: equal
    for key in ("exp_avg", "exp_avg_sq"):
        assert_all_equal(adam_state(scaled, key), adam_state(plain, key))
    assert_all_equal(masters(scaled), masters(plain))


@pytest.mark.parametrize("bad_value", [math.inf, math.nan], ids=["inf", "nan"])
def test_an_overflowing_step_leaves_masters_and_adam_states_untouched_and_backs_the_scale_off(bad_value):
    fp16, fp32 = fp16_model_and_its_fp32_copy()
    scaled = replicated(fp16, adamw, loss_scaler=DynamicLossScaler(initial_scale=SCALE, hysteresis=1))
    plain = replicated(fp32, adamw)
    for model, optimizer in ((fp16, scaled), (fp32, plain)):
        backward_known_gradients(model, optimizer, known_gradients(seed=0))
        optimizer.step(LR)
    masters_before, states_before = masters(scaled), adam_states(scaled)
    params_before = {name: param.detach().clone() for name, param in fp16.named_parameters()}

    backward_known_gradients(fp16, scaled, with_bad_element(known_gradients(seed=1), bad_value))
    outcome = scaled.step(LR)
    assert outcome.skipped and not math.isfinite(outcome.grad_norm)
    assert scaled.loss_scale == SCALE / 2
    assert_all_equal(masters(scaled), masters_before)
    assert_all_equal({name: param.detach() for name, param in fp16.named_parameters()}, params_before)
    for name, states in adam_states(scaled).items():
        assert states.keys() == states_before[name].keys()
        for key, value in states.items():
            assert torch.equal(value, states_before[name][key]), (name, key)

    # the next clean step continues as if the overflowing one had never been: as the fp32 run's second step
    for model, optimizer in ((fp16, scaled), (fp32, plain)):
        backward_known_gradients(model, optimizer, known_gradients(seed=2))
        assert not optimizer.step(LR).skipped
    assert_all_equal(masters(scaled), masters(plain))
    assert_all_equal(adam_state(scaled, "exp_avg"), adam_state(plain, "exp_avg"))


def test_a_constant_scale_still_skips_an_overflowing_step_and_stays():
    model, _ = fp16_model_and_its_fp32_copy()
    optimizer = replicated(model, adamw, loss_scaler=ConstantLossScaler(SCALE))
    before = masters(optimizer)
    backward_known_gradients(model, optimizer, with_bad_element(known_gradients(seed=0), math.inf))
    assert optimizer.step(LR).skipped
    assert optimizer.loss_scale == SCALE
    assert all(torch.equal(master, before[name]) for name, master in masters(optimizer).items())
    assert optimizer.optimizer.state == {}  # Adam never ran


# ---------------------------------------------------------------- the tiny Llama in fp16, through train_step


TOKENS = torch.randint(0, MODEL.vocab_size, (4, 9), generator=torch.Generator().manual_seed(SEED))  # [b, s + 1]


def llama_steps_until_one_is_clean(model, loss_scaler, max_steps: int = 12):
    """train_step (two micro-batches, AdamW via build_optimizer) until a step is not skipped; the optimizer
    and the (loss, grad norm, skipped, loss scale) of every step taken."""
    buffers = DataParallelBuffers(model, bucket_size=BUCKET_SIZE)
    optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                   lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                   clip_grad=1e9, loss_scaler=loss_scaler)
    batches = [(TOKENS[:2, :-1], TOKENS[:2, 1:]), (TOKENS[2:, :-1], TOKENS[2:, 1:])]
    steps = []
    for _ in range(max_steps):
        scale = optimizer.loss_scale
        loss, outcome = train_step(model, optimizer, batches, lr=LR, buffers=buffers,
                                   loss_fn=token_mean_loss(TOKENS[:, 1:].numel()),
                                   layout=ParallelLayout.single_process())
        steps.append((loss, outcome.grad_norm, outcome.skipped, scale))
        if not outcome.skipped:
            return optimizer, steps
    raise AssertionError(f"every step overflowed: {steps}")


def test_fp16_llama_backs_off_from_an_overflowing_scale_then_steps_as_the_fp32_model():
    fp16, fp32 = fp16_model_and_its_fp32_copy()
    plain, [(reference_loss, reference_norm, _, _)] = llama_steps_until_one_is_clean(fp32, None)
    scaled, steps = llama_steps_until_one_is_clean(fp16, DynamicLossScaler(initial_scale=2.0**24, hysteresis=1))
    *overflowed, (loss, grad_norm, _, _) = steps
    # 2**24 overflows fp16's backward; each skipped step halves the scale (measured: clean at 2**19) and leaves
    # the weights as they were, so every step's forward gives the same loss, bit for bit
    assert overflowed and all(skipped and not math.isfinite(norm) for _, norm, skipped, _ in overflowed)
    assert [step[3] for step in steps] == [2.0**24 / 2**k for k in range(len(steps))]
    assert all(step[0] == loss for step in steps)
    # the first clean fp16 step against the fp32 model's (measured relative differences: loss 2.8e-6, grad norm
    # 2.2e-5, exp_avg 9.0e-4, exp_avg_sq 1.6e-3 by tensor norm); unscaled, the norm and exp_avg would be
    # 2**19 times too large and exp_avg_sq 2**38 times
    assert loss == pytest.approx(reference_loss, rel=2e-5)
    assert grad_norm == pytest.approx(reference_norm, rel=2e-4)
    for key in ("exp_avg", "exp_avg_sq"):
        measured = worst_relative_difference(adam_state(scaled, key), adam_state(plain, key))
        assert measured < 1e-2, (key, measured)


# ---------------------------------------------------------------- the distributed optimizer at dp=2


def distributed_fp16_steps(steps_of_rank: list[list[dict[str, torch.Tensor]]], clip_grad: float) -> dict:
    """On this gloo rank of a dp=2 run: the fp16 tiny Llama under the distributed optimizer (AdamW, dynamic scale S,
    hysteresis 1) takes one step per entry of steps_of_rank[rank], with those gradients; what it ends with."""
    with state.parallel_layout():
        model = build_model(MODEL, seed=SEED, dtype=torch.float16)
        buffers = DataParallelBuffers(model, state.current_layout().data_group, bucket_size=BUCKET_SIZE,
                                      use_distributed_optimizer=True)
        optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                       lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                       clip_grad=clip_grad, loss_scaler=DynamicLossScaler(SCALE, hysteresis=1))
        record = {"outcomes": [], "scales": []}
        for gradients in steps_of_rank[state.current_layout().data_rank]:
            # each rank's share of the global-batch loss: its gradient over the 2 ranks, which the buffers sum
            backward_known_gradients(model, optimizer, {name: grad / 2 for name, grad in gradients.items()})
            outcome = optimizer.step(LR)
            record["outcomes"].append((outcome.grad_norm, outcome.skipped))
            record["scales"].append(optimizer.loss_scale)
        buffers.finish_param_sync()
        record["shard"] = optimizer.state_dict()
        record["params"] = {name: param.detach().clone() for name, param in model.named_parameters()}
        return record


def whole_tensors(shards: list[dict], shapes: dict[str, torch.Size]) -> dict[str, dict[str, torch.Tensor]]:
    """State key (master, exp_avg, exp_avg_sq) -> parameter name -> the whole tensor, from every rank's shard."""
    merged = reshard_optimizer_state(shards, [(name, 0, shape.numel()) for name, shape in shapes.items()])
    out = {}
    for key, flat in merged["tensors"].items():
        values = flat.split([shape.numel() for shape in shapes.values()])
        out[key] = {name: value.view(shape) for (name, shape), value in zip(shapes.items(), values)}
    return out


@pytest.mark.parametrize("limit", ["between the unscaled and the scaled norm", "half the unscaled norm"])
def test_distributed_fp16_steps_equal_the_fp32_steps_and_skip_an_overflow_on_one_rank_everywhere(limit):
    """Rank r's gradients differ (seed 10 * step + r); the reduced gradient is their mean. Step 2 overflows on
    rank 1 only: both ranks must skip it and halve the scale; the run must then equal an fp32 run of steps 1
    and 3 on the mean gradients."""
    steps_of_rank = [[known_gradients(10 * step + rank) for step in range(3)] for rank in range(2)]
    steps_of_rank[1][1] = with_bad_element(steps_of_rank[1][1], math.inf)
    means = [{name: (steps_of_rank[0][step][name] + steps_of_rank[1][step][name]) / 2
              for name in steps_of_rank[0][step]} for step in (0, 2)]
    norm = norm_of(means[0])
    clip_grad = 2 * norm if limit.startswith("between") else norm / 2
    records = run_distributed(distributed_fp16_steps, world_size=2, args=(steps_of_rank, clip_grad))

    _, fp32 = fp16_model_and_its_fp32_copy()
    plain = replicated(fp32, adamw, clip_grad=clip_grad)
    reference_norms = []
    for gradients in means:
        backward_known_gradients(fp32, plain, gradients)
        reference_norms.append(plain.step(LR).grad_norm)
    for record in records:
        (first_norm, first_skipped), (_, overflow_skipped), (last_norm, last_skipped) = record["outcomes"]
        assert (first_skipped, overflow_skipped, last_skipped) == (False, True, False)
        assert record["scales"] == [SCALE, SCALE / 2, SCALE / 2]
        assert [first_norm, last_norm] == pytest.approx(reference_norms, rel=1e-6)  # measured 7e-8

    shapes = {name: param.shape for name, param in fp32.named_parameters()}
    tensors = whole_tensors([record["shard"] for record in records], shapes)
    # Equal but for the order of the norm's sum, which moves the clipping coefficient in its last bits (measured
    # relative differences, clipping: exp_avg 7e-8, exp_avg_sq 1.4e-7, masters 6.6e-8; not clipping: none).
    # Unscaled, exp_avg and exp_avg_sq would be S and S**2 times too large when not clipping.
    for key in ("exp_avg", "exp_avg_sq"):
        measured = worst_relative_difference(tensors[key], adam_state(plain, key))
        assert measured < 1e-6, (key, measured)
    measured = worst_relative_difference(tensors["master"], masters(plain))
    assert measured < 5e-7, measured
    for record in records:  # both ranks hold the gathered update, rounded from the fp32 masters
        for name, param in record["params"].items():
            assert torch.equal(param, tensors["master"][name].half()), name
