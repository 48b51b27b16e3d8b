"""Pipeline parallelism gives the numbers of one process, within the 1F1B memory bound.

Pure checks first: the stage split (even, uneven, interleaved chunk assignment), the schedule
plans of every small (p, v, m) played out as NCCL would run them (each message reaches the
chunk and micro-batch that expects it, nothing deadlocks, the ideal number of ticks), the
1F1B activation bound, and freeing of sent outputs. Then two spawns (2 and 4 gloo ranks) train
tiny 8-layer models for three steps at pp 2/4, virtual 1/2, tp 1/2 (with and without sequence
parallelism), tied and untied, at the edge micro-batch counts, and compare losses and gradients
with a single process; the fixture keeps the results and each test asserts one property.
"""
import collections
import dataclasses

import pytest
import torch

from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import build_model
from megatron_llama.model.stage_model import build_model_chunks, llama_forward_step
from megatron_llama.parallel import comm, layers, state
from megatron_llama.parallel.pipeline import (ACTIVATION, BACKWARD, FORWARD, ScheduleStats, broadcast_from_last_stage,
                                              build_plans, check_micro_batch_count, compute_order, release_storage,
                                              run_schedule, warmup_forwards)
from megatron_llama.parallel.stages import allreduce_tied_embedding_grads, split_layers, sync_tied_embedding_weights
from megatron_llama.parallel.state import ParallelLayout

SEED = 4321
MODEL = ModelConfig(num_layers=8, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=60, make_vocab_size_divisible_by=16, max_position_embeddings=16,
                    attention_backend="eager")
STEPS, MICRO_BATCH, SEQ = 3, 2, 8
# Agreement measured in fp32 (gradient differences as a fraction of the reference tensor's largest value,
# tests/agreement.py); each bound stands 3-10x above. Losses: 1.9e-7 relative (the last stage sums its micro-batch
# losses in fp32, the reference in Python floats). Pipelining alone (tp 1, untied) runs every layer's math in the
# single process's order: the gradients of all three steps are bitwise equal, so they must be. With a tied
# embedding (its two copies' gradients summed) or tp 2, first-step gradients agree to 5.2e-7; later steps carry
# that rounding through the update: 1.5e-5 after SGD (lr 1), 6.8e-5 after Adam.
LOSS_RTOL = 1e-6
FIRST_STEP_GRAD_TOL = 3e-6
LATER_STEP_GRAD_TOL = {"sgd": 1e-4, "adam": 3e-4}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tiny matmuls: extra threads only contend for the shared cores (30x slower here), as in the forked ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- stage split

def test_even_split_gives_each_stage_an_equal_contiguous_block_range():
    assert split_layers(8, 4).ranges == (((0, 2),), ((2, 4),), ((4, 6),), ((6, 8),))
    assert split_layers(8, 1).ranges == (((0, 8),),)


def test_indivisible_layers_error_names_both_flags_and_numbers():
    with pytest.raises(ValueError, match=r"--num-layers 10 is not divisible by --pipeline-model-parallel-size 4"):
        split_layers(10, 4)


def test_uneven_split_takes_first_and_last_counts_and_shares_the_rest():
    assert split_layers(10, 4, first_stage_layers=1, last_stage_layers=3).ranges == (
        ((0, 1),), ((1, 4),), ((4, 7),), ((7, 10),))
    assert split_layers(7, 2, last_stage_layers=2).ranges == (((0, 5),), ((5, 7),))
    with pytest.raises(ValueError, match=r"leaves 7 layers for the other 2 stages"):
        split_layers(10, 4, first_stage_layers=1, last_stage_layers=2)
    with pytest.raises(ValueError, match="cannot be combined"):
        split_layers(8, 2, first_stage_layers=2, layers_per_virtual_stage=2)


def test_interleaved_chunk_c_on_rank_r_holds_model_chunk_c_times_pp_plus_r():
    split = split_layers(8, 2, layers_per_virtual_stage=2)
    assert split.ranges == (((0, 2), (4, 6)), ((2, 4), (6, 8)))
    split = split_layers(12, 3, layers_per_virtual_stage=2)
    for rank in range(3):
        for chunk in range(2):
            model_chunk = chunk * 3 + rank
            assert split.layer_range(rank, chunk) == (2 * model_chunk, 2 * model_chunk + 2)
    with pytest.raises(ValueError, match=r"must divide the 4 layers of each pipeline stage"):
        split_layers(8, 2, layers_per_virtual_stage=3)


def test_stage_chunks_hold_exactly_the_single_process_parameters_once_plus_the_tied_copy():
    config = dataclasses.replace(MODEL, untie_embeddings_and_output_weights=False)
    reference = dict(build_model(config, SEED).named_parameters())
    split = split_layers(8, 2, layers_per_virtual_stage=2)
    held = collections.Counter()
    for rank in range(2):
        for chunk in build_model_chunks(config, SEED, split, ParallelLayout.for_rank(rank, 2, pipeline_size=2)):
            for name, param in chunk.named_parameters():
                held[name] += 1
                assert torch.equal(param, reference[name]), f"rank {rank}: {name} initialised differently"
                assert getattr(param, "is_tied_embedding_copy", False) == (rank == 1 and name == "embedding.weight")
    assert set(held) == set(reference)
    assert {name for name, count in held.items() if count > 1} == {"embedding.weight"}


# ---------------------------------------------------------------- schedule plans

def _route(what: str, rank: int, chunk: int, p: int):
    """Where the checker expects a tensor to go: (rank, chunk) of its consumer."""
    if what == ACTIVATION:
        return (rank + 1, chunk) if rank < p - 1 else (0, chunk + 1)
    return (rank - 1, chunk) if rank > 0 else (p - 1, chunk - 1)


def play_like_nccl(plans, p: int, v: int, m: int) -> list[str]:
    """Run the plans with rendezvous semantics: a rank posts a step's sends and receives only after its
    previous step completed, and a step completes once each of its messages has met the peer's, matched in
    posting order per (sender, receiver). Returns the problems found."""
    problems = []
    sends, receives = collections.defaultdict(collections.deque), collections.defaultdict(collections.deque)
    position, pending, posted = [0] * p, [0] * p, [False] * p
    arrived = [set() for _ in range(p)]
    done = [collections.Counter() for _ in range(p)]
    while any(position[rank] < len(plans[rank]) for rank in range(p)):
        progress = False
        for rank in range(p):
            if position[rank] == len(plans[rank]) or posted[rank]:
                continue
            step = plans[rank][position[rank]]
            if step.action is not None:
                action = step.action
                key = (action.chunk, action.micro_batch)
                if action.kind == FORWARD and not (rank == 0 and action.chunk == 0):
                    if ("activation", *key) not in arrived[rank]:
                        problems.append(f"rank {rank} runs {action} before its input arrived")
                if action.kind == BACKWARD:
                    if done[rank][(FORWARD, key)] != 1:
                        problems.append(f"rank {rank} runs {action} before its forward")
                    if not (rank == p - 1 and action.chunk == v - 1) and ("gradient", *key) not in arrived[rank]:
                        problems.append(f"rank {rank} runs {action} before its output gradient arrived")
                done[rank][(action.kind, key)] += 1
            for transfer in step.transfers:
                peer = (rank + 1) % p if transfer.peer == "next" else (rank - 1) % p
                if transfer.direction == "send":
                    target = _route(transfer.what, rank, transfer.chunk, p)
                    sends[(rank, peer)].append((transfer.what, target, transfer.micro_batch))
                else:
                    receives[(peer, rank)].append((transfer.what, (rank, transfer.chunk), transfer.micro_batch))
            pending[rank], posted[rank], progress = len(step.transfers), True, True
        for channel in list(sends):
            while sends[channel] and receives[channel]:
                sent, expected = sends[channel].popleft(), receives[channel].popleft()
                if sent != expected:
                    problems.append(f"{channel}: {expected} expected, {sent} delivered")
                arrived[channel[1]].add((expected[0], expected[1][1], expected[2]))
                pending[channel[0]] -= 1
                pending[channel[1]] -= 1
                progress = True
        for rank in range(p):
            if posted[rank] and pending[rank] == 0:
                position[rank], posted[rank], progress = position[rank] + 1, False, True
        if not progress:
            return problems + [f"deadlock at steps {position}"]
    for rank in range(p):
        for kind in (FORWARD, BACKWARD):
            counts = [done[rank][(kind, (chunk, mb))] for chunk in range(v) for mb in range(m)]
            if kind == BACKWARD and not any(step.action and step.action.kind == BACKWARD for step in plans[rank]):
                continue
            if counts != [1] * (v * m):
                problems.append(f"rank {rank} runs some {kind} not exactly once")
    return problems


def small_layouts():
    for p in range(1, 6):
        for v in (1, 2, 3):
            for m in range(1, 13):
                if v == 1 or (p > 1 and m % p == 0):
                    yield p, v, m


def test_every_small_plan_delivers_each_message_to_its_consumer_without_deadlock():
    for p, v, m in small_layouts():
        for forward_only in (False, True):
            problems = play_like_nccl(build_plans(p, v, m, forward_only), p, v, m)
            assert not problems, (p, v, m, forward_only, problems[:5])


def test_plans_take_the_ideal_number_of_ticks_so_the_bubble_is_p_minus_1_over_v():
    # forward and backward of one chunk take one tick each: 2 m v ticks of work plus 2 (p - 1) of fill and drain
    for p, v, m in small_layouts():
        plans = build_plans(p, v, m)
        assert max(plan[-1].tick for plan in plans) + 1 == 2 * m * v + 2 * (p - 1), (p, v, m)


def _most_waiting(order) -> int:
    waiting = most = 0
    for action in order:
        waiting += 1 if action.kind == FORWARD else -1
        most = max(most, waiting)
    return most


def test_1f1b_warms_up_p_minus_rank_minus_1_and_holds_at_most_p_micro_batches():
    for p in range(1, 6):
        for m in range(1, 13):
            for rank in range(p):
                assert warmup_forwards(rank, p, 1, m) == min(p - rank - 1, m)
                assert _most_waiting(compute_order(rank, p, 1, m)) == min(p - rank, m) <= p


def test_interleaved_schedule_rejects_micro_batches_not_a_multiple_of_pp_with_the_numbers():
    with pytest.raises(ValueError, match=r"= 6\) to be a multiple of --pipeline-model-parallel-size 4.* 4 or 8"):
        check_micro_batch_count(6, 4, 2)
    with pytest.raises(ValueError, match="at least 1"):
        check_micro_batch_count(0, 2, 1)
    check_micro_batch_count(3, 4, 1)  # 1F1B takes any count, fewer than the stages included


def test_released_output_frees_its_storage_and_backward_gives_the_same_gradients():
    weight = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    (torch.tanh(x @ weight) + x).backward(upstream)
    expected = weight.grad.clone(), x.grad.clone()
    weight.grad = x.grad = None
    output = torch.tanh(x @ weight) + x
    release_storage(output)
    assert output.untyped_storage().nbytes() == output.element_size()
    torch.autograd.backward(output, grad_tensors=upstream)
    assert torch.equal(weight.grad, expected[0]) and torch.equal(x.grad, expected[1])


# ---------------------------------------------------------------- training, single process and pipelined

def training_batches(num_micro_batches: int) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(SEED + num_micro_batches)
    steps = []
    for _ in range(STEPS):
        tokens = torch.randint(0, MODEL.vocab_size, (num_micro_batches, MICRO_BATCH, SEQ + 1), generator=generator)
        steps.append([{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens])
    return steps


def make_optimizer(parameters, name: str):
    return torch.optim.Adam(parameters, lr=1e-2) if name == "adam" else torch.optim.SGD(parameters, lr=1.0)


def global_mean_loss(num_micro_batches: int):
    tokens = num_micro_batches * MICRO_BATCH * SEQ
    return lambda per_token_loss, micro_batch: per_token_loss.sum() / tokens


def train_single_process(config: ModelConfig, optimizer_name: str, num_micro_batches: int):
    model = build_model(config, SEED)
    optimizer = make_optimizer(model.parameters(), optimizer_name)
    loss_fn, losses, gradients = global_mean_loss(num_micro_batches), [], []
    for micro_batches in training_batches(num_micro_batches):
        optimizer.zero_grad()
        total = 0.0
        for batch in micro_batches:
            loss = loss_fn(model(batch["tokens"], batch["labels"]), batch)
            loss.backward()
            total += loss.item()
        losses.append(total)
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
        optimizer.step()
    with torch.no_grad():  # the trained model's loss on the first step's batches, as an evaluation would
        evaluation = sum(loss_fn(model(batch["tokens"], batch["labels"]), batch).item()
                         for batch in training_batches(num_micro_batches)[0])
    return losses, gradients, evaluation


def gather_full(tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    dim = getattr(param, "tensor_parallel_dim", None)
    if dim is None:
        return tensor.clone()
    return comm.all_gather_along(tensor, dim, state.current_layout().tensor_group).clone()


def train_pipelined(case: dict) -> dict:
    """Three steps on this rank's stage; losses (broadcast to every stage), gradients, schedule measurements."""
    config, m = case["config"], case["micro_batches"]
    split = split_layers(config.num_layers, case["pp"], layers_per_virtual_stage=case["layers_per_virtual_stage"])
    layout = state.current_layout()
    chunks = build_model_chunks(config, SEED, split, layout)
    optimizer = make_optimizer([param for chunk in chunks for param in chunk.parameters()], case["optimizer"])
    result = {"losses": [], "last stage losses": [], "gradients": [], "max live": [], "hook saw backwards": [],
              "sent outputs": 0, "sent outputs still holding data": 0}
    sent_outputs = []

    def forward_step(chunk, input_tensor, micro_batch):
        output = llama_forward_step(chunk, input_tensor, micro_batch)
        if not chunk.post_process:
            sent_outputs.append(output)
        return output

    for micro_batches in training_batches(m):
        optimizer.zero_grad()
        stats = ScheduleStats()
        losses = run_schedule(chunks, micro_batches, global_mean_loss(m), layout=layout, num_micro_batches=m,
                              micro_batch_size=MICRO_BATCH, seq_length=SEQ, hidden_size=config.hidden_size,
                              dtype=torch.float32, stats=stats, forward_step=forward_step,
                              after_last_backward=lambda: result["hook saw backwards"].append(stats.backwards))
        for chunk in chunks:
            layers.allreduce_sequence_parallel_grads(chunk, layout)
        allreduce_tied_embedding_grads(chunks, layout)
        result["last stage losses"].append(len(losses))
        total = torch.stack(losses).sum() if losses else torch.zeros(())
        result["losses"].append(broadcast_from_last_stage(total, layout).item())
        result["gradients"].append({name: gather_full(param.grad, param)
                                    for chunk in chunks for name, param in chunk.named_parameters()})
        result["max live"].append(stats.max_live_activations)
        result["backwards"] = stats.backwards
        result["sent outputs"] += len(sent_outputs)
        result["sent outputs still holding data"] += sum(output.untyped_storage().nbytes() > output.element_size()
                                                         for output in sent_outputs)
        sent_outputs.clear()
        optimizer.step()
    stats = ScheduleStats()
    losses = run_schedule(chunks, training_batches(m)[0], global_mean_loss(m), layout=layout, num_micro_batches=m,
                          micro_batch_size=MICRO_BATCH, seq_length=SEQ, hidden_size=config.hidden_size,
                          dtype=torch.float32, forward_only=True, stats=stats, forward_step=llama_forward_step)
    total = torch.stack(losses).sum() if losses else torch.zeros(())
    result["evaluation"] = broadcast_from_last_stage(total, layout).item()
    result["evaluation stats"] = stats
    if hasattr(chunks[-1], "embedding") and chunks[-1].post_process:
        result["final output embedding"] = gather_full(chunks[-1].embedding.weight.data, chunks[-1].embedding.weight)
    if chunks[0].pre_process:
        result["final input embedding"] = gather_full(chunks[0].embedding.weight.data, chunks[0].embedding.weight)
    return result


def compare(result: dict, reference, spec: dict) -> list[str]:
    """Problems found against the single process (bounds above: none where the math is the same); [] when equal."""
    bitwise = spec["tp"] == 1 and not spec["tied"]
    problems = []
    ref_losses, ref_gradients, ref_evaluation = reference
    if abs(result["evaluation"] - ref_evaluation) > LOSS_RTOL * abs(ref_evaluation):
        problems.append(f"forward-only loss {result['evaluation']!r} != {ref_evaluation!r}")
    for step, (loss, ref) in enumerate(zip(result["losses"], ref_losses)):
        if abs(loss - ref) > LOSS_RTOL * abs(ref):
            problems.append(f"step {step}: loss {loss!r} != {ref!r}")
    for step, (grads, ref_grads) in enumerate(zip(result["gradients"], ref_gradients)):
        bound = 0.0 if bitwise else FIRST_STEP_GRAD_TOL if step == 0 else LATER_STEP_GRAD_TOL[spec["optimizer"]]
        for name, grad in grads.items():
            rows = min(grad.shape[0], ref_grads[name].shape[0])  # vocabulary padding grows with tp
            difference = scaled_difference(grad[:rows], ref_grads[name][:rows])
            if not difference <= bound:
                problems.append(f"step {step}: gradient of {name} differs by {difference:.2e} of its scale "
                                f"(bound {bound:.0e})")
    return problems


def case(name, *, tp=1, pp, layers_per_virtual_stage=None, sp=False, tied, optimizer, micro_batches):
    config = dataclasses.replace(MODEL, untie_embeddings_and_output_weights=not tied)
    return dict(name=name, tp=tp, pp=pp, layers_per_virtual_stage=layers_per_virtual_stage, sp=sp, tied=tied,
                optimizer=optimizer, micro_batches=micro_batches, config=config)


def num_chunks(spec: dict) -> int:
    per_chunk = spec["layers_per_virtual_stage"]
    return 1 if per_chunk is None else MODEL.num_layers // spec["pp"] // per_chunk


def pipeline_rank(spec: dict, rank: int, world_size: int) -> int:
    return state.rank_coordinates(rank, spec["tp"], world_size // (spec["tp"] * spec["pp"]))["pp"]


CASES = {
    2: [case("pp2 1F1B untied m=4", pp=2, tied=False, optimizer="sgd", micro_batches=4),
        case("pp2 1F1B tied m=1", pp=2, tied=True, optimizer="adam", micro_batches=1),
        case("pp2 1F1B tied m=3", pp=2, tied=True, optimizer="sgd", micro_batches=3),
        case("pp2 v2 tied m=4", pp=2, layers_per_virtual_stage=2, tied=True, optimizer="sgd", micro_batches=4),
        case("pp2 v2 untied m=pp", pp=2, layers_per_virtual_stage=2, tied=False, optimizer="adam", micro_batches=2)],
    4: [case("pp4 1F1B tied m=2<pp", pp=4, tied=True, optimizer="sgd", micro_batches=2),
        case("pp4 1F1B untied m=6", pp=4, tied=False, optimizer="adam", micro_batches=6),
        case("pp4 v2 tied m=pp", pp=4, layers_per_virtual_stage=1, tied=True, optimizer="adam", micro_batches=4),
        case("pp4 v2 untied m=8", pp=4, layers_per_virtual_stage=1, tied=False, optimizer="sgd", micro_batches=8),
        case("pp2 x tp2 sp tied m=3", tp=2, pp=2, sp=True, tied=True, optimizer="sgd", micro_batches=3),
        case("pp2 x tp2 untied m=2", tp=2, pp=2, tied=False, optimizer="adam", micro_batches=2),
        case("pp2 v2 x tp2 sp untied m=4", tp=2, pp=2, layers_per_virtual_stage=2, sp=True, tied=False, optimizer="sgd",
             micro_batches=4)],
}


def run_cases(cases: list[dict], references: dict) -> dict:
    results = {}
    for spec in cases:
        with state.parallel_layout(spec["tp"], spec["pp"], sequence_parallel=spec["sp"]):
            result = train_pipelined(spec)
        result["problems"] = compare(result, references[spec["name"]], spec)
        del result["gradients"]
        results[spec["name"]] = result
    results["extras"] = check_interleaved_error_and_weight_sync()
    return results


def check_interleaved_error_and_weight_sync() -> dict:
    """At pp=2 (dp = world / 2): run_schedule refuses 3 micro-batches for 2 chunks; sync gives the last stage's
    copy the first stage's values."""
    extras = {}
    with state.parallel_layout(1, 2) as layout:
        config = dataclasses.replace(MODEL, untie_embeddings_and_output_weights=False)
        chunks = build_model_chunks(config, SEED, split_layers(8, 2, layers_per_virtual_stage=2), layout)
        try:
            run_schedule(chunks, training_batches(3)[0], global_mean_loss(3), layout=layout, num_micro_batches=3,
                         micro_batch_size=MICRO_BATCH, seq_length=SEQ, hidden_size=config.hidden_size,
                         dtype=torch.float32, forward_step=llama_forward_step)
        except ValueError as error:
            extras["error"] = str(error)
        weight = chunks[0].embedding.weight if chunks[0].pre_process else chunks[-1].embedding.weight
        if not chunks[0].pre_process:
            with torch.no_grad():
                weight.add_(1.0)
        sync_tied_embedding_weights(chunks, layout)
        extras["synced weight"] = weight.detach().clone()
    return extras


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world(request):
    cases = CASES[request.param]
    references = {spec["name"]: train_single_process(spec["config"], spec["optimizer"], spec["micro_batches"])
                  for spec in cases}
    return cases, references, run_distributed(run_cases, world_size=request.param, args=(cases, references))


def test_pipelined_training_gives_single_process_losses_and_gradients(world):
    cases, _, ranks = world
    for rank, results in enumerate(ranks):
        failures = {spec["name"]: results[spec["name"]]["problems"] for spec in cases
                    if results[spec["name"]]["problems"]}
        assert not failures, f"rank {rank}: {failures}"


def test_only_the_last_stage_returns_losses_one_per_micro_batch(world):
    cases, _, ranks = world
    for spec in cases:
        for rank, results in enumerate(ranks):
            last = pipeline_rank(spec, rank, len(ranks)) == spec["pp"] - 1
            expected = spec["micro_batches"] if last else 0
            assert results[spec["name"]]["last stage losses"] == [expected] * STEPS, (spec["name"], rank)


def test_1f1b_holds_at_most_pp_activations_measured(world):
    cases, _, ranks = world
    for spec in cases:
        if spec["layers_per_virtual_stage"] is not None:
            continue
        for rank, results in enumerate(ranks):
            measured = results[spec["name"]]["max live"]
            expected = min(spec["pp"] - pipeline_rank(spec, rank, len(ranks)), spec["micro_batches"])
            assert measured == [expected] * STEPS, (spec["name"], rank)
            assert max(measured) <= spec["pp"]


def test_after_last_backward_hook_runs_once_after_every_backward(world):
    cases, _, ranks = world
    for spec in cases:
        for results in ranks:
            result = results[spec["name"]]
            assert result["hook saw backwards"] == [result["backwards"]] * STEPS, spec["name"]
            assert result["backwards"] == spec["micro_batches"] * num_chunks(spec), spec["name"]


def test_forward_only_runs_no_backward_and_keeps_no_activations(world):
    cases, _, ranks = world
    for spec in cases:
        for results in ranks:
            stats = results[spec["name"]]["evaluation stats"]
            assert (stats.backwards, stats.max_live_activations) == (0, 0), spec["name"]
            assert stats.forwards == spec["micro_batches"] * num_chunks(spec), spec["name"]


def test_every_stage_frees_each_output_once_sent(world):
    cases, _, ranks = world
    for spec in cases:
        for rank, results in enumerate(ranks):
            result = results[spec["name"]]
            last_rank = pipeline_rank(spec, rank, len(ranks)) == spec["pp"] - 1
            sent_per_step = spec["micro_batches"] * (num_chunks(spec) - 1 if last_rank else num_chunks(spec))
            assert result["sent outputs"] == STEPS * sent_per_step, (spec["name"], rank)
            assert result["sent outputs still holding data"] == 0, (spec["name"], rank)


def test_tied_embedding_copies_stay_identical_through_training(world):
    cases, _, ranks = world
    for spec in cases:
        if not spec["tied"]:
            continue
        inputs = [results[spec["name"]]["final input embedding"] for results in ranks
                  if "final input embedding" in results[spec["name"]]]
        outputs = [results[spec["name"]]["final output embedding"] for results in ranks
                   if "final output embedding" in results[spec["name"]]]
        assert len(inputs) == len(outputs) == spec["tp"] > 0
        for first, last in zip(inputs, outputs):
            assert torch.equal(first, last), spec["name"]


def test_interleaved_schedule_refuses_3_micro_batches_at_pp2_on_every_rank(world):
    _, _, ranks = world
    for results in ranks:
        assert "multiple of --pipeline-model-parallel-size 2" in results["extras"]["error"]


def test_weight_sync_gives_the_last_stage_copy_the_first_stage_values(world):
    _, _, ranks = world
    for results in ranks[1:]:
        assert torch.equal(results["extras"]["synced weight"], ranks[0]["extras"]["synced weight"])


def test_no_pipelining_accumulates_the_single_process_gradients_and_calls_the_hook_last():
    config = MODEL
    micro_batches = training_batches(3)[0]
    reference_losses, reference_gradients, _ = train_single_process(config, "sgd", 3)
    model = build_model(config, SEED)
    seen = {}
    losses = run_schedule([model], iter(micro_batches), global_mean_loss(3), layout=model.layout, num_micro_batches=3,
                          micro_batch_size=MICRO_BATCH, seq_length=SEQ, hidden_size=config.hidden_size,
                          dtype=torch.float32, forward_step=llama_forward_step,
                          after_last_backward=lambda: seen.update(grad=model.layers["0"].mlp.up.weight.grad.clone()))
    assert len(losses) == 3
    # the single process's micro-batches in its order: the same sums, bitwise (measured so)
    assert sum(loss.item() for loss in losses) == reference_losses[0]
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, reference_gradients[0][name]), name
    assert torch.equal(seen["grad"], model.layers["0"].mlp.up.weight.grad)
