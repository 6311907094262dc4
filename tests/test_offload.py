"""Offload of a trained role's state to host memory (``Layout.offload``): the plan key, what stays
resident while other calls run, the host transfers and their time in the evaluator and the
simulator, the host link of a profile, the search and the frameworks' baselines."""

from __future__ import annotations

import dataclasses
import json

import pytest

from estimator.base.errors import ConfigError, PlanInvalidError
from estimator.cost.lowering import Costs
from estimator.cost.memory import (
    home_bytes,
    offloaded_bytes,
    plan_memory,
    restored_bytes,
    source_bytes,
    stage_param_counts,
    state_bytes,
)
from estimator.cost.offload import ADAM_TENSORS, offload_cost
from estimator.profile.profiles import load_profile, profile_from_dict
from estimator.sim.evaluator import Evaluator
from estimator.sim.simulate import simulate
from estimator.sim.simulator import Simulation
from estimator.spec.cluster import DeviceMesh
from estimator.spec.experiment import load_experiment
from estimator.spec.models import PRESETS
from estimator.spec.plan import OFFLOAD_CHOICES, Layout, Plan, check, validate
from estimator.spec.sharding import shard
from tests.conftest import EXAMPLES, tiny_experiment
from tests.synthetic import linear_profile_dict

TINY = PRESETS["tiny-2l-128h"]
P = TINY.params  # 361,088: one device of a tp 1, pp 1 layout holds every parameter
TENSORS = len(shard(TINY, Layout(DeviceMesh(0, 1), 1, 1, 1), 0))  # 21 parameter tensors
GRPO_8B = EXAMPLES / "grpo-llama3-8b-8xh100.yaml"


def _lay(mesh: str = "0-3", dp: int = 4, tp: int = 1, pp: int = 1, mb: int = 1, **kw) -> Layout:
    return Layout(DeviceMesh.parse(mesh), dp, tp, pp, mb, **kw)


def _host_profile(bw: float = 1e9, launch: float = 0.0, capacity: float = 80e9, d2h: float | None = None):
    """The synthetic linear profile with a host link of ``bw`` bytes/s per device host → device
    and ``d2h`` (default ``bw``) device → host."""
    doc = linear_profile_dict(launch=launch, capacity=capacity)
    doc["host_link"] = {"h2d_bytes_per_s": bw, "d2h_bytes_per_s": d2h or bw, "alpha_s": 0.0,
                        "cite": "synthetic test profile"}
    return profile_from_dict(doc)


def _offloading(plan: Plan, experiment, offload: str) -> Plan:
    wf = experiment.workflow
    return Plan({c: dataclasses.replace(lay, offload=offload) if wf[c].kind == "train" else lay
                 for c, lay in plan.layouts.items()})


# ---- the plan key ------------------------------------------------------------------------------

def test_the_plan_json_carries_offload_only_when_set_and_round_trips():
    lay = _lay(offload="optimizer", shard="full")
    assert lay.to_dict()["offload"] == "optimizer" and "offload" not in _lay().to_dict()
    plan = Plan({"actor_train": lay, "actor_gen": _lay()})
    back = Plan.from_json(plan.to_json())
    assert back == plan and back["actor_train"].offload == "optimizer"
    assert "offload" in plan.table().splitlines()[0]
    assert "offload" not in Plan({"actor_gen": _lay()}).table()
    # offload changes where state is while other calls run, not which device holds it
    assert lay.same_placement(dataclasses.replace(lay, offload="none"))


def test_offload_values_and_calls_are_checked_by_name():
    with pytest.raises(ConfigError, match=r"layout offload='cpu': must be one of \['none', 'optimizer', 'all'\]"):
        _lay(offload="cpu")
    data = {"calls": {"actor_train": {"mesh": "0-3", "dp": 4, "tp": 1, "pp": 1, "offload": "everything"}}}
    with pytest.raises(ConfigError, match=r"calls.actor_train.offload: 'everything' is not one of"):
        Plan.from_data(data)
    exp = tiny_experiment("ppo")
    plan = Plan({c: _lay(offload="all" if c == "ref_inf" else "none") for c in exp.workflow.call_names})
    (problem,) = validate(plan, exp)
    assert problem.startswith("call ref_inf: offload='all' applies to train calls only") and "inference" in problem
    with pytest.raises(PlanInvalidError):
        check(plan, exp)


# ---- memory ------------------------------------------------------------------------------------

def test_what_stays_resident_by_hand():
    """P parameters per device; 2·P bf16 weights and gradients, 12·P fp32 Adam state, the state
    split over dp = 4 as ``shard`` says."""
    opt = _lay(shard="optimizer", offload="optimizer")  # ZeRO-1: state / 4
    assert home_bytes(TINY, opt, True) == [{"weights": 2 * P, "grads": 2 * P}]
    assert offloaded_bytes(TINY, opt, True) == [{"optimizer": 12 * P / 4}]
    full = _lay(shard="full", offload="all")  # ZeRO-3: everything / 4, and everything on the host
    assert home_bytes(TINY, full, True) == [{}]
    assert offloaded_bytes(TINY, full, True) == [{"weights": P / 2, "grads": P / 2, "optimizer": 3 * P}]
    assert state_bytes(TINY, full, True) == [{"weights": P / 2, "grads": P / 2, "optimizer": 3 * P}]
    # an untrained role keeps its weights whatever its layout says
    assert home_bytes(TINY, full, False) == state_bytes(TINY, full, False) == [{"weights": P / 2}]


def test_the_train_call_and_the_roles_other_calls_bring_back_what_they_need():
    exp = tiny_experiment("ppo")
    wf = exp.workflow
    home = _lay(offload="all")  # replicated over dp 4: P parameters per device
    assert restored_bytes(wf["actor_train"], TINY, home, home, True) == [
        {"weights": 2 * P, "grads": 2 * P, "optimizer": 12 * P}]
    # the actor's generation on the home's placement reads the weights there: they come back
    assert restored_bytes(wf["actor_gen"], TINY, _lay(mb=2), home, True) == [{"weights": 2 * P}]
    # elsewhere it reallocates: the home's devices upload the weights they send
    away = _lay("4-7", dp=2, tp=2)
    assert restored_bytes(wf["actor_gen"], TINY, away, home, True) == [{}]
    src = source_bytes(TINY, away, home, True)
    assert sorted(src) == list(range(8))
    assert {src[d]["weights"] for d in range(4)} == {2 * P} and {src[d]["realloc"] for d in range(4)} == {0.0}
    assert {src[d]["realloc"] for d in range(4, 8)} == {2 * stage_param_counts(TINY, away)[0]}  # tp 2
    # a peak there is reported as the call's reallocation
    from estimator.cost.memory import DeviceMemory

    assert DeviceMemory(0, 1.0, "actor_gen", src[0], "reallocating").during == "actor_gen (reallocating)"
    assert DeviceMemory(0, 1.0, "actor_gen").during == "actor_gen" and DeviceMemory(0, 0.0, "").during == "no call"
    # under "optimizer" the weights stay: nothing comes back for another call, nothing is uploaded to send
    opt = _lay(offload="optimizer")
    assert restored_bytes(wf["actor_gen"], TINY, _lay(), opt, True) == [{}]
    assert source_bytes(TINY, away, opt, True) == {}


def test_the_peak_by_hand_with_and_without_the_optimizer_offloaded():
    """Every call on the same four devices (replicated, P parameters per device for the actor's
    model, V for the value models'). Resident: every role's bf16 weights, the trained roles'
    gradients and — without offload — their Adam state, 12·P and 12·V. A device's peak is that
    plus its largest call; the train calls bring their Adam state back while they run. Without
    offload the generation is the largest call; with it the generation's device holds 12·(P + V)
    less, and the actor's training, holding everything again, becomes the peak."""
    from estimator.cost.memory import call_bytes

    exp = tiny_experiment("ppo", batch_size=256)
    wf = exp.workflow
    plan = Plan({c: _lay(mb=8) if wf[c].kind != "generate" else _lay() for c in wf.call_names})
    V = exp.models["critic"].params
    adds = {c: sum(call_bytes(wf[c], exp.models[wf[c].role], plan[c], True)[0].values()) for c in wf.call_names}
    resident = 2 * P + 2 * P + 2 * V + 2 * V + 2 * P + 2 * V  # actor, critic (weights, grads); ref, reward
    none = plan_memory(exp, plan, 80e9, None)
    assert none.peak.call == "actor_gen"
    assert none.peak.peak_bytes == pytest.approx(resident + 12 * P + 12 * V + max(adds.values()))
    off = plan_memory(exp, _offloading(plan, exp, "optimizer"), 80e9, None)
    rows = dict(adds, actor_train=adds["actor_train"] + 12 * P, critic_train=adds["critic_train"] + 12 * V)
    assert off.peak.peak_bytes == pytest.approx(resident + max(rows.values()))
    assert off.peak.call == "actor_train" and off.peak.parts["optimizer"] == pytest.approx(12 * P)
    ev = Evaluator(exp, _host_profile()).evaluate(_offloading(plan, exp, "optimizer"))
    assert ev.peak_memory_bytes == pytest.approx(off.peak.peak_bytes)


# ---- time --------------------------------------------------------------------------------------

def test_transfer_times_by_hand_from_the_host_link():
    """1 GB/s per device host → device, 2 GB/s device → host, 1 µs per copy: the Adam state
    (12·P bytes in three tensors per parameter tensor) up before the train call and down after
    it; under "all" the weights (2·P in one copy per tensor) too, and up again before each other
    call of the role."""
    exp = tiny_experiment("ppo")
    wf = exp.workflow
    prof = _host_profile(bw=1e9, launch=1e-6, d2h=2e9)
    opt = _lay(offload="optimizer")
    oc = offload_cost(wf["actor_train"], TINY, opt, opt, True, prof)
    adam, adam_down = (12 * P / bw + ADAM_TENSORS * TENSORS * 1e-6 for bw in (1e9, 2e9))
    assert (oc.upload_s, oc.download_s, oc.source_s) == (pytest.approx(adam), pytest.approx(adam_down), 0.0)
    assert not offload_cost(wf["actor_gen"], TINY, _lay(), opt, True, prof).any
    full = _lay(offload="all")
    weights, weights_down = (2 * P / bw + TENSORS * 1e-6 for bw in (1e9, 2e9))
    oc = offload_cost(wf["actor_train"], TINY, full, full, True, prof)
    assert oc.upload_s == pytest.approx(adam + weights) and oc.download_s == pytest.approx(adam_down + weights_down)
    at_home = offload_cost(wf["actor_gen"], TINY, _lay(mb=2), full, True, prof)
    assert (at_home.upload_s, at_home.download_s, at_home.source_s) == (pytest.approx(weights), 0.0, 0.0)
    away = offload_cost(wf["actor_gen"], TINY, _lay("4-7", dp=2, tp=2), full, True, prof)
    assert (away.upload_s, away.source_s) == (0.0, pytest.approx(weights))
    # ZeRO-1 steps one flat chunk: three copies of a quarter of the state
    zero1 = _lay(shard="optimizer", offload="optimizer")
    oc = offload_cost(wf["actor_train"], TINY, zero1, zero1, True, prof)
    assert oc.upload_s == pytest.approx(12 * P / 4 / 1e9 + ADAM_TENSORS * 1e-6)


def test_a_cpu_host_link_is_a_copy_in_host_memory_and_a_profile_without_one_says_so():
    cpu = load_profile("cpu")
    assert cpu.host_link.copy == "memory"
    assert cpu.host_copy_s(8e6, 4) == pytest.approx(4 * cpu.op_s(0.0, 2 * 8e6 / 4, 1, in_model=False))
    h100 = load_profile("h100-sxm")  # nvbandwidth#24: 35.2 GB/s host → device, 52.8 GB/s back
    assert h100.host_copy_s(35.2e9, 1, "upload") == pytest.approx(1.0 + h100.dispatch_s())
    assert h100.host_copy_s(52.8e9, 1, "download") == pytest.approx(1.0 + h100.dispatch_s())
    with pytest.raises(ConfigError, match=r"host copy direction='sideways' must be one of \['upload', 'download'\]"):
        h100.host_copy_s(1.0, 1, "sideways")
    bare = profile_from_dict(linear_profile_dict())
    with pytest.raises(ConfigError, match=r"profile linear: has no host_link section, so it cannot price offload"):
        bare.host_copy_s(1.0)
    doc = linear_profile_dict()
    doc["host_link"] = {"h2d_bytes_per_s": 1e9, "d2h_bytes_per_s": 1e9, "alpha_s": 0.0}
    with pytest.raises(ConfigError, match=r"host_link needs a 'cite'"):
        profile_from_dict(doc)
    doc["host_link"] = {"copy": "disk", "cite": "y"}
    with pytest.raises(ConfigError, match=r"host_link.copy='disk' must be one of \['memory'\]"):
        profile_from_dict(doc)


def test_every_shipped_profile_prices_offload_with_a_source():
    from estimator.profile.profiles import known_profiles

    for name in known_profiles():
        prof = load_profile(name)
        assert prof.host_link is not None, name
        assert prof.raw["host_link"].get("cite") or prof.raw["host_link"].get("command"), name
        assert 0 < prof.host_copy_s(1e9) < 1.0, name  # a GB in well under a second on any of them


def test_evaluator_and_simulator_charge_the_transfers_alike_by_hand():
    """The train call's duration grows by its upload and download, the simulator books them as
    offload spans on every stage (upload before the first forward, download after the last
    step), and the two engines give the same period."""
    exp = tiny_experiment("ppo")
    wf = exp.workflow
    prof = _host_profile(bw=1e8, launch=1e-6)
    plan = Plan({c: _lay(mb=2 if wf[c].kind == "train" else 1) for c in wf.call_names})
    off = _offloading(plan, exp, "optimizer")
    costs = Costs(exp, prof)
    ev = Evaluator(exp, prof, costs=costs)
    base, moved = ev.evaluate(plan), ev.evaluate(off)
    per = costs.offload("actor_train", off["actor_train"], off["actor_train"])
    extra = sum(2 * costs.offload(c, off[c], off[c]).upload_s for c in ("actor_train", "critic_train"))
    assert moved.iteration_s - base.iteration_s == pytest.approx(extra, rel=1e-9)
    sim = simulate(exp, off, prof, costs=costs)
    assert sim.iteration_s == pytest.approx(moved.iteration_s, rel=1e-9)
    spans = [s for s in sim.timeline(per_device=False).spans if s.op == "offload" and s.call == "actor_train"
             and s.iteration == 2]
    up = [s for s in spans if s.resource == "host upload"]
    down = [s for s in spans if s.resource == "host download"]
    assert len(up) == len(down) == 1
    assert up[0].duration_s == down[0].duration_s == pytest.approx(per.upload_s)
    rec = sim.records[(2, "actor_train")]
    assert up[0].end_s == pytest.approx(rec.compute_start_s) and down[0].end_s == pytest.approx(rec.end_s)


@pytest.mark.parametrize("offload", ["optimizer", "all"])
def test_evaluator_agrees_with_simulator_on_offload_plans(offload):
    """On the 8B GRPO example (the framework baselines' layouts, and plans whose calls reallocate
    from an offloaded home) and a tiny CPU one: the same period, the memory the report gives."""
    from search.baselines import build

    cases = []
    exp = load_experiment(GRPO_8B)
    prof = load_profile(exp.cluster.device)
    for name in ("verl-default", "openrlhf-hybrid"):
        cases.append((exp, prof, _offloading(build(name, exp, prof, simulate_it=False).plan, exp, offload)))
    tiny = load_experiment(EXAMPLES / "ppo-tiny-2xcpu.yaml")
    for path in ("dp2.json", "gen-vs-train.json"):
        plan = Plan.load(str(EXAMPLES / "plans" / "ppo-tiny-2xcpu" / path))
        cases.append((tiny, load_profile(tiny.cluster.device), _offloading(plan, tiny, offload)))
    for exp, prof, plan in cases:
        check(plan, exp)
        costs = Costs(exp, prof)
        fast = Evaluator(exp, prof, costs=costs).evaluate(plan)
        sim = simulate(exp, plan, prof, costs=costs)
        assert fast.iteration_s == pytest.approx(sim.iteration_s, rel=0.03), plan.table()
        memory = plan_memory(exp, plan, prof.capacity_bytes, prof.stack)
        assert fast.peak_memory_bytes == pytest.approx(memory.peak.peak_bytes)
        assert any(s.op == "offload" for s in sim.timeline(per_device=False).spans)


# ---- search and baselines ----------------------------------------------------------------------

def test_the_frameworks_baselines_fit_the_8b_grpo_example_with_their_offload():
    """verl (none, else its 8B recipe's param/grad/optimizer offload), OpenRLHF's hybrid engine
    (DeepSpeed sleep: the optimizer state) and NeMo-RL (colocated: everything) fit where they
    were 0.1 GiB over; DeepSpeed-Chat, which has no such offload, still says why not."""
    from search.baselines import build

    exp = load_experiment(GRPO_8B)
    prof = load_profile(exp.cluster.device)
    expected = {"verl-default": "all", "openrlhf-hybrid": "optimizer", "nemo-rl-default": "all"}
    for name, offload in expected.items():
        b = build(name, exp, prof, simulate_it=False)
        assert b.feasible, (name, b.reason)
        assert {b.plan[c].offload for c in exp.workflow.call_names if exp.workflow[c].kind == "train"} == {offload}
        # as laid out: offload, not a micro-batch count raised to squeeze the engine, made it fit
        assert b.plan["actor_gen"].micro_batches == 1, name
    dschat = build("dschat", exp, prof, simulate_it=False)
    assert not dschat.feasible and dschat.reason.startswith("predicted ") and "during actor_gen" in dschat.reason
    assert {dschat.plan[c].offload for c in exp.workflow.call_names} == {"none"}


def test_a_baseline_that_must_offload_on_a_profile_without_a_host_link_says_why():
    from search.baselines import build

    exp = tiny_experiment("grpo", group_size=4)
    bare = profile_from_dict(linear_profile_dict())
    b = build("nemo-rl-default", exp, bare, simulate_it=False)
    assert b.plan is None and "profile linear has no host_link section" in b.reason
    assert build("verl-default", exp, bare, simulate_it=False).feasible  # fits without: never asks


def test_the_search_space_offers_offload_where_it_can_matter():
    from search.space import build_space

    exp = load_experiment(GRPO_8B)
    space = build_space(exp, load_profile(exp.cluster.device))
    train = space["actor_train"]
    assert train.offload_count > 0
    assert {lay.offload for lay in train.layouts()} == set(OFFLOAD_CHOICES)
    assert all(cs.offload_count == 0 for cs in space.calls if cs.name != "actor_train")
    assert json.loads(json.dumps(space.summary()))["calls"]["actor_train"]["offload"] == train.offload_count


def test_a_push_to_a_standing_rollout_copy_uploads_an_offloaded_homes_weights_first():
    """Asynchronous GRPO on two devices, generation standing on device 0, training on device 1
    offloading everything: each push of the updated weights first uploads them on the trainer's
    device (the same time a reallocation from that home would), and the evaluator agrees."""
    from tests.test_async import _two_device

    e, plan = _two_device(1)
    off = Plan({c: dataclasses.replace(lay, offload="all") if c == "actor_train" else lay
                for c, lay in plan.layouts.items()})
    prof = load_profile("h100-sxm")
    costs = Costs(e, prof)
    source = costs.offload("actor_gen", off["actor_gen"], off["actor_train"]).source_s
    assert source > 0
    p = costs.realloc_s("actor", off["actor_train"], off["actor_gen"])
    sim = Simulation(e, off, prof, 3, costs=costs).run()
    push0 = sim.pushes[(0, "actor_gen")]
    train0 = sim.records[(0, "actor_train")]
    assert push0.start_s == pytest.approx(train0.end_s)
    assert push0.end_s == pytest.approx(train0.end_s + source + p)
    uploads = [s for s in sim.timeline(per_device=False).spans if s.op == "offload" and s.call.startswith("push")]
    assert uploads and all(s.duration_s == pytest.approx(source) for s in uploads)
    assert Evaluator(e, prof, 3, costs=costs).evaluate(off).iteration_s == pytest.approx(sim.iteration_s, rel=1e-9)
