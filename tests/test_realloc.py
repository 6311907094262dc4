"""Parameter reallocation delivers exactly the destination shards and A→B→A is the identity;
shards kept whole are views, not copies; both sides of every pair agree on its messages; call
outputs move row for row."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from estimator.spec.cluster import DeviceMesh
from estimator.spec.models import ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import input_needs, output_holders, rows_plan, shard
from estimator.spec.workflow import Call, Workload
from executor import model as M
from executor.launch import launch
from executor.realloc import DIRECT_MIN_BYTES, contiguous_in, gather_rows, move_rows, reallocate, route
from tests.conftest import run_gloo

SEED = 11
F64 = torch.float64
MODEL = ModelSpec("t", 3, 32, 64, 4, 2, 64, qkv_bias=True)
TIED = ModelSpec("t-tied", 2, 32, 64, 4, 2, 64, tied_embeddings=True)
CRITIC = MODEL.as_value_model()
# Wide enough that most slices go as direct messages (the models above pack everything).
WIDE = ModelSpec("t-wide", 2, 256, 512, 4, 2, 512, qkv_bias=True)


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
    (WIDE, _lay("0", 1, 1, 1), _lay("0-1", 1, 2, 1)),
    (WIDE, _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)),
    (WIDE, _lay("0-1", 1, 2, 1), _lay("1", 1, 1, 1)),
    (WIDE, _lay("0-1", 1, 1, 2), _lay("0-1", 2, 1, 1)),
]
FOUR = [
    (TIED, _lay("0-3", 1, 2, 2), _lay("0-3", 4, 1, 1)),
    (MODEL, _lay("0-1", 1, 2, 1), _lay("2-3", 1, 1, 2)),
    (CRITIC, _lay("0-3", 2, 2, 1), _lay("0-3", 2, 1, 2)),
    (WIDE, _lay("0-3", 1, 2, 2), _lay("0-3", 2, 2, 1)),
]


def test_realloc_round_trips_on_two_ranks():
    assert run_gloo(2, _round_trips, TWO, 2) == [len(TWO)] * 2


def test_realloc_round_trips_on_four_ranks():
    # Two nodes of two devices, so replicas on the receiver's node are preferred.
    assert run_gloo(4, _round_trips, FOUR, 2) == [len(FOUR)] * 4


def _casts(rank: int, world: int, model: ModelSpec) -> bool:
    full = M.init_params(model, SEED, F64)
    a, b = _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)
    got = reallocate(model, a, _expected(full, model, a, rank), b, rank, 2, torch.float32)
    want = {n: t.to(torch.float32) for n, t in _expected(full, model, b, rank).items()}
    return _same(got, want)


@pytest.mark.parametrize("model", [MODEL, WIDE], ids=["packed", "direct"])
def test_realloc_casts_to_the_destination_dtype(model):
    assert run_gloo(2, _casts, model) == [True, True]


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _aliases(rank: int, world: int) -> dict[str, bool]:
    """Which returned shards share memory with the source shards, pipeline → tensor parallel."""
    full = M.init_params(WIDE, SEED, F64)
    a, b = _lay("0-1", 1, 1, 2), _lay("0-1", 1, 2, 1)
    start = _expected(full, WIDE, a, rank)
    got = reallocate(WIDE, a, start, b, rank, 2, F64)
    assert _same(got, _expected(full, WIDE, b, rank))
    return {n: n in start and _shares(t, start[n]) for n, t in got.items()}


def test_realloc_returns_views_of_shards_kept_whole():
    shared = run_gloo(2, _aliases)[0]  # device 0: stage 0 (embedding, layer 0) → tp rank 0
    kept = ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.bias",
            "layers.0.mlp.up_proj.weight", "layers.0.input_layernorm.weight",  # dim-0 halves, replicated
            "layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"]  # dim-1 halves: strided
    assert all(shared[n] for n in kept)
    assert not any(v for n, v in shared.items() if n.startswith("layers.1."))  # received


# ---- how a reallocation is split into messages (pure) -----------------------------------------


def test_contiguous_in():
    held = ((0, 8), (0, 6))
    assert contiguous_in(((2, 4), (0, 6)), held)  # whole rows
    assert contiguous_in(((3, 4), (1, 5)), held)  # part of one row
    assert not contiguous_in(((2, 4), (0, 3)), held)  # half of several rows
    assert contiguous_in(((0, 8),), ((0, 8),))


ROUTED = [
    (WIDE, _lay("0", 1, 1, 1), _lay("0-1", 1, 2, 1)),
    (WIDE, _lay("0-1", 1, 2, 1), _lay("0-1", 1, 1, 2)),
    (TIED, _lay("0-3", 1, 2, 2), _lay("0-3", 4, 1, 1)),
    (WIDE, _lay("0-1", 1, 2, 1), _lay("2-3", 1, 1, 2)),
]


@pytest.mark.parametrize("model,a,b", ROUTED)
def test_every_pair_agrees_on_its_messages(model, a, b):
    devices = sorted(set(a.mesh.devices) | set(b.mesh.devices))
    routes = {d: route(model, a, b, 2, d, 8) for d in devices}
    for s in devices:
        for d in devices:
            sent = [seg for seg, to in routes[s].sends if to == d]
            assert sent == [seg for seg, frm in routes[d].recvs if frm == s]
            assert all(seg.direct for seg in sent[:-1])  # at most one packed message, last


def test_direct_messages_are_big_contiguous_slices():
    r = route(WIDE, _lay("0", 1, 1, 1), _lay("0-1", 1, 2, 1), 2, 0, 8)
    direct = [seg.transfers[0] for seg, _ in r.sends if seg.direct]
    packed = [t for seg, _ in r.sends if not seg.direct for t in seg.transfers]
    assert all(t.numel * 8 >= DIRECT_MIN_BYTES and contiguous_in(t.box, r.src_boxes[t.name]) for t in direct)
    assert {"layers.0.self_attn.q_proj.weight", "embed_tokens.weight"} <= {t.name for t in direct}
    assert {"layers.0.self_attn.o_proj.weight", "layers.0.input_layernorm.weight"} <= {t.name for t in packed}


def test_routes_are_cached():
    a, b = _lay("0-1", 1, 2, 1), _lay("0-1", 1, 1, 2)
    assert route(WIDE, a, b, 2, 1, 4) is route(WIDE, a, b, 2, 1, 4)


# ---- workers' malloc --------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_bytes_of_big_tensor(rank: int, world: int, status) -> int:
    """Bytes malloc maps privately (and unmaps when freed) for a 64 MiB tensor."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    before = libc.mallinfo2().hblkhd
    big = torch.empty(16 * 2**20)
    mapped = libc.mallinfo2().hblkhd - before
    del big
    return mapped


def _has_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33")
def test_workers_serve_big_tensors_from_the_reused_heap():
    assert launch(1, _mapped_bytes_of_big_tensor, timeout_s=60) == [0]
    assert launch(1, _mapped_bytes_of_big_tensor, timeout_s=60, retain_memory=False)[0] >= 64 * 2**20


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
