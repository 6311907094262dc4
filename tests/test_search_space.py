"""The plan space: validity and memory pruning, counting without listing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from estimator.base.errors import ConfigError
from estimator.cost.memory import plan_memory
from estimator.profile.profiles import load_profile
from estimator.sim.evaluator import Evaluator
from estimator.spec.cluster import Cluster
from estimator.spec.experiment import load_experiment
from estimator.spec.plan import Plan, enumerate_layouts
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
        if not plan_memory(exp, plan, profile.capacity_bytes).feasible:
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
