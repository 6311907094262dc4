"""The pure shard math: parameter slices tile, reallocation plans cover every destination
shard exactly once from devices that hold it, and batch rows tile across layouts."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import Layout
from estimator.spec.sharding import (
    box_numel,
    dp_rows,
    group_by_pair,
    input_needs,
    intersect,
    micro_batch_rows,
    output_holders,
    param_inventory,
    realloc_plan,
    rows_plan,
    shard,
)
from estimator.spec.workflow import Call, Workload

WORLD = 8  # devices the random layouts draw from


@st.composite
def models(draw) -> ModelSpec:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4]))
    head = draw(st.sampled_from(["lm", "value"]))
    learned = draw(st.booleans())
    return ModelSpec(
        "m", draw(st.integers(1, 4)), heads * head_dim, 4 * draw(st.integers(1, 4)), heads, kv,
        4 * draw(st.integers(1, 4)), head=head, tied_embeddings=head == "lm" and draw(st.booleans()),
        qkv_bias=draw(st.booleans()), norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        mlp=draw(st.sampled_from(["swiglu", "gelu", "relu"])), bias=draw(st.booleans()),
        positions="learned" if learned else "rotary", max_positions=draw(st.integers(1, 8)) if learned else 0)


@st.composite
def layouts(draw, model: ModelSpec, micro_batches: int = 1) -> Layout:
    size = draw(st.sampled_from([1, 2, 4, 8]))
    first = size * draw(st.integers(0, WORLD // size - 1))
    tp_choices = [t for t in (1, 2, 4, 8) if size % t == 0
                  and all(v % t == 0 for v in (model.heads, model.kv_heads, model.ffn, model.vocab))]
    tp = draw(st.sampled_from(tp_choices))
    pp = draw(st.sampled_from([p for p in (1, 2, 4, 8) if (size // tp) % p == 0 and p <= model.layers]))
    return Layout(DeviceMesh(first, size), size // (tp * pp), tp, pp, micro_batches)


@st.composite
def realloc_cases(draw):
    model = draw(models())
    return model, draw(layouts(model)), draw(layouts(model)), draw(st.sampled_from([2, 4, 8]))


def _contains(outer: tuple, inner: tuple) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner))


def test_tp_shards_tile_each_parameter():
    model = ModelSpec("m", 2, 16, 32, 4, 2, 32, qkv_bias=True)
    for tp in (1, 2, 4):
        layout = Layout(DeviceMesh(0, tp), 1, tp, 1)
        for p in param_inventory(model):
            boxes = [shard(model, layout, d)[p.name] for d in layout.mesh.devices]
            distinct = set(boxes)
            assert sum(box_numel(b) for b in distinct) == p.numel
            assert all(intersect(a, b) is None for a in distinct for b in distinct if a != b)


@settings(max_examples=150, deadline=None)
@given(realloc_cases())
def test_realloc_plan_tiles_every_destination_shard_once(case):
    model, src, dst, dpn = case
    plan = realloc_plan(model, src, dst, dpn)
    received: dict[tuple[int, str], list] = {}
    for t in plan:
        assert t.src in src.mesh.devices and t.dst in dst.mesh.devices
        assert _contains(shard(model, src, t.src)[t.name], t.box), f"{t} not held by its sender"
        received.setdefault((t.dst, t.name), []).append(t.box)
    wanted = {(d, n): b for d in dst.mesh.devices for n, b in shard(model, dst, d).items()}
    assert set(received) == set(wanted)
    for key, boxes in received.items():
        need = wanted[key]
        assert all(_contains(need, b) for b in boxes)
        assert sum(box_numel(b) for b in boxes) == box_numel(need)
        assert all(intersect(a, b) is None for i, a in enumerate(boxes) for b in boxes[i + 1:])


@settings(max_examples=150, deadline=None)
@given(realloc_cases())
def test_realloc_plan_keeps_what_the_receiver_holds(case):
    model, src, dst, dpn = case
    for t in realloc_plan(model, src, dst, dpn):
        if t.dst in src.mesh.devices:
            held = shard(model, src, t.dst).get(t.name)
            if held is not None and _contains(held, t.box):
                assert t.src == t.dst, f"{t}: the receiver already holds this slice"


@settings(max_examples=50, deadline=None)
@given(realloc_cases())
def test_same_layout_moves_nothing(case):
    model, src, _, dpn = case
    assert all(t.src == t.dst for t in realloc_plan(model, src, src, dpn))


@settings(max_examples=50, deadline=None)
@given(realloc_cases())
def test_group_by_pair_keeps_plan_order(case):
    model, src, dst, dpn = case
    plan = realloc_plan(model, src, dst, dpn)
    groups = group_by_pair(plan)
    assert sum(len(ts) for ts in groups.values()) == len(plan)
    for (s, d), ts in groups.items():
        assert ts == [t for t in plan if (t.src, t.dst) == (s, d)]


# ---- batch rows -------------------------------------------------------------------------------


@st.composite
def row_cases(draw):
    """A call and two layouts whose dp·micro_batches divide its batch (validation's rule)."""
    kind = draw(st.sampled_from(["generate", "inference", "train"]))
    paired = draw(st.booleans())
    minibatches = draw(st.sampled_from([1, 2])) if kind == "train" else 1
    model = ModelSpec("m", 2, 8, 8, 2, 2, 8)
    a, b = draw(layouts(model, draw(st.sampled_from([1, 2])))), draw(layouts(model, draw(st.sampled_from([1, 2]))))
    split = math.lcm(a.dp * a.micro_batches, b.dp * b.micro_batches)
    units = minibatches * split * draw(st.integers(1, 3))
    seqs = units * (2 if paired else 1)
    call = Call("c", "actor", kind, (), (), Workload(seqs, 4, 4, minibatches, paired))
    return call, a, b, draw(st.sampled_from([2, 4, 8]))


def _rows(ranges) -> Counter:
    return Counter(r for lo, hi in ranges for r in range(lo, hi))


@settings(max_examples=150, deadline=None)
@given(row_cases())
def test_dp_and_micro_batch_rows_tile_the_batch(case):
    call, layout, _, _ = case
    seqs = call.workload.seqs
    assert _rows(r for i in range(layout.dp) for r in dp_rows(call, layout, i)) == _rows([(0, seqs)])
    per_unit = 2 if call.workload.paired else 1
    for i in range(layout.dp):
        steps = micro_batch_rows(call, layout, i)
        assert [(mb[0][0], mb[-1][1]) for mb in steps] == dp_rows(call, layout, i)
        for mb in steps:
            assert all(a[1] == b[0] for a, b in zip(mb, mb[1:]))
            assert all(lo % per_unit == 0 and (hi - lo) % per_unit == 0 for lo, hi in mb)
    if call.kind == "train":  # every optimizer step sees the same rows under any layout
        step = seqs // call.workload.minibatches
        for k in range(call.workload.minibatches):
            got = _rows(dp_rows(call, layout, i)[k] for i in range(layout.dp))
            assert got == _rows([(k * step, (k + 1) * step)])


@settings(max_examples=150, deadline=None)
@given(row_cases())
def test_rows_plan_delivers_every_needed_row_once_from_a_holder(case):
    call, a, b, dpn = case
    holders, needs = output_holders(call, a), input_needs(call, b)
    plan = rows_plan(holders, needs, dpn)
    for dst, ranges in needs.items():
        got = [t for t in plan if t.dst == dst]
        assert _rows(t.rows for t in got) == _rows(ranges)
        for t in got:
            rows = set(range(*t.rows))
            assert rows <= set(_rows(holders[t.src])), f"{t}: rows not held by the sender"
            if rows <= set(_rows(holders.get(dst, []))):
                assert t.src == dst, f"{t}: the receiver already holds these rows"
    assert {t.dst for t in plan} <= set(needs)


@pytest.mark.parametrize("seqs,dp,mb", [(5, 2, 1), (2048, 6, 1), (2048, 6, 4), (7, 7, 1), (9, 2, 2)])
def test_generate_rows_are_dealt_unevenly_but_exactly_once(seqs, dp, mb):
    from estimator.spec.sharding import micro_batch_rows, most_rows
    from estimator.spec.workflow import Call, Workload

    call = Call("actor_gen", "actor", "generate", ("prompts",), ("seq",), Workload(seqs, 16, 16))
    layout = Layout(DeviceMesh(0, dp), dp, 1, 1, mb)
    rows = [r for k in range(dp) for r in micro_batch_rows(call, layout, k)[0]]
    assert rows[0][0] == 0 and rows[-1][1] == seqs
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # contiguous, each row once
    sizes = [sum(hi - lo for lo, hi in dp_rows(call, layout, k)) for k in range(dp)]
    assert max(sizes) - min(sizes) <= 1 and most_rows(call, layout) == max(sizes)


def test_a_generate_layout_needs_a_request_per_engine():
    from estimator.spec.plan import layout_problems
    from estimator.spec.workflow import Call, Workload

    call = Call("actor_gen", "actor", "generate", ("prompts",), ("seq",), Workload(6, 16, 16))
    model = PRESETS["tiny-2l-128h"]
    cluster = Cluster(1, 8, "cpu")
    assert not layout_problems(call, model, cluster, Layout(DeviceMesh(0, 4), 4, 1, 1, 1))  # 2+2+1+1
    problems = layout_problems(call, model, cluster, Layout(DeviceMesh(0, 4), 4, 1, 1, 2))
    assert any("6 sequences cannot give each of dp·micro_batches = 4·2 = 8 engines a request" in p for p in problems)
