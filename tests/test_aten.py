"""The one aten-op recorder (calibration.aten) against what the ops really do, counted by hand:
causal attention with grouped K/V heads (forward and backward), embedding lookups (forward
and backward), views, allocations, in-place ops and copies — both as recorded and as the
committed census charges them, at two shapes each."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from calibration.aten import AtenOp, attention_flop_terms, decode, encode, record
from calibration.opcount import monomial
from estimator.cost.census import load_census, piece_work

FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"
FLASH_BWD = FLASH + "_backward"
ELEMENT = {torch.float32: 4, torch.bfloat16: 2}
# (batch, query heads, K/V heads, tokens, head dim, dtype): grouped heads, as the executor runs
ATTENTION_SHAPES = [(2, 8, 2, 10, 16, torch.float32), (3, 6, 3, 7, 8, torch.bfloat16)]
# (vocabulary rows, width, batch, tokens, dtype)
EMBEDDING_SHAPES = [(1000, 32, 3, 5, torch.float32), (517, 24, 2, 7, torch.bfloat16)]


def _only(ops: list[AtenOp], kind: str) -> AtenOp:
    (op,) = [o for o in ops if o.kind == kind]
    return op


def _census_op(dtype: torch.dtype, piece: str, op: str, **symbols: float) -> tuple[float, float]:
    """(FLOPs, bytes) the committed census charges for every ``op`` of ``piece`` at ``symbols``."""
    name = "float32" if dtype == torch.float32 else "bfloat16"
    entries = [e for e in load_census().piece(name, piece) if e["op"] == op]
    assert entries, f"{piece} ({name}) has no {op}"
    w = piece_work(entries, symbols)
    return float((w.count * w.flops).sum()), float((w.count * w.bytes).sum())


def _attention_hand_counts(b, h, hk, t, d, e):
    """Causal self-attention over t tokens: query i attends keys 0..i, t(t+1)/2 pairs per head.
    Forward: QKᵀ and P·V, 2·d FLOPs each per pair. Backward: five products per pair (scores
    recomputed, dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q), 2.5× the forward. Bytes: q, k, v
    in and o out (k and v with their hk heads: a K/V head is stored once for its group), the
    float32 log-sum-exp out; backward reads dO, q, k, v, o and the log-sum-exp and writes dq,
    dk, dv."""
    pairs = t * (t + 1) // 2
    fwd_flops = b * h * pairs * (2 * d + 2 * d)
    bwd_flops = b * h * pairs * 5 * (2 * d)
    q_bytes, kv_bytes, lse_bytes = b * h * t * d * e, b * hk * t * d * e, b * h * t * 4
    fwd_bytes = 2 * q_bytes + 2 * kv_bytes + lse_bytes
    bwd_bytes = 4 * q_bytes + 4 * kv_bytes + lse_bytes
    return fwd_flops, fwd_bytes, bwd_flops, bwd_bytes


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: f"b{s[0]}h{s[1]}kv{s[2]}t{s[3]}d{s[4]}")
def test_causal_attention_with_grouped_heads_is_counted_by_the_pairs_it_attends(shape):
    b, h, hk, t, d, dt = shape
    q = torch.randn(b, h, t, d).to(dt).requires_grad_(True)
    k = torch.randn(b, hk, t, d).to(dt).requires_grad_(True)
    v = torch.randn(b, hk, t, d).to(dt).requires_grad_(True)
    fwd_flops, fwd_bytes, bwd_flops, bwd_bytes = _attention_hand_counts(b, h, hk, t, d, ELEMENT[dt])
    out = {}
    fwd = _only(record(lambda: out.setdefault("y", F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))), FLASH)
    assert (fwd.flops, fwd.bytes) == (fwd_flops, fwd_bytes)
    assert fwd.flops != 4 * b * h * t * t * d  # not the full square
    grad = torch.randn_like(out["y"])
    bwd = _only(record(lambda: out["y"].backward(grad)), FLASH_BWD)
    assert (bwd.flops, bwd.bytes) == (bwd_flops, bwd_bytes)
    assert bwd.flops != 2.5 * 4 * b * h * t * t * d


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: f"b{s[0]}h{s[1]}kv{s[2]}t{s[3]}d{s[4]}")
def test_census_charges_causal_attention_by_the_pairs_it_attends(shape):
    """The committed census's attention in a block's forward, prefill and backward, evaluated at
    a real shape: the same hand counts (it is the executor's own SDPA call, recorded at primes)."""
    b, h, hk, t, d, dt = shape
    fwd_flops, fwd_bytes, bwd_flops, bwd_bytes = _attention_hand_counts(b, h, hk, t, d, ELEMENT[dt])
    symbols = dict(rows=b, tokens=t, kv_heads=hk, group=h // hk, half_head_dim=d / 2)
    for piece in ("block_forward", "block_prefill", "block_forward@tp"):
        assert _census_op(dt, piece, FLASH, **symbols) == pytest.approx((fwd_flops, fwd_bytes), rel=1e-12)
    assert _census_op(dt, "block_backward", FLASH_BWD, **symbols) == pytest.approx((bwd_flops, bwd_bytes), rel=1e-12)
    # the recomputing backward runs the forward once more
    assert _census_op(dt, "block_backward_recompute", FLASH, **symbols) == pytest.approx((fwd_flops, fwd_bytes),
                                                                                         rel=1e-12)


def test_a_decode_step_attends_every_cached_key():
    """One new query against kv cached keys, no mask: 4·d FLOPs per key and query head."""
    for b, h, hk, kv, d in ((2, 8, 2, 9, 16), (1, 6, 3, 31, 8)):
        q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hk, kv, d), torch.randn(b, hk, kv, d)
        op = _only(record(functools.partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)), FLASH)
        assert op.flops == 4 * b * h * kv * d
        got = _census_op(torch.float32, "block_decode", FLASH, rows=b, kv_len=kv, kv_heads=hk, group=h // hk,
                         half_head_dim=d / 2)
        assert got == pytest.approx((4 * b * h * kv * d, 4 * (2 * b * h * d + 2 * b * hk * kv * d + b * h)), rel=1e-12)


@pytest.mark.parametrize("tq,tk", [(3, 5), (5, 3), (4, 4)])
def test_causal_pairs_follow_torchs_top_left_mask(tq, tk):
    """is_causal masks with ones(Tq, Tk).tril(): the pairs are that mask's ones, for any Tq, Tk."""
    d = 8
    pairs = int(torch.ones(tq, tk).tril().sum())
    assert sum(attention_flop_terms((1, 2, tq, d), (1, 2, tk, d), (1, 2, tk, d), True, False)) == 2 * 4 * d * pairs
    assert sum(attention_flop_terms((1, 2, tq, d), (1, 1, tk, d), (1, 1, tk, d), True, True)) == 2 * 10 * d * pairs
    q, k = torch.randn(1, 2, tq, d), torch.randn(1, 2, tk, d)
    op = _only(record(lambda: F.scaled_dot_product_attention(q, k, k.clone(), is_causal=True)), FLASH)
    assert op.flops == 2 * 4 * d * pairs


def test_attention_shapes_that_do_not_group_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"q=\(1, 6, 4, 8\), k=\(1, 4, 4, 8\)"):
        attention_flop_terms((1, 6, 4, 8), (1, 4, 4, 8), (1, 4, 4, 8), True, False)


def _embedding_hand_counts(vocab, width, rows, e):
    """A lookup of ``rows`` int64 ids: the ids read, each row read from the table and written
    out. Its backward (dense): the table gradient zero-filled (every row written once), the ids
    and the output gradient read, and per id one gradient row read and written back (+=)."""
    fwd = 8 * rows + 2 * rows * width * e
    bwd = vocab * width * e + 8 * rows + rows * width * e + 2 * rows * width * e
    return fwd, bwd


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES, ids=lambda s: f"v{s[0]}d{s[1]}")
def test_embedding_reads_the_rows_it_gathers_and_its_backward_what_it_writes(shape):
    vocab, width, b, t, dt = shape
    fwd_bytes, bwd_bytes = _embedding_hand_counts(vocab, width, b * t, ELEMENT[dt])
    w = torch.randn(vocab, width).to(dt).requires_grad_(True)
    tokens = torch.randint(0, vocab, (b, t))
    out = {}
    fwd = _only(record(lambda: out.setdefault("y", F.embedding(tokens, w))), "aten.embedding")
    assert (fwd.flops, fwd.bytes) == (0, fwd_bytes)
    assert fwd.bytes < vocab * width * ELEMENT[dt]  # not the whole table
    grad = torch.randn_like(out["y"])
    bwd = _only(record(lambda: out["y"].backward(grad)), "aten.embedding_dense_backward")
    assert (bwd.flops, bwd.bytes) == (0, bwd_bytes)


@pytest.mark.parametrize("shape", EMBEDDING_SHAPES, ids=lambda s: f"v{s[0]}d{s[1]}")
def test_census_charges_the_embedding_by_the_rows_it_gathers(shape):
    vocab, width, b, t, dt = shape
    fwd_bytes, bwd_bytes = _embedding_hand_counts(vocab, width, b * t, ELEMENT[dt])
    symbols = dict(rows=b, tokens=t, hidden=width, vocab_local=vocab)
    for piece in ("embed", "embed@tp", "embed+learned"):
        assert _census_op(dt, piece, "aten.embedding", **symbols) == pytest.approx((0, fwd_bytes), rel=1e-12)
    for piece in ("embed_backward", "embed_backward@tp"):
        got = _census_op(dt, piece, "aten.embedding_dense_backward", **symbols)
        assert got == pytest.approx((0, bwd_bytes), rel=1e-12)


def test_views_and_allocations_move_nothing_but_are_dispatched():
    x = torch.randn(4, 6)
    ops = record(lambda: (x.view(6, 4), x.t(), x[1:], x.detach(), torch.empty_like(x), x.new_empty((3,))))
    assert len(ops) == 6 and all(o.bytes == 0 and o.flops == 0 and not o.work for o in ops)


def test_in_place_targets_are_read_and_written_and_overwrites_only_written():
    n = 100
    a, b = torch.randn(n), torch.randn(n)
    assert _only(record(lambda: a.add_(b)), "aten.add_").bytes == 3 * 4 * n  # a read, b read, a written
    assert _only(record(lambda: a.copy_(b)), "aten.copy_").bytes == 2 * 4 * n  # b read, a written
    assert _only(record(lambda: a.zero_()), "aten.zero_").bytes == 4 * n  # a written
    assert _only(record(lambda: torch.add(b, b, out=a)), "aten.add").bytes == 2 * 4 * n  # b read once, a written
    assert _only(record(lambda: a * a), "aten.mul").bytes == 2 * 4 * n  # one tensor read once, a fresh one written


def test_element_gathers_read_the_elements_they_return():
    logits, idx = torch.randn(3, 5, 1000), torch.randint(0, 1000, (3, 5, 1))
    op = _only(record(lambda: logits.gather(-1, idx)), "aten.gather")
    assert op.bytes == 8 * 15 + 2 * 4 * 15


def test_linear_is_counted_as_its_matrix_product_and_views():
    x, w = torch.randn(3, 5, 16), torch.randn(8, 16)
    ops = record(lambda: F.linear(x, w))
    work = [o for o in ops if o.work]
    assert len(work) == 1 and work[0].name == "aten.mm.default"
    assert work[0].flops == 2 * 15 * 8 * 16
    assert work[0].bytes == 4 * (15 * 16 + 16 * 8 + 15 * 8)
    assert len(ops) > 1 and all(o.bytes == 0 for o in ops if not o.work)


def test_backward_ops_are_recorded_with_their_flops():
    x, w = torch.randn(6, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    y = F.linear(x, w)
    ops = record(lambda: y.backward(torch.ones_like(y)))
    assert sum(o.flops for o in ops) == 2 * (2 * 6 * 8 * 16)  # grad of input and of weight


def test_encode_decode_round_trip():
    ops = record(lambda: torch.randn(4, 4) @ torch.randn(4, 4))
    flops, nbytes = decode(encode(ops))
    assert flops == [o.flops for o in ops] and nbytes == [o.bytes for o in ops]


def test_an_op_with_negative_work_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'aten.neg.default'.*\[-4\]"):
        AtenOp("aten.neg.default", (), (-4,))


def test_negative_terms_factor_with_their_sign():
    assert monomial(-2 * 11 * 13, {11: "rows", 13: "tokens"}) == (-2, (("rows", 1), ("tokens", 1)))
