"""Workflow presets: edges, version edges, topological order and unrolling."""

from __future__ import annotations

import dataclasses

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


VERIFIED = WorkflowParams(batch_size=16, prompt_len=8, gen_len=4, ppo_minibatches=2, group_size=4, verifier=True)
RECOMPUTED = WorkflowParams(batch_size=16, prompt_len=8, gen_len=4, ppo_minibatches=2, group_size=4,
                            old_logprobs="recompute")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "remax"])
def test_a_verifier_replaces_the_reward_calls_by_generate_outputs(algorithm):
    wf = build(algorithm, dataclasses.replace(VERIFIED, group_size=4 if algorithm == "grpo" else 1))
    _assert_topological(wf)
    assert "reward" not in wf.roles
    assert not {"reward_inf", "reward_inf_greedy"} & set(wf.call_names)
    assert wf.producer("rewards") == "actor_gen"
    assert wf["actor_gen"].outputs == ("seq", "old_logp", "rewards")
    assert ("actor_gen", "actor_train", "rewards") in wf.edges()
    if algorithm == "remax":
        assert wf["actor_gen_greedy"].outputs == ("seq_greedy", "rewards_greedy")
        assert ("actor_gen_greedy", "actor_train", "rewards_greedy") in wf.edges()
    if algorithm == "ppo":
        assert ("actor_gen", "critic_train", "rewards") in wf.edges()


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "remax"])
def test_recomputed_old_logprobs_are_an_actor_inference_over_the_rollout(algorithm):
    group = 4 if algorithm == "grpo" else 1
    wf = build(algorithm, dataclasses.replace(RECOMPUTED, group_size=group))
    _assert_topological(wf)
    inf = wf["actor_inf"]
    assert (inf.role, inf.kind, inf.inputs, inf.outputs) == ("actor", "inference", ("seq",), ("old_logp",))
    assert inf.workload == wf["ref_inf"].workload
    assert wf["actor_gen"].outputs == ("seq",) and wf.producer("old_logp") == "actor_inf"
    assert ("actor_gen", "actor_inf", "seq") in wf.edges() and ("actor_inf", "actor_train", "old_logp") in wf.edges()
    # versioned like the actor: the update of iteration i reaches it in i + 1, and it reads the
    # weights that generated the rollout (before actor_train, which needs its output)
    assert ("actor_train", "actor_inf", 1) in wf.version_edges()
    order = wf.topological_order()
    assert order.index("actor_gen") < order.index("actor_inf") < order.index("actor_train")
    assert wf.home_calls()["actor"] == "actor_train"
    both = build(algorithm, dataclasses.replace(RECOMPUTED, verifier=True, group_size=group))
    assert both["actor_gen"].outputs == ("seq", "rewards") and "actor_inf" in both


def test_default_options_keep_the_workflows_and_bad_old_logprobs_are_refused():
    for algorithm in ("ppo", "grpo", "remax"):
        assert "actor_inf" not in build(algorithm, dataclasses.replace(P, group_size=1))
    with pytest.raises(ConfigError, match="old_logprobs='bogus' must be one of from_generation, recompute"):
        WorkflowParams(16, 8, 4, old_logprobs="bogus")


def test_the_program_runs_rollouts_ahead_and_pushes_after_the_updates_they_feed():
    """GRPO under η = 1 over 3 iterations, by hand: the rollouts of iteration j in slot j − 1,
    and with a standing copy the push of update 0 (the only one a rollout of the run reads:
    iteration 2's) right after it."""
    from estimator.spec.workflow import push_target, steady_iterations

    wf = dataclasses.replace(build("grpo", P), staleness=1)
    gen, ref, rew, train, push = "actor_gen", "ref_inf", "reward_inf", "actor_train", "push:actor_gen"
    want = [(0, gen), (1, gen), (0, ref), (0, rew), (0, train), (0, push), (2, gen), (1, ref), (1, rew),
            (1, train), (2, ref), (2, rew), (2, train)]
    program = wf.program(3, {gen})
    assert [(n.iteration, n.call) for n in program] == want
    assert wf.program(3) == wf.unroll(3)[0] == [n for n in program if push_target(n.call) is None]
    assert wf.pushed_update(CallInstance(0, push)) == CallInstance(0, train)
    assert [wf.slot(n) for n in program] == [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert steady_iterations(wf, 3) == 3 + 2 + 1 and steady_iterations(build("grpo", P), 3) == 3
