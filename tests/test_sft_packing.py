"""Packed rows: each document of a row computes the loss and gradients it would alone (block-diagonal causal attention,
positions restarting per document), at tp=1 and tp=2; the masks and positions the data side derives."""
import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.config import ModelConfig
from megatron_llama.data.packing import EodDocuments, pack_greedily, positions_within_documents
from megatron_llama.data_loader import collate_micro_batch
from megatron_llama.model.attention import eager_attention, sdpa_attention
from megatron_llama.model.llama import build_model
from megatron_llama.model.recompute import apply_recompute
from megatron_llama.parallel import state
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.layers import allreduce_sequence_parallel_grads

CONFIG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=96)
ROW = 33  # tokens per packed row: seq_length + 1, seq_length even for the sequence-parallel shards
LENGTHS = (9, 13, 6)  # three records, 28 tokens: 5 of padding


def records() -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) of each record: random tokens, the first third of each a prompt (mask 0)."""
    generator = np.random.default_rng(0)
    return [(generator.integers(3, CONFIG.vocab_size, size=length), (np.arange(length) >= length // 3).astype(int))
            for length in LENGTHS]


def packed_sample() -> dict:
    text, mask, documents = np.zeros(ROW, dtype=np.int64), np.zeros(ROW, dtype=np.int64), np.full(ROW, len(LENGTHS))
    start = 0
    for number, (ids, record_mask) in enumerate(records()):
        text[start:start + len(ids)], mask[start:start + len(ids)], documents[start:start + len(ids)] = \
            ids, record_mask, number
        start += len(ids)
    return {"text": text, "loss_mask": mask, "document_ids": documents,
            "position_ids": positions_within_documents(documents)}


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [b, s] and the gradients of its sum over learned labels (sequence-parallel norm gradients
    summed over tensor ranks, as the trainer does: each rank's share depends on where a record sits in the row)."""
    model.zero_grad()
    loss = model(batch["tokens"], batch["labels"], batch.get("position_ids"), batch.get("document_ids"))
    (loss * (batch["labels"] != IGNORE_INDEX)).sum().backward()
    allreduce_sequence_parallel_grads(model, state.current_layout())
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


def packed_against_alone(tp: int, sequence_parallel: bool, backend: str, recompute: str | None) -> dict:
    """Max differences between the packed row and the records run one by one (each padded to the row, which a
    causal model never looks at)."""
    layout = state.parallel_layout(tp, 1, sequence_parallel=sequence_parallel) if tp > 1 else contextlib.nullcontext()
    with layout:  # tp=1: a plain model, no process group
        model = build_model(dataclasses.replace(CONFIG, attention_backend=backend), seed=3)
        apply_recompute(model, recompute, "uniform" if recompute == "full" else None, 1 if recompute == "full" else None)
        packed_loss, packed_grads = loss_and_grads(model, collate_micro_batch([packed_sample()]))
        alone_grads, loss_error, start = None, 0.0, 0
        for ids, mask in records():
            text = np.zeros(ROW, dtype=np.int64)
            text[:len(ids)] = ids
            alone = collate_micro_batch([{"text": text, "loss_mask": np.pad(mask, (0, ROW - len(ids)))}])
            loss, grads = loss_and_grads(model, alone)
            span = slice(start, start + len(ids) - 1)  # the record's inputs that predict its own next tokens
            learned = alone["labels"][0, :len(ids) - 1] != IGNORE_INDEX
            loss_error = max(loss_error, float((packed_loss[0, span] - loss[0, :len(ids) - 1])[learned].abs().max()))
            alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}
            start += len(ids)
        grad_error = max(float((packed_grads[name] - alone_grads[name]).abs().max()) for name in packed_grads)
        grad_scale = max(float(grad.abs().max()) for grad in alone_grads.values())
        return {"loss": loss_error, "grad": grad_error, "grad_scale": grad_scale}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_packed_row_gives_each_record_its_own_loss_and_gradients_at_tp1(backend, recompute):
    errors = packed_against_alone(1, False, backend, recompute)
    assert errors["grad_scale"] > 1e-3  # the comparison is not of zeros
    # measured (tp1 and tp2): losses equal bitwise, gradients 4.2e-7 apart at most (1e-7 of the largest, 4.15)
    assert errors["loss"] < 1e-6 and errors["grad"] < 1e-6, errors


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_packed_row_gives_each_record_its_own_loss_and_gradients_at_tp2(sequence_parallel):
    for errors in run_distributed(packed_against_alone, world_size=2, args=(2, sequence_parallel, "sdpa", None)):
        assert errors["grad_scale"] > 1e-3
        assert errors["loss"] < 1e-6 and errors["grad"] < 1e-6, errors


def test_sdpa_and_eager_agree_on_a_document_mask_and_without_one_keep_the_plain_causal_path():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 10, 4, 8, generator=generator)
    k, v = torch.randn(2, 10, 2, 8, generator=generator), torch.randn(2, 10, 2, 8, generator=generator)
    documents = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    torch.testing.assert_close(sdpa_attention(q, k, v, documents), eager_attention(q, k, v, documents))
    torch.testing.assert_close(sdpa_attention(q, k, v, documents)[1:], sdpa_attention(q, k, v)[1:])  # one document
    second = sdpa_attention(q[:1, 4:], k[:1, 4:], v[:1, 4:])  # the second document of row 0, run alone
    torch.testing.assert_close(sdpa_attention(q, k, v, documents)[:1, 4:], second)


def test_positions_restart_at_each_document_and_greedy_packing_keeps_order():
    assert positions_within_documents(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])).tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert pack_greedily([5, 4, 3, 8, 1], capacity=9) == [[0, 1], [2], [3, 4]]


def test_eod_documents_give_megatron_reset_flags_fields_and_collate_cuts_them_to_the_inputs():
    eod = 2
    text = np.array([5, 6, eod, 7, 8, 9, eod, 4])
    sample = EodDocuments([{"text": text}], eod, reset_position_ids=True, reset_attention_mask=True,
                          eod_mask_loss=True)[0]
    assert sample["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert sample["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    batch = collate_micro_batch([sample])
    assert batch["tokens"][0].tolist() == text[:-1].tolist()
    assert batch["document_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    # no loss where the input is an EOD: the prediction of the next document's first token
    assert (batch["labels"][0] == IGNORE_INDEX).tolist() == [token == eod for token in text[:-1]]
    plain = EodDocuments([{"text": text}], eod, False, False, False)[0]
    assert set(plain) == {"text"} and set(collate_micro_batch([plain])) == {"tokens", "labels"}
