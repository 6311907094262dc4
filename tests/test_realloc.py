"""Parameter reallocation delivers exactly the destination shards and A→B→A is the identity;
call outputs move row for row."""

from __future__ import annotations

import pytest
import torch

from estimator.cluster import DeviceMesh
from estimator.models import ModelSpec
from estimator.plan import Layout
from estimator.sharding import input_needs, output_holders, rows_plan, shard
from estimator.workflow import Call, Workload
from executor import model as M
from executor.realloc import gather_rows, move_rows, reallocate
from tests.conftest import run_gloo

SEED = 11
F64 = torch.float64
MODEL = ModelSpec("t", 3, 32, 64, 4, 2, 64, qkv_bias=True)
TIED = ModelSpec("t-tied", 2, 32, 64, 4, 2, 64, tied_embeddings=True)
CRITIC = MODEL.as_value_model()


def _lay(mesh: str, dp: int, tp: int, pp: int) -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp)


def _expected(full: dict, model: ModelSpec, layout: Layout, device: int) -> dict | None:
    if device not in layout.mesh.devices:
        return None
    return {n: full[n][M.box_index(b)] for n, b in shard(model, layout, device).items()}


def _same(got: dict | None, want: dict | None) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return set(got) == set(want) and all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n])
                                         for n in want)


def _round_trips(rank: int, world: int, cases: list, dpn: int) -> int:
    checked = 0
    for model, a, b in cases:
        full = M.init_params(model, SEED, F64)
        start = _expected(full, model, a, rank)
        there = reallocate(model, a, start, b, rank, dpn, F64)
        assert _same(there, _expected(full, model, b, rank)), f"{a} -> {b} on device {rank}"
        back = reallocate(model, b, there, a, rank, dpn, F64)
        assert _same(back, start), f"{a} -> {b} -> {a} on device {rank}"
        checked += 1
    return checked


TWO = [
    (MODEL, _lay("0-1", 2, 1, 1), _lay("0-1", 1, 2, 1)),
    (MODEL, _lay("0-1", 1, 2, 1), _lay("0-1", 1, 1, 2)),
    (TIED, _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)),
    (TIED, _lay("0", 1, 1, 1), _lay("0-1", 1, 1, 2)),
    (CRITIC, _lay("0-1", 1, 2, 1), _lay("1", 1, 1, 1)),
    (MODEL, _lay("0", 1, 1, 1), _lay("1", 1, 1, 1)),
]
FOUR = [
    (TIED, _lay("0-3", 1, 2, 2), _lay("0-3", 4, 1, 1)),
    (MODEL, _lay("0-1", 1, 2, 1), _lay("2-3", 1, 1, 2)),
    (CRITIC, _lay("0-3", 2, 2, 1), _lay("0-3", 2, 1, 2)),
]


def test_realloc_round_trips_on_two_ranks():
    assert run_gloo(2, _round_trips, TWO, 2) == [len(TWO)] * 2


def test_realloc_round_trips_on_four_ranks():
    # Two nodes of two devices, so replicas on the receiver's node are preferred.
    assert run_gloo(4, _round_trips, FOUR, 2) == [len(FOUR)] * 4


def _casts(rank: int, world: int) -> bool:
    full = M.init_params(MODEL, SEED, F64)
    a, b = _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)
    got = reallocate(MODEL, a, _expected(full, MODEL, a, rank), b, rank, 2, torch.float32)
    want = {n: t.to(torch.float32) for n, t in _expected(full, MODEL, b, rank).items()}
    return _same(got, want)


def test_realloc_casts_to_the_destination_dtype():
    assert run_gloo(2, _casts) == [True, True]


# ---- rows -------------------------------------------------------------------------------------


CALL = Call("c", "actor", "inference", ("seq",), ("values",), Workload(8, 3, 3))
ROW_SHAPE = (2, 3)


def _rows(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo * 6, hi * 6, dtype=F64).view(hi - lo, *ROW_SHAPE)


def _move(rank: int, world: int, pairs: list) -> int:
    moved = 0
    for a, b in pairs:
        plan = rows_plan(output_holders(CALL, a), input_needs(CALL, b), 2)
        held = [(r, _rows(*r)) for r in output_holders(CALL, a).get(rank, [])]
        got = move_rows(plan, rank, held, ROW_SHAPE, F64)
        assert [r for r, _ in got] == [t.rows for t in plan if t.dst == rank]
        assert all(torch.equal(t, _rows(*r)) for r, t in got)
        if rank in b.mesh.devices:
            assert torch.equal(gather_rows(got, input_needs(CALL, b)[rank]),
                               torch.cat([_rows(*r) for r in input_needs(CALL, b)[rank]]))
        moved += len(got)
    return moved


def test_move_rows_delivers_exactly_the_rows():
    pairs = [
        (_lay("0-1", 2, 1, 1), _lay("0-1", 1, 1, 2)),
        (_lay("0-1", 1, 2, 1), _lay("0-1", 2, 1, 1)),
        (_lay("1", 1, 1, 1), _lay("0-1", 2, 1, 1)),
        (_lay("0-1", 2, 1, 1), _lay("0", 1, 1, 1)),
    ]
    counts = run_gloo(2, _move, pairs)
    assert sum(counts) > len(pairs)


def test_gather_rows_spans_pieces():
    data = [((4, 8), _rows(4, 8)), ((0, 4), _rows(0, 4))]
    assert torch.equal(gather_rows(data, [(2, 6)]), _rows(2, 6))
    assert torch.equal(gather_rows(data, [(6, 8), (0, 1)]), torch.cat([_rows(6, 8), _rows(0, 1)]))
    with pytest.raises(ValueError, match="not held"):
        gather_rows(data, [(7, 9)])
