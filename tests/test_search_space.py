"""The plan space: validity and memory pruning, counting without listing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import load_profile
from estimator.sim.evaluator import Evaluator
from estimator.spec.cluster import Cluster, DeviceMesh
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Layout, Plan, enumerate_layouts
from search.space import build_space
from tests.conftest import EXAMPLES, tiny_experiment
from tests.synthetic import linear_profile


def test_valid_counts_match_the_enumerated_layouts_and_kept_layouts_are_valid():
    exp = tiny_experiment("ppo")
    space = build_space(exp, linear_profile())
    for cs in space.calls:
        listed = enumerate_layouts(exp.workflow[cs.name], exp.models[cs.role], exp.cluster)
        assert cs.valid == len(listed)
        # nothing pruned with 80 GB per device, but recompute and offload, which no plan would
        # need there
        plain = {lay for lay in listed if lay.recompute == "none" and lay.offload == "none"}
        assert set(cs.layouts()) == plain and cs.recompute_count == 0 and cs.offload_count == 0
        assert cs.count == len(plain)
        assert len(plain) < len(listed) if exp.workflow[cs.name].kind == "train" else len(plain) == len(listed)
    assert space.log10_size == pytest.approx(math.log10(space.size))


def test_memory_pruning_drops_only_layouts_no_plan_can_fit():
    exp = load_experiment(EXAMPLES / "ppo-llama2-7b-8xh100.yaml")
    profile = load_profile("h100-sxm")
    space = build_space(exp, profile)
    train = space["actor_train"]
    listed = enumerate_layouts(exp.workflow["actor_train"], exp.models["actor"], exp.cluster)
    dropped = [lay for lay in listed if not train.contains(lay)]
    assert 0 < len(dropped) < len(listed)
    cheapest = {c.name: min(c.layouts(), key=lambda lay: (lay.mesh.size, lay.micro_batches)) for c in space.calls}
    assert 0 < train.recompute_count < sum(lay.recompute == "full" for lay in listed)
    assert space.summary()["calls"]["actor_train"]["recompute"] == train.recompute_count
    row = next(line for line in space.table().splitlines() if line.startswith("actor_train"))
    assert row.split()[4] == f"{train.recompute_count:,}" and "of which recompute" in space.table()
    ev = Evaluator(exp, profile)
    for lay in dropped[:: max(1, len(dropped) // 10)]:
        # with every other call on the smallest mesh it allows, the dropped layout still
        # overflows, or (recompute) the same layout without it fits and is faster
        plan = Plan({**cheapest, "actor_train": lay})
        if not plan_memory(exp, plan, profile.capacity_bytes, profile.stack).feasible:
            continue
        twin = dataclasses.replace(lay, recompute="none")
        assert lay.recompute == "full" and train.contains(twin)
        without = ev.evaluate(Plan({**cheapest, "actor_train": twin}))
        assert without.feasible and without.iteration_s < ev.evaluate(plan).iteration_s


def test_a_call_that_cannot_fit_anywhere_is_an_error_naming_it():
    exp = tiny_experiment("ppo")
    with pytest.raises(ConfigError, match="call actor_train: no valid layout fits in 976.6 KiB per device"):
        build_space(exp, linear_profile(capacity=1e6))


def test_1024_devices_are_counted_not_listed():
    exp = load_experiment(EXAMPLES / "ppo-llama2-70b-128xh100.yaml")
    big = dataclasses.replace(exp, cluster=Cluster(128, 8, "h100-sxm"))
    space = build_space(big, load_profile("h100-sxm"))
    gen = space["actor_gen"]
    meshes = big.cluster.meshes()
    assert sum(len(f) for f in gen.firsts.values()) == len(meshes)
    assert gen.count == sum(len(gen.shapes[s]) * len(gen.firsts[s]) for s in gen.shapes)
    assert gen.count > 100_000 and space.log10_size > 30
    assert space.size == math.prod(c.count for c in space.calls)


def test_a_call_that_cannot_fit_names_the_least_it_needs_by_part():
    from estimator.cost.memory import call_bytes, fmt_bytes, state_bytes

    exp = tiny_experiment("ppo")
    with pytest.raises(ConfigError) as err:
        build_space(exp, linear_profile(capacity=1e6))
    msg = str(err.value)
    call, model = exp.workflow["actor_train"], exp.models["actor"]

    def need(lay) -> float:  # the fullest stage: the call at home plus all of the role's state
        dynamic = call_bytes(call, model, lay, at_home=True)  # (an offloaded part is back for the train call)
        static = state_bytes(model, lay, trained=True)
        return max(sum(d.values()) + sum(s.values()) for d, s in zip(dynamic, static))

    least = min(need(lay) for lay in enumerate_layouts(call, model, exp.cluster))
    assert f"the least it needs is {fmt_bytes(least)} on a device (mesh " in msg
    for part in ("weights", "grads", "optimizer", "activations"):
        assert f"{part} " in msg.split("the least it needs")[1]
    assert msg.endswith("against 976.6 KiB")


def test_the_space_lays_out_actor_inf_and_nothing_for_a_verifier():
    """``old_logprobs: recompute`` and ``reward: rule``: the space has layouts for ``actor_inf``
    (an actor call: the same count as the reference's forward over the same rollout) and none
    for a reward; any plan of it evaluates."""
    base = tiny_experiment("grpo", group_size=2)
    params = dataclasses.replace(base.params, verifier=True, old_logprobs="recompute")
    exp = dataclasses.replace(base, params=params, models={r: m for r, m in base.models.items() if r != "reward"})
    space = build_space(exp, linear_profile(), recompute=False)
    assert space.names == tuple(exp.workflow.topological_order()) and "actor_inf" in space.names
    assert space.roles == {"actor": ("actor_gen", "actor_inf", "actor_train"), "ref": ("ref_inf",)}
    assert space.homes == {"actor": "actor_train", "ref": "ref_inf"}
    assert space["actor_inf"].count == space["ref_inf"].count > 1
    plan = space.plan(tuple(space[n].layouts()[-1] for n in space.names))
    assert Evaluator(exp, linear_profile()).evaluate(plan).iteration_s > 0


def test_uneven_spaces_count_and_list_every_run_where_tp_stays_in_a_node():
    """With ``uneven`` a call's layouts are those of every contiguous run (2 nodes of 4: 36
    meshes, 10 of them aligned): counted and listed as enumerate_layouts lists them, a shape
    standing only on the runs its tp fits; the default space keeps the aligned ones."""
    exp = tiny_experiment("ppo", nodes=2, devices_per_node=4)
    profile = linear_profile()
    default, uneven = build_space(exp, profile), build_space(exp, profile, uneven=True)
    for cs in uneven.calls:
        listed = enumerate_layouts(exp.workflow[cs.name], exp.models[cs.role], exp.cluster, uneven=True)
        plain = [lay for lay in listed if lay.recompute == "none" and lay.offload == "none"]  # (neither needed here)
        assert cs.valid == len(listed) and cs.count == len(plain) == len(cs.layouts())
        assert set(cs.layouts()) == set(plain)
        assert {DeviceMesh(1, 2), DeviceMesh(3, 2), DeviceMesh(2, 4)} <= {lay.mesh for lay in plain}
        assert default[cs.name].count < cs.count
    gen, aligned = uneven["actor_gen"], default["actor_gen"]
    tp2 = [Layout(DeviceMesh(f, 2), 1, 2, 1, 1) for f in range(7)]
    assert [gen.contains(lay) for lay in tp2] == [True, True, True, False, True, True, True]  # 3-4 crosses
    assert [aligned.contains(lay) for lay in tp2] == [True, False, True, False, True, False, True]
    odd, even = DeviceMesh(1, 4), DeviceMesh(2, 4)  # 3 + 1 and 2 + 2 devices on the two nodes
    assert {sh[1] for sh in gen.shapes_on(odd)} == {1} and {sh[1] for sh in gen.shapes_on(even)} == {1, 2}
    assert gen.layouts_on(odd) == [lay for lay in gen.layouts() if lay.mesh == odd]


def test_annealing_on_an_uneven_space_visits_runs_and_keeps_valid_plans():
    from estimator.spec.plan import validate
    from search.anneal import Chain

    exp = tiny_experiment("ppo", nodes=2, devices_per_node=4)
    profile = linear_profile()
    space = build_space(exp, profile, uneven=True)
    chain = Chain(exp, profile, space, (3, 0), top_k=50)
    seen = []
    score = chain.score
    chain.score = lambda key: (seen.append(key), score(key))[1]
    result = chain.run([space.key(Plan({n: space[n].layouts()[0] for n in space.names}))], 300, None)
    assert result.evaluated == 300 and len(result.top) == 50
    assert any(not exp.cluster.aligned(lay.mesh) for key in seen for lay in key)
    for key in seen:
        plan = space.plan(key)
        assert space.contains(plan) and validate(plan, exp) == []
