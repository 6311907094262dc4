"""Workflow presets: edges, version edges, topological order and unrolling."""

from __future__ import annotations

import pytest

from estimator.base.errors import ConfigError
from estimator.spec.workflow import Call, CallInstance, Workflow, WorkflowParams, Workload, build

P = WorkflowParams(batch_size=16, prompt_len=8, gen_len=4, ppo_minibatches=2, group_size=4)


def _edges(wf):
    return {(p, c) for p, c, _ in wf.edges()}


def _assert_topological(wf):
    order = wf.topological_order()
    assert sorted(order) == sorted(wf.call_names)
    pos = {n: i for i, n in enumerate(order)}
    for p, c, _ in wf.edges():
        assert pos[p] < pos[c], (p, c)


def test_ppo_graph():
    wf = build("ppo", P)
    _assert_topological(wf)
    infs = {"ref_inf", "reward_inf", "critic_inf"}
    trains = {"actor_train", "critic_train"}
    assert _edges(wf) == ({("actor_gen", i) for i in infs} | {("actor_gen", t) for t in trains}
                          | {(i, t) for i in infs for t in trains})
    assert set(wf.version_edges()) == {("actor_train", "actor_gen", 1), ("actor_train", "actor_train", 1),
                                       ("critic_train", "critic_inf", 1), ("critic_train", "critic_train", 1)}
    assert wf["actor_train"].workload.minibatches == 2
    assert wf["actor_gen"].workload.seqs == 16 and wf["ref_inf"].workload.seq_len == 12
    assert wf.topological_order()[0] == "actor_gen"


def test_grpo_graph_has_no_critic_and_group_samples():
    wf = build("grpo", P)
    _assert_topological(wf)
    assert "critic_inf" not in wf and wf.roles == ("actor", "ref", "reward")
    assert wf["actor_gen"].workload.seqs == 16 * 4
    assert _edges(wf) == {("actor_gen", "ref_inf"), ("actor_gen", "reward_inf"), ("actor_gen", "actor_train"),
                          ("ref_inf", "actor_train"), ("reward_inf", "actor_train")}
    assert set(wf.version_edges()) == {("actor_train", "actor_gen", 1), ("actor_train", "actor_train", 1)}


def test_dpo_graph_pairs():
    wf = build("dpo", P)
    assert wf.topological_order() == ["ref_inf", "actor_train"]
    assert _edges(wf) == {("ref_inf", "actor_train")}
    w = wf["actor_train"].workload
    assert w.paired and w.seqs == 32 and w.units == 16 and w.units_per_minibatch == 8


def test_remax_graph_two_generations():
    wf = build("remax", P)
    _assert_topological(wf)
    assert wf["actor_gen_greedy"].workload.greedy and not wf["actor_gen"].workload.greedy
    assert ("actor_gen_greedy", "reward_inf_greedy") in _edges(wf)
    assert ("reward_inf_greedy", "actor_train") in _edges(wf)
    assert ("actor_train", "actor_gen_greedy", 1) in wf.version_edges()


def test_sft_and_rw_single_call():
    assert build("sft", P).call_names == ("actor_train",)
    rw = build("rw", P)
    assert rw.call_names == ("reward_train",) and rw["reward_train"].workload.paired
    assert rw.version_edges() == [("reward_train", "reward_train", 1)]


def test_unroll_links_iterations_by_version_edges():
    wf = build("ppo", P)
    nodes, edges = wf.unroll(3)
    assert len(nodes) == 18 and nodes[0] == CallInstance(0, "actor_gen")
    assert (CallInstance(0, "actor_train"), CallInstance(1, "actor_gen")) in edges
    assert (CallInstance(1, "critic_train"), CallInstance(2, "critic_inf")) in edges
    # no edge goes back in time or skips to a later iteration
    assert all(b.iteration - a.iteration in (0, 1) for a, b in edges)
    # the node order is a topological order of the unrolled graph
    pos = {n: i for i, n in enumerate(nodes)}
    assert all(pos[a] < pos[b] for a, b in edges)
    # the reference model is never trained, so iteration 1's ref_inf waits only on its own generation
    assert {a for a, b in edges if b == CallInstance(1, "ref_inf")} == {CallInstance(1, "actor_gen")}
    with pytest.raises(ConfigError):
        wf.unroll(0)


def test_unknown_algorithm():
    with pytest.raises(ConfigError, match="algorithm='ppo2'"):
        build("ppo2", P)


def test_workflow_rejects_cycles_duplicates_and_dangling_inputs():
    w = Workload(4, 2, 2)
    a = Call("a", "x", "inference", ("y",), ("x",), w)
    b = Call("b", "x", "inference", ("x",), ("y",), w)
    with pytest.raises(ConfigError, match="cycle"):
        Workflow("t", (a, b))
    with pytest.raises(ConfigError, match="duplicate call names"):
        Workflow("t", (b, b))
    t1 = Call("t1", "x", "train", (), (), w)
    with pytest.raises(ConfigError, match="roles \\['x'\\] have more than one train call"):
        Workflow("t", (t1, Call("t2", "x", "train", (), (), w)))
    with pytest.raises(ConfigError, match="reads \\['z'\\], which no call writes"):
        Workflow("t", (Call("c", "x", "inference", ("z",), (), w),))


def test_workload_rejects_bad_values():
    with pytest.raises(ConfigError, match="seqs=0"):
        Workload(0, 1, 1)
    with pytest.raises(ConfigError, match="even"):
        Workload(3, 1, 1, paired=True)
    with pytest.raises(ConfigError, match="kind='eval'"):
        Call("c", "x", "eval", (), (), Workload(1, 1, 1))
