"""The op census: current with the executor, exact at shapes it was not recorded at, and
ops.py's FLOP formulas against torch's counter."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calibration import census as C
from calibration.aten import AtenOp, record
from calibration.opcount import check_against, monomial, symbolic, totals
from estimator.base.errors import ConfigError
from estimator.cost.census import (
    BLOCK_VARIANTS,
    block_piece,
    block_variant,
    end_piece,
    load_census,
    model_symbols,
    piece_work,
)
from estimator.cost.ops import attention_core_flops, head_flops_per_token, projection_flops_per_token
from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import Layout
from executor import model as M

TINY = PRESETS["tiny-2l-128h"]  # multi-head attention, untied
GQA = ModelSpec("gqa", 2, 256, 384, 8, 2, 96)  # four query heads per K/V head
TIED = ModelSpec("tied", 2, 128, 256, 4, 4, 80, tied_embeddings=True, qkv_bias=True)
GPT = PRESETS["tiny-gpt-2l-128h"]  # LayerNorm, GELU, learned positions, biases, tied
OPT = dataclasses.replace(GPT, name="tiny-opt", mlp="relu", tied_embeddings=False)
NEOX = PRESETS["tiny-neox-2l-128h"]  # parallel residual, rotary on a quarter of each head
# representative pieces: tp hooks, KV cache, backward, vocab-parallel ends, sampler, loss, Adam,
# and the GPT-style blocks and ends
CHECKED = ["block_forward@tp", "block_decode", "block_backward+bias", "embed@tp", "head_lm@tp",
           "head_lm_backward@tp", "sample", "loss_ppo_actor_backward", "optimizer_3", "dp_allreduce_3",
           "block_backward@tp+layernorm+gelu+biases+learned", "block_decode+layernorm+gelu+biases+partial+parallel",
           "embed_backward@tp+learned", "head_value_backward+layernorm"]


def test_committed_census_is_current_with_the_executor():
    """Regenerate representative pieces from the executor's code; a change to the executor
    that the committed census does not reflect fails here (``python -m calibration.census``
    rewrites it; ``--check`` compares every piece)."""
    committed = load_census()
    fresh = C.build(CHECKED, ["float32"])
    doc = {"dtypes": {"float32": {n: committed.piece("float32", n) for n in CHECKED}}}
    assert C.stale(fresh, doc) == []


def test_committed_census_has_every_piece_for_every_dtype():
    committed = load_census()
    assert set(committed.dtypes) == set(C.DTYPES)
    for pieces in committed.dtypes.values():
        assert set(pieces) == set(C.PIECES)


def test_census_backward_and_sampling_are_exact_at_real_shapes():
    """The backward of a real block and the engine's token choice over a real vocabulary."""
    model, b, s = GQA, 2, 9
    params = {n: p.requires_grad_(True) for n, p in M.init_params(model, 0).items() if n.startswith("layers.0.")}
    x = torch.randn(b, s, model.hidden, requires_grad=True)
    out = M.block(params, 0, x, M.context(model, 0, s, torch.float32, torch.device("cpu")))
    grad = torch.randn_like(out)
    got = _recorded(functools.partial(torch.autograd.backward, out, grad))
    assert got == pytest.approx(_census("block_backward", model, 1, rows=b, tokens=s))
    thunk = C.choose({"rows": b, "vocab": model.vocab}, torch.float32, False, False)
    assert _recorded(thunk) == pytest.approx(_census("sample", model, 1, rows=b))


def test_stale_names_the_pieces_that_changed():
    doc = {"dtypes": {"float32": {"a": [{"op": "aten.mm"}], "b": []}}}
    changed = copy.deepcopy(doc)
    changed["dtypes"]["float32"]["a"][0]["op"] = "aten.bmm"
    changed["dtypes"]["float32"]["c"] = []
    assert C.stale(changed, doc) == ["a (float32)", "c (float32)"]
    assert C.stale(doc, doc) == []


def test_monomials_factor_over_the_symbols_only():
    primes = {11: "rows", 13: "tokens"}
    assert monomial(2 * 11 * 11 * 13, primes) == (2, (("rows", 2), ("tokens", 1)))
    assert monomial(0, primes) == (0, ())
    with pytest.raises(ValueError, match="17"):
        monomial(17 * 11, primes)


def test_a_constant_count_is_not_read_as_a_symbol():
    """Eleven identical views are a constant, whatever prime ``rows`` happens to be."""
    ops_a = [AtenOp("aten.view.default")] * 11 + [AtenOp("aten.neg.default", (), (11 * 4, 11 * 4))]
    ops_b = [AtenOp("aten.view.default")] * 11 + [AtenOp("aten.neg.default", (), (13 * 4, 13 * 4))]
    entries = symbolic(ops_a, {"rows": 11}, ops_b, {"rows": 13})
    assert totals(entries, {"rows": 13}) == (12.0, 0.0, 2 * 13 * 4.0)
    check_against(entries, ops_b, {"rows": 13}, "toy")
    with pytest.raises(ValueError, match="predicts"):
        check_against(entries, ops_b[:-2], {"rows": 13}, "toy")


def _recorded(thunk) -> tuple[float, float, float]:
    ops = record(thunk)
    return float(len(ops)), sum(o.flops for o in ops), sum(o.bytes for o in ops)


def _census(name: str, model: ModelSpec, tp: int, **sym) -> tuple[float, float, float]:
    w = piece_work(load_census().piece("float32", name), model_symbols(model, tp) | sym)
    return (float(w.count.sum()), float((w.count * w.flops).sum()), float((w.count * w.bytes).sum()))


@pytest.mark.parametrize("model", [TINY, GQA, TIED, GPT, OPT, NEOX], ids=lambda m: m.name)
def test_census_is_exact_at_real_model_shapes(model):
    """The census, recorded at prime dimensions, predicts the ops, FLOPs and bytes of the
    executor's block at a real model's shapes (a tp=2 shard: its local heads and widths)."""
    for tp in (1, 2):
        params = M.init_shards(model, Layout(DeviceMesh(0, tp), 1, tp, 1), 0, 0, torch.float32)
        b, s = 3, 10
        ctx = M.context(model, 0, s, torch.float32, torch.device("cpu"))
        x = torch.randn(b, s, model.hidden)
        got = _recorded(torch.no_grad()(functools.partial(M.block, params, 0, x, ctx)))
        want = _census(block_piece("forward", model, 1), model, tp, rows=b, tokens=s)
        assert got == pytest.approx(want, rel=1e-12)
        cache = M.KVCache(s + 1)
        with torch.no_grad():
            M.block(params, 0, x, M.context(model, 0, s, torch.float32, torch.device("cpu"), cache))
        step = M.context(model, s, 1, torch.float32, torch.device("cpu"), cache)
        x1 = x[:, :1].contiguous()
        got = _recorded(torch.no_grad()(functools.partial(M.block, params, 0, x1, step)))
        assert got == pytest.approx(_census(block_piece("decode", model, 1), model, tp, rows=b, kv_len=s + 1))


@pytest.mark.parametrize("model", [TINY, GQA, TIED, GPT, OPT, NEOX], ids=lambda m: m.name)
@pytest.mark.parametrize("tp", [1, 2])
def test_ops_flop_formulas_match_the_flop_counter(model, tp):
    """ops.py's projection and head FLOPs are what FlopCounterMode counts for the executor's
    shard of a tp group; the census charges attention as ops.py counts it, by the causal
    (query, key) pairs (4·h·s(s+1)/2), not the counter's full square."""
    params = M.init_shards(model, Layout(DeviceMesh(0, tp), 1, tp, 1), 0, 0, torch.float32)
    b, s = 2, 12
    tokens = torch.randint(0, model.vocab // tp, (b, s))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x = M.embed(params, tokens)
        x = M.blocks(params, range(model.layers), x, M.context(model, 0, s, x.dtype, x.device))
        M.final(params, x, model)
    counted = counter.get_total_flops()  # matrix products (the counter has no CPU attention formula)
    want = b * s * (model.layers * projection_flops_per_token(model) + head_flops_per_token(model)) / tp
    assert counted == pytest.approx(want, rel=1e-12)
    census = _census(block_piece("forward", model, tp), model, tp, rows=b, tokens=s)[1]
    attention = b * attention_core_flops(model, s) / tp
    assert attention == pytest.approx(2 * model.hidden / tp * b * s * (s + 1), rel=1e-12)
    assert census == pytest.approx(b * s * projection_flops_per_token(model) / tp + attention, rel=1e-12)


def test_each_recorded_variant_is_the_tag_of_its_fields():
    for tag, fields in BLOCK_VARIANTS.items():
        extra = {"max_positions": 8} if fields.get("positions") == "learned" else {}
        spec = ModelSpec("v", 1, 64, 64, 2, 2, 16, **fields, **extra)
        assert block_variant(spec) == tag
        assert block_piece("backward", spec, 2) in load_census().dtypes["float32"]
    assert end_piece("embed", 2, GPT) == "embed@tp+learned" and end_piece("head_lm", 1, GPT) == "head_lm+layernorm"
    assert end_piece("embed", 1, TINY) == "embed" and block_piece("forward", TIED, 1) == "block_forward+bias"
    lone = dataclasses.replace(TINY, name="lone", norm="layernorm")  # a combination no family has
    with pytest.raises(ConfigError, match="model 'lone': the op census records no block with norm='layernorm'"):
        block_piece("forward", lone, 1)


@pytest.mark.parametrize("model", [GPT, NEOX], ids=lambda m: m.name)
def test_gpt_style_ends_and_backward_are_exact_at_real_shapes(model):
    """The embedding with learned positions, the LayerNorm head and a GPT-style block's
    backward, recorded at prime shapes, predict the executor at a real model's shapes."""
    from executor.engine import TensorParallel

    b, s = 2, 7
    params = {n: p.requires_grad_(True) for n, p in M.init_params(model, 0).items()}
    ends = TensorParallel(model, None, 0)
    tokens = torch.randint(0, model.vocab, (b, s))
    got = _recorded(torch.no_grad()(functools.partial(ends.embed, params, tokens, 3)))
    assert got == pytest.approx(_census(end_piece("embed", 1, model), model, 1, rows=b, tokens=s))
    x = torch.randn(b, s, model.hidden, requires_grad=True)
    out = ends.final(params, x)
    grad = torch.randn_like(out)
    got = _recorded(functools.partial(torch.autograd.backward, out, grad))
    assert got == pytest.approx(_census(end_piece("head_lm_backward", 1, model), model, 1, rows=b, tokens=s))
    x = x.detach().requires_grad_(True)  # no gradient to accumulate into
    out = M.block(params, 0, x, M.context(model, 0, s, torch.float32, torch.device("cpu")))
    grad = torch.randn_like(out)
    got = _recorded(functools.partial(torch.autograd.backward, out, grad))
    assert got == pytest.approx(_census(block_piece("backward", model, 1), model, 1, rows=b, tokens=s))


@pytest.mark.parametrize("recompute,expected", [(False, 2), (True, 3)])
def test_tensor_parallel_all_reduces_of_a_block_backward(recompute, expected, monkeypatch):
    """What :func:`estimator.cost.pieces.backward_stage` charges: a block's backward all-reduces the
    gradients of its two column-parallel inputs (Megatron's f); recomputing it re-runs o_proj's
    all-reduce too, but not down_proj's, after the block's last saved tensor (torch's
    non-reentrant checkpoint stops there)."""
    created = C._init_fake_world()
    try:
        counted = []
        real = torch.distributed.all_reduce
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: counted.append(1) or real(*a, **k))
        thunk = C.block_forward(C.PRIMES_A, torch.float32, True, "", backward=True, recompute=recompute)
        counted.clear()  # the forward's own all-reduces ran while preparing
        thunk()
        assert len(counted) == expected
    finally:
        if created:
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("model", [GQA, GPT, NEOX], ids=lambda m: m.name)
def test_continuous_batching_blocks_are_the_census_pieces(model):
    """A prefill of right-padded rows into a KV pool is ``block_prefill_batched`` at rows × the
    longest row — a ``block_prefill``'s FLOPs and bytes, and only views more — and a decode
    step over the pool (rows of different KV lengths, padded to the longest and masked) is
    ``block_decode_batched`` at rows = the running batch, kv_len = the padded KV length — at a
    real model's shapes, unsharded and as a tp=2 shard."""
    for tp in (1, 2):
        params = M.init_shards(model, Layout(DeviceMesh(0, tp), 1, tp, 1), 0, 0, torch.float32)
        cpu = torch.device("cpu")
        b, longest = 3, 10
        x = torch.randn(b, longest, model.hidden)
        pool = M.KVPool(b + 2, 16)
        with torch.no_grad():  # two running requests first: the pool is allocated, as in a run
            M.block(params, 0, torch.randn(2, longest, model.hidden),
                    M.context(model, 0, longest, torch.float32, cpu, pool.prefill(0)))
        prefill = M.context(model, 0, longest, torch.float32, cpu, pool.prefill(2))
        ops = record(torch.no_grad()(functools.partial(M.block, params, 0, x, prefill)))
        got = (float(len(ops)), sum(o.flops for o in ops), sum(o.bytes for o in ops))
        assert got == pytest.approx(_census(block_piece("prefill_batched", model, 1), model, tp, rows=b,
                                            tokens=longest))
        plain = _census(block_piece("prefill", model, 1), model, tp, rows=b, tokens=longest)
        views = sum(o.name.startswith("aten.slice") for o in ops)
        assert got[1:] == pytest.approx(plain[1:]) and 0 < got[0] - plain[0] <= views
        lengths = torch.tensor([11, 7, 9])  # after the step's write; the pool's slots 0 .. 2
        with torch.no_grad():
            M.block(params, 0, x, M.context(model, 0, longest, torch.float32, cpu, pool.prefill(0)))
        step = M.context(model, 1, 1, torch.float32, cpu, pool.decode(lengths, 11), positions=lengths - 1)
        x1 = x[:, :1].contiguous()
        got = _recorded(torch.no_grad()(functools.partial(M.block, params, 0, x1, step)))
        assert got == pytest.approx(_census(block_piece("decode_batched", model, 1), model, tp, rows=b, kv_len=11))
