"""Meshes, layouts and plans: enumeration, validation rules, rank order, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estimator.base.errors import ConfigError
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.models import PRESETS, ModelSpec
from estimator.spec.plan import RECOMPUTE_CHOICES, Layout, Plan, enumerate_layouts, layout_problems, validate
from estimator.spec.workflow import Call, Workload
from tests.conftest import tiny_experiment

clusters = st.builds(Cluster, nodes=st.integers(1, 4), devices_per_node=st.sampled_from([1, 2, 4, 6, 8]),
                     device=st.just("h100-sxm"))
models = st.sampled_from([PRESETS[n] for n in ("tiny-2l-128h", "tiny-4l-256h", "llama2-7b", "qwen2.5-0.5b",
                                                  "llama3-8b")])


def _call(seqs=64, minibatches=2, kind="train", paired=False):
    return Call("c", "actor", kind, (), (), Workload(seqs, 8, 8, minibatches if kind == "train" else 1, paired))


def _rules(problems):
    keys = {"must equal mesh": "size", "must divide heads": "heads", "must divide kv_heads": "kv_heads",
            "spans nodes": "span", "exceeds layers": "layers", "not divisible by dp": "batch",
            "exceeds the cluster": "mesh", "must divide ffn": "ffn", "must divide vocab": "vocab"}
    return {rule for p in problems for k, rule in keys.items() if k in p}


def _real_rule(cluster: Cluster, mesh: DeviceMesh) -> bool:
    """ReaL's meshes, written out: an aligned power-of-two slice of one node or whole nodes."""
    dpn = cluster.devices_per_node
    if mesh.last >= cluster.num_devices:
        return False
    if mesh.size < dpn:
        return mesh.size & (mesh.size - 1) == 0 and dpn % mesh.size == 0 and mesh.first % mesh.size == 0
    return mesh.first % dpn == 0 and mesh.size % dpn == 0


def _straddles(cluster: Cluster, first: int, size: int, tp: int) -> bool:
    """Whether a run of tp neighbouring devices from the mesh's first (cut at its end) spans
    two nodes, or tp is more than a node."""
    dpn = cluster.devices_per_node
    groups = [range(first + j * tp, min(first + (j + 1) * tp, first + size)) for j in range(-(-size // tp))]
    return tp > dpn or any(g[0] // dpn != g[-1] // dpn for g in groups)


@given(clusters)
def test_enumerated_meshes_are_exactly_the_valid_ones(cluster):
    runs = {DeviceMesh(f, s) for f in range(cluster.num_devices) for s in range(1, cluster.num_devices - f + 1)}
    assert {m for m in runs if not cluster.mesh_problems(m)} == runs  # every contiguous run is a mesh
    assert cluster.mesh_problems(DeviceMesh(cluster.num_devices - 1, 2))  # … of the cluster's devices
    for uneven, expect in ((True, runs), (False, {m for m in runs if _real_rule(cluster, m)})):
        meshes = cluster.meshes(uneven)
        assert len(set(meshes)) == len(meshes) and set(meshes) == expect
        assert meshes == sorted(meshes, key=lambda m: (m.size, m.first))
        assert cluster.num_meshes(uneven) == len(meshes)
        sizes = sorted({m.size for m in meshes})
        assert cluster.mesh_sizes(uneven) == {s: sum(m.size == s for m in meshes) for s in sizes}
    assert all(cluster.aligned(m) == _real_rule(cluster, m) for m in runs)


@given(clusters, st.integers(1, 9))
def test_tp_counts_per_mesh_size_match_the_listed_meshes(cluster, tp):
    for uneven in (False, True):
        listed = cluster.meshes(uneven)
        counts = cluster.tp_mesh_counts(tp, uneven)
        assert counts == {s: sum(m.size == s and not _straddles(cluster, m.first, s, tp) for m in listed)
                          for s in cluster.mesh_sizes(uneven)}
        for m in listed:
            assert (cluster.tp_problem(m, tp) is None) == (not _straddles(cluster, m.first, m.size, tp))


def test_a_straddling_tensor_parallel_group_is_named_with_its_mesh_and_devices():
    cluster = Cluster(2, 8, "h100-sxm")
    assert cluster.tp_problem(DeviceMesh(0, 6), 3) is None  # 6 of a node: tp 3 or 6 fit
    assert cluster.tp_problem(DeviceMesh(2, 12), 6) is None  # 6 + 6 devices on two nodes
    assert cluster.tp_problem(DeviceMesh(0, 12), 4) is None  # 8 + 4
    msg = cluster.tp_problem(DeviceMesh(6, 8), 4)  # 2 + 6 devices: the group 6-9 crosses
    assert msg == ("tp=4 spans nodes on mesh 6-13: its tensor-parallel group 6-9 straddles nodes 0 and 1 (nodes "
                   "of 8 devices); tp must divide the mesh's devices on each node (2, 6)")
    msg = cluster.tp_problem(DeviceMesh(0, 16), 3)  # whole nodes, tp not dividing a node
    assert "tp=3 spans nodes on mesh 0-15: its tensor-parallel group 6-8 straddles nodes 0 and 1" in msg
    assert "tp at most 8" in cluster.tp_problem(DeviceMesh(0, 16), 16)
    assert cluster.node_parts(DeviceMesh(6, 8)) == (2, 6) and cluster.node_parts(DeviceMesh(3, 3)) == (3,)


@settings(max_examples=60, deadline=None)
@given(clusters, models, st.sampled_from([8, 16, 48, 64]), st.sampled_from([1, 2, 4]), st.booleans())
def test_every_enumerated_layout_validates(cluster, model, seqs, minibatches, uneven):
    call = _call(seqs * minibatches, minibatches)
    layouts = enumerate_layouts(call, model, cluster, uneven)
    assert layouts, "a single device with dp=tp=pp=1 is always valid"
    dpn = cluster.devices_per_node
    for lay in layouts:
        assert layout_problems(call, model, cluster, lay) == []
        assert lay.size == lay.mesh.size
        assert uneven or cluster.aligned(lay.mesh)
        for d in lay.mesh.devices:  # every tensor-parallel group inside one node
            dp_rank, _, pp_rank = lay.coords(d)
            assert len({lay.device(dp_rank, t, pp_rank) // dpn for t in range(lay.tp)}) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))
def test_device_coordinates_round_trip_on_any_run(first, dp, tp, pp):
    lay = Layout(DeviceMesh(first, dp * tp * pp), dp, tp, pp)
    coords = [(d, t, p) for p in range(pp) for d in range(dp) for t in range(tp)]
    assert [lay.device(*c) for c in coords] == list(lay.mesh.devices)  # tp innermost, then dp, then pp
    assert [lay.coords(lay.device(*c)) for c in coords] == coords
    assert [lay.stage_devices(p) for p in range(pp)] == [range(first + p * dp * tp, first + (p + 1) * dp * tp)
                                                         for p in range(pp)]


@settings(max_examples=200, deadline=None)
@given(clusters, models, st.integers(0, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9),
       st.integers(1, 90), st.sampled_from([1, 2, 3, 4]))
def test_random_layouts_are_judged_by_the_right_rules(cluster, model, first, size, tp, pp, dp, mb):
    call = _call(48, 2)
    lay = Layout(DeviceMesh(first, size), dp, tp, pp, mb)
    got = _rules(layout_problems(call, model, cluster, lay))
    expected = set()
    if first + size > cluster.num_devices:
        expected.add("mesh")
    if dp * tp * pp != size:
        expected.add("size")
    for dim in ("heads", "kv_heads", "ffn", "vocab"):
        if getattr(model, dim) % tp:
            expected.add(dim)
    if _straddles(cluster, first, size, tp):
        expected.add("span")
    if pp > model.layers:
        expected.add("layers")
    if 24 % (dp * mb):
        expected.add("batch")
    assert got == expected


def test_rank_order_tp_innermost_then_dp_then_pp():
    lay = Layout(DeviceMesh(8, 8), dp=2, tp=2, pp=2)
    assert [lay.device(d, t, p) for p in range(2) for d in range(2) for t in range(2)] == list(range(8, 16))
    for dev in lay.mesh.devices:
        assert lay.device(*lay.coords(dev)) == dev
    with pytest.raises(ValueError):
        lay.coords(3)


@given(st.integers(1, 100), st.integers(1, 16))
def test_stage_layers_partition_all_layers(layers, pp):
    lay = Layout(DeviceMesh(0, pp), 1, 1, pp)
    if pp > layers:
        return
    stages = [lay.stage_layers(layers, s) for s in range(pp)]
    assert [i for r in stages for i in r] == list(range(layers))
    assert max(len(r) for r in stages) - min(len(r) for r in stages) <= 1


layouts = st.builds(Layout, st.builds(DeviceMesh, st.integers(0, 64), st.integers(1, 64)), st.integers(1, 8),
                    st.integers(1, 8), st.integers(1, 8), st.integers(1, 32), st.sampled_from(RECOMPUTE_CHOICES))


@given(st.dictionaries(st.text("abcdefgh_", min_size=1, max_size=12), layouts, max_size=6))
def test_plans_round_trip_through_json(layouts_by_call):
    plan = Plan(layouts_by_call)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_validate_reports_unknown_missing_and_each_rule():
    exp = tiny_experiment("ppo", nodes=2, devices_per_node=2, batch_size=8, minibatches=2)
    good = Layout(DeviceMesh(0, 1), 1, 1, 1)
    plan = Plan({c: good for c in exp.workflow.call_names})
    assert validate(plan, exp) == []
    layouts = dict(plan.layouts)
    layouts["actor_gen"] = Layout(DeviceMesh(0, 4), 1, 4, 1)  # tp spans nodes (2 per node)
    layouts["ref_inf"] = Layout(DeviceMesh(0, 2), 1, 1, 3)  # 3 != 2 and pp > 2 layers
    layouts["actor_train"] = Layout(DeviceMesh(0, 2), 2, 1, 1, 4)  # 4 seqs per minibatch over 2·4
    del layouts["critic_train"]
    layouts["critic_gen"] = good
    msgs = validate(Plan(layouts), exp)
    text = "\n".join(msgs)
    assert "call critic_gen: unknown call" in text
    assert "call critic_train: missing from the plan" in text
    assert "call actor_gen: tp=4 spans nodes" in text
    assert "call ref_inf: dp·tp·pp = 1·1·3 = 3 must equal mesh 0-1 size 2" in text
    assert "call ref_inf: pp=3 exceeds layers=2" in text
    assert "call actor_train: batch of 4 sequences per minibatch (2 minibatches) is not divisible by " \
           "dp·micro_batches = 2·4 = 8" in text
    assert "call actor_gen: tp=4 must divide kv_heads=2" in text
    assert len(msgs) == 7


def test_tensor_parallelism_across_nodes_is_allowed_only_when_the_layout_says_so():
    model, cluster = PRESETS["llama2-7b"], Cluster(4, 8, "a100-80g")
    train, gen = _call(64, 2), _call(64, 1, "generate")
    across = Layout(DeviceMesh(0, 32), 2, 16, 1, 4, tp_across_nodes=True)
    assert layout_problems(train, model, cluster, across) == []
    assert layout_problems(_call(64, 1, "inference"), model, cluster, across) == []
    assert across.tp_span(8) == (8, 2) and dataclasses.replace(across, tp=4, dp=8).tp_span(8) == (4, 1)
    refused = layout_problems(train, model, cluster, dataclasses.replace(across, tp_across_nodes=False))
    assert refused == ["call c: tp=16 spans nodes; tensor-parallel groups must fit in one node of 8 devices "
                       "(tp at most 8); or the layout may say tp_across_nodes: true (Megatron allows it; its "
                       "collectives then cross the inter-node links)"]
    inside = Layout(DeviceMesh(0, 8), 2, 4, 1, 4, tp_across_nodes=True)
    assert layout_problems(train, model, cluster, inside) == [
        "call c: tp_across_nodes with tp=4, whose groups stay inside nodes of 8 devices on mesh 0-7: "
        "leave tp_across_nodes unset"]
    odd = layout_problems(train, PRESETS["tiny-2l-128h"], Cluster(3, 4, "cpu"),
                          Layout(DeviceMesh(0, 12), 1, 6, 2, 1, tp_across_nodes=True))
    assert "call c: tp=6 with tp_across_nodes must be a multiple of the 4 devices per node" in "\n".join(odd)
    # whole nodes only: a mesh off a node's first device makes groups that straddle part-nodes
    shifted = layout_problems(train, model, cluster, Layout(DeviceMesh(4, 16), 1, 16, 1, 4, tp_across_nodes=True))
    assert shifted == ["call c: tp=16 with tp_across_nodes must be a multiple of the 8 devices per node on a mesh "
                       "starting at a node's first device (mesh 4-19), so that each tensor-parallel group is whole "
                       "nodes"]
    # a group straddling nodes on an uneven mesh gets no tp_across_nodes hint: it could not be whole nodes
    straddle = layout_problems(train, model, cluster, Layout(DeviceMesh(4, 8), 1, 8, 1, 4))
    assert len(straddle) == 1 and "straddles" in straddle[0] and "tp_across_nodes" not in straddle[0]
    assert any("applies to train and inference calls only, not to this generate call" in p
               for p in layout_problems(gen, model, cluster, across))


def test_tp_across_nodes_is_carried_in_plan_json_only_when_set():
    across = Layout(DeviceMesh(0, 16), 1, 16, 1, 2, tp_across_nodes=True)
    plan = Plan({"actor_train": across, "ref_inf": Layout(DeviceMesh(0, 8), 1, 8, 1)})
    text = plan.to_json()
    assert text.count("tp_across_nodes") == 1 and Plan.from_json(text) == plan
    assert "tp_across_nodes" in plan.table() and "tp_across_nodes" not in Plan({"r": Layout(DeviceMesh(0, 8), 1, 8,
                                                                                              1)}).table()
    with pytest.raises(ConfigError, match=r"calls.a.tp_across_nodes: 'yes' must be true or false"):
        Plan.from_data({"calls": {"a": {"mesh": "0-15", "dp": 1, "tp": 16, "pp": 1, "tp_across_nodes": "yes"}}})
    with pytest.raises(ConfigError, match="tp_across_nodes=1: must be true or false"):
        Layout(DeviceMesh(0, 16), 1, 16, 1, tp_across_nodes=1)


@settings(max_examples=30, deadline=None)
@given(clusters, models)
def test_the_planners_space_keeps_tensor_parallel_groups_inside_a_node(cluster, model):
    layouts = enumerate_layouts(_call(64, 2), model, cluster)
    assert not any(lay.tp_across_nodes or lay.tp > cluster.devices_per_node for lay in layouts)


def test_paired_batch_divisibility_counts_pairs():
    cluster = Cluster(1, 4, "cpu")
    model = PRESETS["tiny-2l-128h"]
    call = _call(seqs=12, minibatches=1, paired=True)  # 6 pairs
    assert layout_problems(call, model, cluster, Layout(DeviceMesh(0, 2), 2, 1, 1, 3)) == []
    assert "6 pairs" in layout_problems(call, model, cluster, Layout(DeviceMesh(0, 4), 4, 1, 1))[0]


@pytest.mark.parametrize("text,error", [
    ("[]", "must be a JSON object with a 'calls' object"),
    ('{"calls": {"a": {"mesh": "0-1", "dp": 2, "tp": 1}}}', "missing key(s) ['pp']"),
    ('{"calls": {"a": {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1, "zero": 1}}}', "unknown key(s) ['zero']"),
    ('{"calls": {"a": {"mesh": "1-0", "dp": 1, "tp": 1, "pp": 1}}}', "last device 0 is before first 1"),
    ('{"calls": {"a": {"mesh": "x", "dp": 1, "tp": 1, "pp": 1}}}', "calls.a.mesh"),
    ('{"calls": {"a": {"mesh": "0", "dp": 0, "tp": 1, "pp": 1}}}', "calls.a.dp=0 must be at least 1"),
    ('{"calls": {}', "not valid JSON"),
    ('{"calls": {"a": {"mesh": "0", "dp": 1, "tp": 1, "pp": 1, "recompute": "some"}}}',
     "calls.a.recompute: 'some' is not one of ['none', 'full']"),
])
def test_plan_json_errors_name_the_key(text, error):
    with pytest.raises(ConfigError) as err:
        Plan.from_json(text)
    assert error in str(err.value)


def test_plan_table_lists_every_call():
    plan = Plan({"actor_gen": Layout(DeviceMesh(0, 8), 1, 8, 1), "ref_inf": Layout(DeviceMesh(4, 4), 2, 2, 1, 4)})
    lines = plan.table().splitlines()
    assert lines[0].split() == ["call", "mesh", "devices", "dp", "tp", "pp", "micro_batches"]
    assert lines[2].split() == ["actor_gen", "0-7", "8", "1", "8", "1", "1"]
    assert lines[3].split() == ["ref_inf", "4-7", "4", "2", "2", "1", "4"]


def test_model_spec_tp_divisibility_is_checked_for_value_heads_too():
    critic = ModelSpec("c", 2, 64, 100, 4, 2, 100, head="value")
    call = _call(8, 1, kind="inference")
    probs = layout_problems(call, critic, Cluster(1, 8, "x"), Layout(DeviceMesh(0, 8), 1, 8, 1))
    assert _rules(probs) == {"heads", "kv_heads", "ffn", "vocab"}


def test_recompute_is_a_train_layout_option():
    """Plan files without the key load as no recompute; with it, the key round-trips, the table
    grows a column, and only train calls may recompute."""
    old = '{"calls": {"a": {"mesh": "0-1", "dp": 2, "tp": 1, "pp": 1}}}'
    assert Plan.from_json(old)["a"].recompute == "none"
    plan = Plan({"actor_train": Layout(DeviceMesh(0, 2), 2, 1, 1, 2, "full"),
                 "ref_inf": Layout(DeviceMesh(0, 2), 2, 1, 1)})
    assert '"recompute": "full"' in plan.to_json() and plan.to_json().count("recompute") == 1
    assert Plan.from_json(plan.to_json()) == plan
    lines = plan.table().splitlines()
    assert lines[0].split()[-1] == "recompute" and lines[2].split()[-1] == "full" and lines[3].split()[-1] == "none"
    assert "recompute" not in Plan({"ref_inf": plan["ref_inf"]}).table()
    with pytest.raises(ConfigError, match="recompute='partial': must be one of"):
        Layout(DeviceMesh(0, 1), 1, 1, 1, 1, "partial")
    # ordering and hashing still work on layouts that differ only in recompute (search keys)
    a, b = Layout(DeviceMesh(0, 1), 1, 1, 1, 1), Layout(DeviceMesh(0, 1), 1, 1, 1, 1, "full")
    assert a != b and len({a, b}) == 2 and sorted([b, a]) == [b, a]

    exp = tiny_experiment("ppo", devices_per_node=2, batch_size=8, minibatches=2)
    one = Layout(DeviceMesh(0, 1), 1, 1, 1)
    layouts = {c: one for c in exp.workflow.call_names}
    layouts["actor_train"] = dataclasses.replace(one, recompute="full")
    assert validate(Plan(layouts), exp) == []
    layouts["ref_inf"] = dataclasses.replace(one, recompute="full")
    assert validate(Plan(layouts), exp) == [
        "call ref_inf: recompute='full' applies to train calls only, not to this inference call (use recompute='none')"]
