"""The engine under tp, pp and dp computes what the unsharded model computes: forward outputs,
summed gradients (each shard equals its slice of the full gradient) and greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import shard
from executor import model as M
from executor.comm import build_groups, dp_ranks, embed_ranks, layout_groups, stage_neighbour, tp_ranks
from executor.engine import Engine
from tests.conftest import run_gloo

SEED = 7
BATCH, SEQ, PROMPT, GEN = 2, 6, 3, 4
TOL = 1e-10

LM = ModelSpec("t-lm", 2, 32, 64, 4, 2, 64)
LM_TIED = ModelSpec("t-tied", 3, 32, 64, 4, 2, 64, tied_embeddings=True, qkv_bias=True)
VALUE = ModelSpec("t-value", 2, 32, 64, 4, 2, 64, qkv_bias=True, head="value")
DEEP = ModelSpec("t-deep", 4, 32, 64, 4, 2, 64, tied_embeddings=True)


def _layout(size: int, dp: int, tp: int, pp: int, micro_batches: int) -> Layout:
    return Layout(DeviceMesh(0, size), dp, tp, pp, micro_batches)


def _tokens(n: int, seq: int, vocab: int, salt: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + salt)
    return [torch.randint(0, vocab, (BATCH, seq), generator=gen) for _ in range(n)]


def _loss(model: ModelSpec, tokens: torch.Tensor, out: torch.Tensor, count: int) -> torch.Tensor:
    """Next-token cross-entropy (LM) or squared error to a fixed target (values), / count."""
    if model.head == "value":
        target = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        return ((out - target) ** 2).sum() / count
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1),
                           reduction="sum") / count


def _greedy_on_tp_root(layout: Layout, rank: int):
    """Greedy on the first tensor-parallel rank, nonsense elsewhere: the engine must adopt the
    first rank's choice on all of them."""
    root = layout.coords(rank)[1] == 0

    def choose(mb: int, step: int, logits: torch.Tensor) -> torch.Tensor:
        assert logits.shape == (BATCH, logits.shape[-1]) and logits.dtype == torch.float64
        return logits.argmax(-1) if root else torch.zeros(BATCH, dtype=torch.long)

    return choose


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def _engine_case(rank: int, world: int, model: ModelSpec, layout: Layout, generate: bool) -> dict:
    full = M.init_params(model, SEED, torch.float64)
    groups = build_groups([layout], world)
    dp_rank, _, _ = layout.coords(rank)
    mbs = layout.micro_batches
    everything = _tokens(layout.dp * mbs, SEQ, model.vocab, 0)
    mine = everything[dp_rank * mbs:(dp_rank + 1) * mbs]
    count = len(everything) * BATCH * (SEQ - 1 if model.head == "lm" else SEQ)
    local = M.init_shards(model, layout, rank, SEED, torch.float64)
    engine = Engine(model, layout, rank, local, groups)
    last = layout.coords(rank)[2] == layout.pp - 1
    errs: dict[str, float] = {}

    outs = engine.forward(mine)
    assert (outs is not None) == last
    if last:
        errs["forward"] = max(_max_err(o, M.forward(full, model, t)) for o, t in zip(outs, mine))

    loss = engine.forward_backward(mine, lambda i, out: _loss(model, mine[i], out, count))
    for p in full.values():
        p.requires_grad_(True)
    ref = sum(_loss(model, t, M.forward(full, model, t), count) for t in everything)
    ref.backward()
    boxes = shard(model, layout, rank)
    errs["grad"] = max(_max_err(local[n].grad, full[n].grad[M.box_index(b)]) for n, b in boxes.items())
    engine.forward_backward(mine, lambda i, out: _loss(model, mine[i], out, count))
    errs["grad-accumulates"] = max(_max_err(local[n].grad, 2 * full[n].grad[M.box_index(b)])
                                   for n, b in boxes.items())
    if last:
        with torch.no_grad():
            mine_ref = sum(float(_loss(model, t, M.forward(full, model, t), count)) for t in mine)
        errs["loss"] = abs(loss - mine_ref)

    if generate:
        prompts = _tokens(mbs, PROMPT, model.vocab, 1 + dp_rank)
        got = engine.generate(prompts, GEN, _greedy_on_tp_root(layout, rank))
        assert (got is not None) == last
        if last:
            refs = [M.greedy_generate(full, model, p, GEN) for p in prompts]
            assert all(torch.equal(s, rs) for (s, _), (rs, _) in zip(got, refs)), "sequences differ"
            errs["logp"] = max(_max_err(lp, rlp) for (_, lp), (_, rlp) in zip(got, refs))
    return errs


def _check(results: list[dict]) -> None:
    assert any("forward" in r for r in results)
    for rank, errs in enumerate(results):
        for what, err in errs.items():
            assert err < TOL, f"rank {rank}: {what} differs by {err}"


@pytest.mark.parametrize(
    ("model", "dp", "tp", "pp", "micro_batches", "generate"),
    [
        pytest.param(LM, 1, 2, 1, 2, True, id="lm-tp2"),
        pytest.param(LM_TIED, 1, 1, 2, 4, True, id="tied-pp2"),
        pytest.param(LM_TIED, 1, 2, 1, 1, True, id="tied-tp2"),
        pytest.param(LM, 2, 1, 1, 2, True, id="lm-dp2"),
        pytest.param(VALUE, 2, 1, 1, 2, False, id="value-dp2"),
        pytest.param(VALUE, 1, 2, 1, 2, False, id="value-tp2"),
        pytest.param(VALUE, 1, 1, 2, 3, False, id="value-pp2"),
    ],
)
def test_two_ranks_match_unsharded(model, dp, tp, pp, micro_batches, generate):
    _check(run_gloo(2, _engine_case, model, _layout(2, dp, tp, pp, micro_batches), generate))


@pytest.mark.parametrize(
    ("model", "dp", "tp", "pp", "micro_batches", "generate"),
    [
        pytest.param(LM_TIED, 1, 2, 2, 3, True, id="tied-tp2-pp2"),
        pytest.param(VALUE, 2, 1, 2, 2, False, id="value-dp2-pp2"),
        pytest.param(DEEP, 1, 1, 4, 5, True, id="tied-pp4"),
    ],
)
def test_four_ranks_match_unsharded(model, dp, tp, pp, micro_batches, generate):
    _check(run_gloo(4, _engine_case, model, _layout(4, dp, tp, pp, micro_batches), generate))


def test_engine_rejects_wrong_shards():
    layout = _layout(2, 1, 2, 1, 1)
    params = M.init_params(LM, SEED, torch.float64)  # full tensors, not tp shards
    with pytest.raises(ValueError, match="q_proj"):
        Engine(LM, layout, 0, params, groups=None)  # type: ignore[arg-type]


def test_group_ranks_follow_the_layout_rank_order():
    layout = Layout(DeviceMesh(8, 8), 2, 2, 2)  # device = 8 + (pp·dp + dp_rank)·tp + tp_rank
    assert tp_ranks(layout, 13) == (12, 13)
    assert dp_ranks(layout, 13) == (13, 15)
    assert embed_ranks(layout, 13) == (9, 13)
    assert stage_neighbour(layout, 13, -1) == 9 and stage_neighbour(layout, 13, +1) is None
    groups = layout_groups(layout)
    assert len(groups) == len(set(groups)) == 4 + 4 + 4
    assert layout_groups(Layout(DeviceMesh(0, 2), 2, 1, 1)) == [(0,), (1,), (0, 1), (0,), (1,)]


def _full_shard_case(rank: int, world: int, recompute: str) -> dict:
    """A dp-2 training pass of two micro-batches under shard="full": the gathers it issues
    (and which of them were prefetched, asynchronously) and the gradient of every parameter,
    reassembled whole from the chunks, against the same pass replicated."""
    from executor import zero

    out = {}
    for shard_mode in ("none", "full"):
        lay = Layout(DeviceMesh(0, 2), 2, 1, 1, 2, recompute, shard=shard_mode)
        groups = build_groups([lay], world)
        whole = M.init_boxes(LM, shard(LM, lay, rank), SEED, torch.float64)
        params = zero.shard_chunks(LM, lay, rank, whole) if lay.sharded else whole
        calls: list[bool] = []
        gather = zero.all_gather_flat

        def counting(chunk, dp, group, async_op=False, gather=gather, calls=calls):  # noqa: ANN001, ANN202
            calls.append(async_op)
            return gather(chunk, dp, group, async_op)

        zero.all_gather_flat = counting
        try:
            eng = Engine(LM, lay, rank, params, groups)
            tokens = _tokens(2, SEQ, LM.vocab, salt=rank)
            eng.forward_backward(tokens, lambda mb, logits, tokens=tokens: _loss(LM, tokens[mb], logits, 4))
        finally:
            zero.all_gather_flat = gather
        if lay.sharded:
            grads = {g: c.grad for g, c in params.items()}
            full = zero.FullShard(LM, lay, rank, grads, groups.dp(lay, rank)).whole()
        else:
            full = {n: p.grad for n, p in params.items()}
        out[shard_mode] = (len(calls), sum(calls), {n: t.numpy().copy() for n, t in full.items()})
    return out


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_full_sharding_gathers_every_group_in_forward_and_again_in_backward(recompute):
    """Three groups (the ends and two blocks) per pass: each micro-batch gathers them in
    forward and again in backward (by re-gathering what autograd saved, or by re-running a
    recomputed block), the next group prefetched asynchronously each time; the gradients,
    reduce-scattered per micro-batch, are those of the replicated pass summed over replicas."""
    for rank_out in run_gloo(2, _full_shard_case, recompute):
        gathers, prefetched, grads = rank_out["full"]
        assert (gathers, prefetched) == (2 * (3 + 3), 2 * (2 + 2))
        assert rank_out["none"][:2] == (0, 0)
        for name, g in rank_out["none"][2].items():
            assert abs(grads[name] - g).max() < TOL, name
